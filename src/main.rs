//! The `chat-relay` binary: parses arguments, sets up logging, binds, runs.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use chat_relay::config::{LogArgs, ServeConfig, WorkerConfig};

/// mimalloc rather than glibc's malloc, chosen by measurement (BENCHMARKS.md, #16): the hot
/// path allocates small short-lived buffers per frame, and glibc spent ~30% of the relay's CPU
/// in S1 on them (`_int_malloc`, `unlink_chunk`, `malloc_consolidate`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "chat-relay",
    version,
    about = "Real-time chat relay on Redis Streams"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay: WebSocket rooms, HTTP API and the browser page.
    Serve(Box<ServeConfig>),
    /// Run only the LLM participant (any number of workers share one consumer group).
    LlmWorker(Box<WorkerConfig>),
    /// A terminal client: type to chat; in a pipe, send lines and print frames as JSON lines.
    Chat(chat_relay::client::ChatArgs),
    /// Print an HS256 token for `--auth jwt` (for Postman, the browser page, tests).
    Token(TokenArgs),
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The relay's shared secret.
    #[arg(long, env = "RELAY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Room(s) the token grants: an id, a prefix pattern like `team-*`, or `*`; repeatable.
    #[arg(long, required = true)]
    sid: Vec<String>,
    /// The role the holder speaks as.
    #[arg(long)]
    role: String,
    /// The subject (who holds the token); defaults to the role.
    #[arg(long)]
    sub: Option<String>,
    /// Lifetime: `90s`, `15m`, `1h`, `2d`.
    #[arg(long, default_value = "1h", value_parser = chat_relay::parse_ttl)]
    ttl: std::time::Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    chat_relay::telemetry::init(&cli.log);
    match cli.command {
        Command::Serve(cfg) => {
            cfg.validate().context("invalid configuration")?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.listen))?;
            let token = shutdown_token();
            chat_relay::run(listener, *cfg, token).await?;
        }
        Command::Chat(args) => chat_relay::client::run(args).await?,
        Command::Token(args) => {
            let sub = args.sub.as_deref().unwrap_or(&args.role);
            let token = chat_relay::mint(&args.jwt_secret, &args.sid, &args.role, sub, args.ttl)?;
            use std::io::Write;
            writeln!(std::io::stdout(), "{token}")?;
        }
        Command::LlmWorker(cfg) => {
            let token = shutdown_token();
            let store = cfg.redis.store().context("invalid Redis settings")?;
            let tracker = tokio_util::task::TaskTracker::new();
            chat_relay::run_worker(store.clone(), cfg.llm_args, token, tracker.clone()).await?;
            tracker.close();
            // Turns in flight are left pending for another worker; give them a moment to end.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait()).await;
            store.quit().await;
        }
    }
    Ok(())
}

/// A token cancelled by SIGINT or SIGTERM.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        chat_relay::shutdown_signal().await;
        tracing::info!("shutdown requested");
        on_signal.cancel();
    });
    token
}
