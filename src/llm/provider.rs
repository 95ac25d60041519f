//! The one provider: any OpenAI-compatible Chat Completions API with `stream: true` (OpenAI,
//! Ollama, vLLM, llama.cpp's server, Gemini's OpenAI endpoint).
//!
//! Retries (with backoff) happen only before the first token: once text reached the room,
//! starting over would show it twice.

use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use backon::Retryable;
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::prompt::ChatMessage;

/// A completion of `--llm-max-tokens` never needs this many bytes; more means a broken or
/// hostile server, and the SSE decoder would otherwise buffer an endless line.
const MAX_STREAM_BYTES: u64 = 16 << 20;

/// Why a completion failed; mapped once to a short human message for the room.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot reach the LLM server")]
    Connect(#[source] reqwest::Error),
    #[error("LLM server answered HTTP {status}")]
    Status { status: u16, body: String },
    #[error("LLM server timed out ({0})")]
    Timeout(&'static str),
    #[error("LLM server sent a malformed stream: {0}")]
    Protocol(String),
}

impl LlmError {
    /// Stable code stored in `llm.error`.
    pub fn code(&self) -> &'static str {
        match self {
            LlmError::Connect(_) => "llm_unavailable",
            LlmError::Status { status: 429, .. } => "llm_rate_limited",
            LlmError::Status { status, .. } if *status >= 500 => "llm_unavailable",
            LlmError::Status { .. } => "llm_rejected",
            LlmError::Timeout(_) => "llm_timeout",
            LlmError::Protocol(_) => "llm_bad_response",
        }
    }

    /// What people in the room read; details stay in the logs.
    pub fn human(&self) -> &'static str {
        match self {
            LlmError::Connect(_) | LlmError::Status { .. } => {
                "the AI service is temporarily unavailable"
            }
            LlmError::Timeout(_) => "the AI service took too long to answer",
            LlmError::Protocol(_) => "the AI service sent a reply we could not read",
        }
    }

    fn retryable(&self) -> bool {
        match self {
            LlmError::Connect(_) | LlmError::Timeout(_) => true,
            LlmError::Status { status, .. } => *status == 429 || *status >= 500,
            LlmError::Protocol(_) => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// What the stream yields.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Event {
    Delta(String),
    Finish(String),
    Usage(Usage),
}

#[derive(Debug, Clone)]
pub(super) struct ProviderSettings {
    pub base_url: String,
    pub api_key: Option<String>,
    pub model: String,
    pub max_tokens: u32,
    pub connect_timeout: Duration,
    /// Longest wait for the first byte of the response and between two chunks.
    pub idle_timeout: Duration,
    pub attempts: u32,
}

#[derive(Debug, Clone)]
pub(super) struct Provider {
    http: reqwest::Client,
    settings: ProviderSettings,
}

impl Provider {
    pub(super) fn new(settings: ProviderSettings) -> Result<Provider, LlmError> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .build()
            .map_err(LlmError::Connect)?;
        Ok(Provider { http, settings })
    }

    pub(super) fn model(&self) -> &str {
        &self.settings.model
    }

    /// Starts a streamed completion, retrying connection failures, 429 and 5xx with backoff.
    pub(super) async fn stream(
        &self,
        messages: &[ChatMessage],
        stop: &[String],
        max_tokens: u32,
    ) -> Result<Completion, LlmError> {
        let retries = self.settings.attempts.saturating_sub(1) as usize;
        (|| self.start(messages, stop, max_tokens))
            .retry(crate::retry::bounded(
                Duration::from_millis(200),
                Duration::from_secs(5),
                retries,
            ))
            .when(LlmError::retryable)
            .notify(|err, wait| {
                tracing::info!(cause = %err, wait_ms = wait.as_millis() as u64, "LLM request failed before the first token; retrying");
            })
            .await
    }

    async fn start(
        &self,
        messages: &[ChatMessage],
        stop: &[String],
        max_tokens: u32,
    ) -> Result<Completion, LlmError> {
        let url = format!(
            "{}/chat/completions",
            self.settings.base_url.trim_end_matches('/')
        );
        let body = serde_json::json!({
            "model": self.settings.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": max_tokens.min(self.settings.max_tokens),
            "stop": stop,
        });
        let mut req = self.http.post(url).json(&body);
        if let Some(key) = &self.settings.api_key {
            req = req.bearer_auth(key);
        }
        let resp = match tokio::time::timeout(self.settings.idle_timeout, req.send()).await {
            Err(_) => return Err(LlmError::Timeout("no response")),
            Ok(Err(e)) => return Err(LlmError::Connect(e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let body = tokio::time::timeout(Duration::from_secs(2), resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(LlmError::Status {
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            });
        }
        // Every byte counts as a sign of life, keep-alive comments included, though only whole
        // events come out of the decoder.
        let started = tokio::time::Instant::now();
        let last_byte_ms = Arc::new(AtomicU64::new(0));
        let seen = last_byte_ms.clone();
        let mut total = 0u64;
        let bytes = resp.bytes_stream().map(move |chunk| {
            let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
            total += chunk.len() as u64;
            if total > MAX_STREAM_BYTES {
                return Err(BodyError::TooLarge);
            }
            seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            Ok(chunk)
        });
        Ok(Completion {
            events: Box::pin(bytes.eventsource()),
            queue: std::collections::VecDeque::new(),
            idle_timeout: self.settings.idle_timeout,
            started,
            last_byte_ms,
            done: false,
        })
    }
}

/// Why reading the response body stopped.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("body read failed: {0}")]
    Read(String),
    #[error("stream longer than {MAX_STREAM_BYTES} bytes")]
    TooLarge,
}

type EventStream = std::pin::Pin<
    Box<
        dyn Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<BodyError>,
                >,
            > + Send,
    >,
>;

/// A streamed completion in progress.
pub(super) struct Completion {
    events: EventStream,
    queue: std::collections::VecDeque<Event>,
    idle_timeout: Duration,
    started: tokio::time::Instant,
    /// When the server last sent anything, in ms after `started`. The stall deadline counts
    /// from here, not from each `next()` call, so a caller that drops `next()` in a `select!`
    /// cannot postpone it forever.
    last_byte_ms: Arc<AtomicU64>,
    done: bool,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("done", &self.done)
            .finish()
    }
}

impl Completion {
    /// The next event, or `None` after `[DONE]` (or a clean end of the body).
    pub(super) async fn next(&mut self) -> Result<Option<Event>, LlmError> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Ok(Some(ev));
            }
            if self.done {
                return Ok(None);
            }
            let last = Duration::from_millis(self.last_byte_ms.load(Ordering::Relaxed));
            let deadline = self.started + last + self.idle_timeout;
            let event = match tokio::time::timeout_at(deadline, self.events.next()).await {
                // Bytes may have arrived without completing an event: only a real silence counts.
                Err(_) if self.last_byte_ms.load(Ordering::Relaxed) > last.as_millis() as u64 => {
                    continue
                }
                Err(_) => return Err(LlmError::Timeout("stream stalled")),
                Ok(None) => {
                    self.done = true;
                    continue;
                }
                Ok(Some(Err(e))) => return Err(LlmError::Protocol(e.to_string())),
                Ok(Some(Ok(ev))) => ev,
            };
            if event.data.trim() == "[DONE]" {
                self.done = true;
                continue;
            }
            self.queue.extend(parse_chunk(&event.data)?);
        }
    }
}

