//! The `chat-relay` binary: parses arguments, sets up logging, binds, runs.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use chat_relay::config::{LogArgs, ServeConfig};

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
    Serve(ServeConfig),
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
            let token = CancellationToken::new();
            let on_signal = token.clone();
            tokio::spawn(async move {
                chat_relay::shutdown_signal().await;
                tracing::info!("shutdown requested");
                on_signal.cancel();
            });
            chat_relay::run(listener, cfg, token).await?;
        }
    }
    Ok(())
}
