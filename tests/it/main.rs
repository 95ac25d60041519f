//! One integration-test binary (links once): real redis-server per test, real relays on port 0,
//! real WebSocket clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod bad_input;
mod chat;
mod cli;
mod cluster;
mod cross_site;
mod dedup;
mod dialects;
mod eval;
mod history;
mod honest;
mod http_live;
mod http_stack;
mod limits;
mod llm;
mod multi_node;
mod props;
mod real_llm;
mod relay_core;
mod resilience;
mod rooms;
mod security;
mod sessions;
mod transport;
mod turns;
mod voice;
