//! What the fault run reads from Redis, with the relay's own names for it: room keys, turn
//! leases and the LLM group come from the `chat_relay` library (its defaults, its key helper,
//! its lease decoder), never from literals here.
//!
//! Every read opens a short-lived connection with tight timeouts: Redis is being killed and
//! restarted under these reads, and a fault must not hang the timeline.

use std::time::Duration;

use anyhow::{Context, Result};
use chat_relay::config::RedisArgs;
use chat_relay::Keys;
use clap::Parser;
use fred::interfaces::ClientLike;
use fred::prelude::{Builder, Client, Config, ServerConfig};
use fred::types::{ClusterHash, CustomCommand, Value as RedisValue};
use serde_json::Value;

/// Bound on connecting plus one command.
const READ_WITHIN: Duration = Duration::from_secs(3);

/// The relay's Redis names as its own defaults define them.
#[derive(Debug, Clone)]
pub struct RelayNames {
    pub keys: Keys,
    pub llm_group: String,
}

#[derive(Parser)]
struct RelayRedisFlags {
    #[command(flatten)]
    redis: RedisArgs,
}

impl RelayNames {
    /// The relay's `--key-prefix` and `--llm-group` defaults (or `RELAY_KEY_PREFIX`,
    /// `RELAY_LLM_GROUP` when set: the fault run passes the same values to every process).
    pub fn defaults() -> Result<Self> {
        let flags = RelayRedisFlags::try_parse_from(["chaos"])
            .context("reading the relay's Redis defaults")?;
        Ok(Self {
            keys: Keys::new(flags.redis.key_prefix),
            llm_group: flags.redis.llm_group,
        })
    }
}

/// Where the rooms are: one server, or a cluster (any seed; commands follow each key's slot).
#[derive(Debug, Clone)]
pub enum RedisTarget {
    Url(String),
    Cluster(Vec<String>),
}

impl RedisTarget {
    fn config(&self) -> Result<Config> {
        match self {
            RedisTarget::Url(url) => Config::from_url(url).context("redis url"),
            RedisTarget::Cluster(seeds) => {
                let hosts = seeds
                    .iter()
                    .map(|s| {
                        let (h, p) = s.rsplit_once(':').context("seed: HOST:PORT")?;
                        Ok((h.to_owned(), p.parse::<u16>().context("seed port")?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Config {
                    server: ServerConfig::new_clustered(hosts),
                    ..Config::default()
                })
            }
        }
    }
}

/// A connection to one server (on a cluster: that node alone, e.g. to SCAN its keys).
pub async fn node(port: u16) -> Result<Client> {
    connect(Config {
        server: ServerConfig::new_centralized("127.0.0.1", port),
        ..Config::default()
    })
    .await
}

async fn connect(config: Config) -> Result<Client> {
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(1);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 1;
        })
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
        .build()?;
    tokio::time::timeout(READ_WITHIN, client.init())
        .await
        .context("redis: connect timed out")??;
    Ok(client)
}

async fn command(client: &Client, name: &'static str, args: Vec<String>) -> Result<RedisValue> {
    let cmd = CustomCommand::new_static(name, ClusterHash::FirstKey, false);
    Ok(tokio::time::timeout(READ_WITHIN, client.custom(cmd, args))
        .await
        .with_context(|| format!("redis: {name} timed out"))??)
}

fn text(v: RedisValue) -> Option<String> {
    v.into_string()
}

/// Every key of this node matching `pattern` (`SCAN`, all pages).
pub async fn scan(client: &Client, pattern: &str) -> Result<Vec<String>> {
    let mut cursor = "0".to_owned();
    let mut keys = Vec::new();
    loop {
        let args = vec![
            cursor.clone(),
            "MATCH".into(),
            pattern.into(),
            "COUNT".into(),
            "1000".into(),
        ];
        let RedisValue::Array(mut page) = command(client, "SCAN", args).await? else {
            anyhow::bail!("SCAN: unexpected reply");
        };
        let found = page.pop();
        cursor = page.pop().and_then(text).context("SCAN: no cursor")?;
        if let Some(RedisValue::Array(found)) = found {
            keys.extend(found.into_iter().filter_map(text));
        }
        if cursor == "0" {
            return Ok(keys);
        }
    }
}

/// `GET key` (`None` when it does not exist).
pub async fn get(client: &Client, key: &str) -> Result<Option<String>> {
    Ok(text(command(client, "GET", vec![key.to_owned()]).await?))
}

/// Whether the cluster node on `port` reports `cluster_state:ok`.
pub async fn cluster_ok(port: u16) -> bool {
    let Ok(client) = node(port).await else {
        return false;
    };
    let info = command(&client, "CLUSTER", vec!["INFO".into()]).await;
    let _ = client.quit().await;
    info.ok()
        .and_then(text)
        .is_some_and(|s| s.lines().any(|l| l.trim() == "cluster_state:ok"))
}

/// The LLM group's pending entries per room (information only; `null` where unreadable).
pub async fn llm_group_pending(target: &RedisTarget, names: &RelayNames, sids: &[String]) -> Value {
    let mut out = serde_json::Map::new();
    let client = match target.config() {
        Ok(config) => connect(config).await.ok(),
        Err(_) => None,
    };
    for sid in sids {
        let mut count = None;
        if let Some(client) = &client {
            let args = vec![names.keys.room(sid), names.llm_group.clone()];
            // XPENDING key group → [count, min id, max id, consumers].
            if let Ok(RedisValue::Array(summary)) = command(client, "XPENDING", args).await {
                count = summary.into_iter().next().and_then(|v| v.as_u64());
            }
        }
        out.insert(sid.clone(), count.map_or(Value::Null, Value::from));
    }
    if let Some(client) = client {
        let _ = client.quit().await;
    }
    Value::Object(out)
}
