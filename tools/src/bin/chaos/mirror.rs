//! The rooms as stored, read back over the relay's HTTP history API (any node), and the LLM
//! turns found in them.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use chat_relay::protocol::StreamId;
use serde_json::Value;

/// Largest page of the HTTP history API.
const PAGE: usize = 1000;

#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub id: StreamId,
    pub event: String,
    pub cid: Option<String>,
    pub turn_id: Option<StreamId>,
    pub mentions_llm: bool,
    pub code: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Default)]
pub struct Mirror {
    pub entries: Vec<StoredEntry>,
    pub ids: HashMap<StreamId, usize>,
    pub cursor: Option<StreamId>,
}

impl Mirror {
    pub fn tail(&self) -> Option<StreamId> {
        self.entries.last().map(|e| e.id)
    }
}

pub struct Reader {
    http: reqwest::Client,
    bases: Vec<String>,
    /// The base that answered last.
    prefer: usize,
}

impl Reader {
    pub fn new(nodes: &[String]) -> Result<Reader> {
        Ok(Reader {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            bases: nodes
                .iter()
                .map(|n| n.trim_end_matches('/').replacen("ws://", "http://", 1))
                .collect(),
            prefer: 0,
        })
    }

    async fn page(&mut self, sid: &str, after: Option<StreamId>) -> Result<Vec<Value>> {
        let after = after.map_or_else(|| "0".to_owned(), |a| a.to_string());
        let mut last_err = None;
        for k in 0..self.bases.len() {
            let i = (self.prefer + k) % self.bases.len();
            let url = format!(
                "{}/v1/sessions/{sid}/messages?after={after}&limit={PAGE}",
                self.bases[i]
            );
            match self.http.get(&url).send().await {
                Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                    Ok(v) => {
                        self.prefer = i;
                        return Ok(v["messages"].as_array().cloned().unwrap_or_default());
                    }
                    Err(e) => last_err = Some(anyhow::Error::from(e)),
                },
                Ok(r) => last_err = Some(anyhow::anyhow!("{url}: HTTP {}", r.status())),
                Err(e) => last_err = Some(e.into()),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no node")))
    }

    /// Reads the room's entries after the mirror's cursor.
    pub async fn catch_up(&mut self, sid: &str, m: &mut Mirror) -> Result<()> {
        loop {
            let page = self.page(sid, m.cursor).await?;
            let n = page.len();
            for f in page {
                let hd = &f["hd"];
                let Some(id) = hd["id"].as_str().and_then(|s| s.parse::<StreamId>().ok()) else {
                    continue;
                };
                let text = f["bd"]["text"].as_str().unwrap_or("");
                let event = hd["event"].as_str().unwrap_or("").to_owned();
                let e = StoredEntry {
                    id,
                    mentions_llm: event == "chat.message" && text.to_lowercase().contains("@llm"),
                    event,
                    cid: hd["cid"].as_str().map(str::to_owned),
                    turn_id: hd["turn_id"].as_str().and_then(|s| s.parse().ok()),
                    code: hd["code"].as_str().map(str::to_owned),
                    reason: f["bd"]["reason"].as_str().map(str::to_owned),
                };
                m.cursor = Some(id);
                m.ids.insert(id, m.entries.len());
                m.entries.push(e);
            }
            if n < PAGE {
                return Ok(());
            }
        }
    }
}

/// LLM turn bookkeeping over the mirrors: (asked turn ids per room, final entries per turn id).
/// Final entries (indexes into the room's mirror) per (room, turn id).
pub type Finals = HashMap<(usize, StreamId), Vec<usize>>;

pub fn llm_turns(run: &str, mirrors: &[Mirror]) -> (Vec<Vec<StreamId>>, Finals) {
    let prefix = format!("{run}-");
    let mut asked = Vec::with_capacity(mirrors.len());
    let mut finals: Finals = HashMap::new();
    for (r, m) in mirrors.iter().enumerate() {
        let mut a = Vec::new();
        for (i, e) in m.entries.iter().enumerate() {
            if e.mentions_llm && e.cid.as_deref().is_some_and(|c| c.starts_with(&prefix)) {
                a.push(e.id);
            }
            if e.event == "llm.response" || e.event == "llm.error" {
                if let Some(t) = e.turn_id {
                    finals.entry((r, t)).or_default().push(i);
                }
            }
        }
        asked.push(a);
    }
    (asked, finals)
}