/// One `chat.completion.chunk` → events. An `error` object inside the stream is a failure.
fn parse_chunk(data: &str) -> Result<Vec<Event>, LlmError> {
    let v: Value =
        serde_json::from_str(data).map_err(|_| LlmError::Protocol("chunk is not JSON".into()))?;
    if let Some(err) = v.get("error") {
        return Err(LlmError::Status {
            status: 500,
            body: err.to_string().chars().take(300).collect(),
        });
    }
    let mut out = Vec::new();
    if let Some(choice) = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
    {
        if let Some(text) = choice.pointer("/delta/content").and_then(Value::as_str) {
            if !text.is_empty() {
                out.push(Event::Delta(text.to_owned()));
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            out.push(Event::Finish(reason.to_owned()));
        }
    }
    if let Some(usage) = v.get("usage").filter(|u| !u.is_null()) {
        let usage: Usage = serde_json::from_value(usage.clone())
            .map_err(|_| LlmError::Protocol("usage has unexpected fields".into()))?;
        out.push(Event::Usage(usage));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_chunks() {
        let evs =
            parse_chunk(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#)
                .unwrap();
        assert!(evs.is_empty());
        let evs = parse_chunk(
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(evs, [Event::Delta("Hi".into())]);
        let evs =
            parse_chunk(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#).unwrap();
        assert_eq!(evs, [Event::Finish("stop".into())]);
        let evs = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}}"#).unwrap();
        assert_eq!(
            evs,
            [Event::Usage(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                total_tokens: 5
            })]
        );
        assert!(parse_chunk("nope").is_err());
        assert!(parse_chunk(r#"{"error":{"message":"overloaded"}}"#).is_err());
    }
}
