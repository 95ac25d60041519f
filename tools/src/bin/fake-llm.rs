//! `fake-llm`: an OpenAI-compatible Chat Completions server that streams numbered tokens
//! (`tok0 tok1 ...`) with a delay before each, on a loopback port, until interrupted. The same
//! server the relay's integration tests and the fault run use (testkit's `FakeLlm`).
//!
//! ```text
//! fake-llm --port 0 --delay-ms 2 --tokens 100      # the benchmark's S4 provider
//! chat-relay serve --llm-base-url http://127.0.0.1:PORT/v1 ...
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use testkit::FakeLlm;

#[derive(Debug, Parser)]
#[command(
    name = "fake-llm",
    about = "OpenAI-compatible streaming server with numbered tokens (loopback only)"
)]
struct Args {
    /// Port on 127.0.0.1 (0: any; the address is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Delay before each token, ms.
    #[arg(long, default_value_t = 100)]
    delay_ms: u64,
    /// Tokens per answer.
    #[arg(long, default_value_t = 20)]
    tokens: usize,
    /// Answer every request with this HTTP status instead (e.g. 500, 429).
    #[arg(long)]
    status: Option<u16>,
    /// Never send the usage chunk, even when asked for.
    #[arg(long)]
    no_usage: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mode = match args.status {
        Some(code) => testkit::Mode::Status(code),
        None => FakeLlm::numbered(args.tokens.max(1), Duration::from_millis(args.delay_ms)),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let fake = match FakeLlm::bind(addr, mode).await {
        Ok(fake) => fake,
        Err(err) => {
            eprintln!("fake-llm: cannot listen on {addr}: {err}");
            return ExitCode::from(2);
        }
    };
    fake.set_recording(false);
    fake.set_usage(!args.no_usage);
    println!("fake-llm listening on {}", fake.addr);
    let _ = tokio::signal::ctrl_c().await;
    eprintln!(
        "fake-llm: {} requests, {} answered to the end, {} hung up",
        fake.request_count(),
        fake.finished(),
        fake.hung_up()
    );
    ExitCode::SUCCESS
}
