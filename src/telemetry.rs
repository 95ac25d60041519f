//! Tracing setup: one subscriber for the process, text or JSON.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::{LogArgs, LogFormat};

/// Installs the global subscriber. Untrusted text only ever appears in structured fields, and
/// tracing-subscriber ≥ 0.3.20 escapes control characters in them.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match args.log_format {
        LogFormat::Text => registry
            .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init(),
    };
    // A second init (tests starting several relays) keeps the first subscriber.
    let _ = result;
}
