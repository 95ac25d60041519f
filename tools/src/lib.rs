//! Helpers the tools (`loadgen`, `chaos`, `fake-llm`) share. The fake OpenAI server, the
//! redis-server harness and free ports live in the testkit crate (the relay's tests use them
//! too); stream ids and Redis key names come from the `chat_relay` library itself.

pub mod clock;
pub mod loopback;
