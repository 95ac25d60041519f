//! `chaos run`: set up the world, drive the clients, play the timeline, check that nothing
//! crashed on its own, print the faults and the summary, clean up.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use testkit::{FakeLlm, RedisServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::drive::{drive, DriveEnd};
use crate::faults::{RedisSide, World};
use crate::plan::Plan;
use crate::procs::Procs;
use crate::redis::RelayNames;
use crate::{DriveArgs, RunArgs};

/// How long the clients may take to join before the run counts as not set up.
const JOIN_WITHIN: Duration = Duration::from_secs(30);

pub async fn run(args: RunArgs) -> Result<u8> {
    let plan = Plan::new(args.short);
    let say = |s: &str| eprintln!("[chaos run] {s}");
    for tool in ["redis-server", "redis-cli"] {
        if !on_path(tool) {
            say(&format!(
                "{tool} is missing: run scripts/setup.sh (or apt-get install redis-server)"
            ));
            return Ok(2);
        }
    }
    let relay_bin = match &args.relay_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("chat-relay"),
    };
    if !relay_bin.is_file() {
        say(&format!(
            "{} not found (build it: cargo build --bin chat-relay)",
            relay_bin.display()
        ));
        return Ok(2);
    }
    let tmp = std::env::temp_dir().join(format!(
        "chat-relay-chaos.{}.{}",
        std::process::id(),
        relay_tools::clock::epoch_ms()
    ));
    std::fs::create_dir_all(tmp.join("redis"))
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let ports = testkit::free_ports(4)?;
    let names = RelayNames::defaults()?;
    let run = format!("r{}", relay_tools::clock::epoch_ms() / 1000);
    let redis = if args.cluster {
        RedisSide::Cluster(Cluster::new(&args.cluster_script, &tmp.join("cluster")))
    } else {
        let server = RedisServer::builder()
            .port(ports[0])
            .dir(tmp.join("redis"))
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--maxmemory",
                "1gb",
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                &tmp.join("redis.log").to_string_lossy(),
            ]);
        RedisSide::Standalone(Arc::new(Mutex::new(
            tokio::task::spawn_blocking(move || server.start())
                .await?
                .with_context(|| {
                    format!(
                        "redis-server did not start (see {})",
                        tmp.join("redis.log").display()
                    )
                })?,
        )))
    };
    let procs = Procs::new(&tmp, &relay_bin);
    let ports = [ports[1], ports[2], ports[3]];
    let mut world = World::new(tmp, procs, redis, ports, names, run, plan.rooms);

    let code = tokio::select! {
        code = fault_run(&mut world, &plan) => code,
        () = chat_relay::shutdown_signal() => {
            world.say("interrupted");
            130
        }
    };

    world.procs.stop_all().await;
    match &world.redis {
        RedisSide::Standalone(r) => {
            let r = r.clone();
            let _ = tokio::task::spawn_blocking(move || {
                crate::lock(&r).stop_with(testkit::Signal::Term)
            })
            .await;
        }
        RedisSide::Cluster(c) => c.stop(&world.tmp, &world.tmp.join("cluster.log")).await,
    }
    if code == 0 && !args.keep {
        let _ = std::fs::remove_dir_all(&world.tmp);
    } else {
        world.say(&format!(
            "logs kept in {} (node1.log node2.log worker1.log worker2.log redis*.log faults.log)",
            world.tmp.display()
        ));
    }
    Ok(code)
}

/// The run proper; returns the exit code.
async fn fault_run(world: &mut World, plan: &Plan) -> u8 {
    if let RedisSide::Cluster(c) = &mut world.redis {
        if let Err(err) = c.start(&world.tmp.join("cluster.log")).await {
            world.say(&format!("{err:#}"));
            return 2;
        }
    }
    let redis_desc = match &world.redis {
        RedisSide::Standalone(r) => format!("redis :{}", crate::lock(r).port),
        RedisSide::Cluster(c) => format!(
            "redis cluster :{}",
            c.ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" :")
        ),
    };
    world.say(&format!(
        "temp dir {}; {redis_desc}, nodes :{} :{}, fake LLM :{}, run {}",
        world.tmp.display(),
        world.node_ports[0],
        world.node_ports[1],
        world.llm_port,
        world.run
    ));
    match start_processes(world, plan).await {
        Ok(_fake) => run_with_processes(world, plan).await,
        Err(err) => {
            world.say(&format!("{err:#}"));
            2
        }
    }
}

/// The fake LLM (in this process; the handle keeps nothing alive, the runtime does) and the
/// relay nodes and workers.
async fn start_processes(world: &World, plan: &Plan) -> Result<FakeLlm> {
    let mode = FakeLlm::numbered(plan.tokens, Duration::from_millis(plan.token_ms));
    let fake = FakeLlm::bind(SocketAddr::from(([127, 0, 0, 1], world.llm_port)), mode)
        .await
        .context("the fake LLM did not start")?;
    fake.set_recording(false);
    world.start_node(1).await?;
    world.start_node(2).await?;
    world.start_worker(1)?;
    world.start_worker(2)?;
    Ok(fake)
}

fn drive_args(world: &World, plan: &Plan) -> DriveArgs {
    let (redis, redis_cluster) = match &world.redis {
        RedisSide::Standalone(r) => (Some(crate::lock(r).url()), Vec::new()),
        RedisSide::Cluster(c) => (None, c.seeds.split(',').map(str::to_owned).collect()),
    };
    DriveArgs {
        nodes: world
            .node_ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}"))
            .collect(),
        redis,
        redis_cluster,
        run: Some(world.run.clone()),
        rooms: plan.rooms,
        clients: plan.clients,
        duration: plan.duration,
        interval_ms: 50,
        llm_every: plan.llm_every,
        llm_senders: 1,
        ack_timeout_ms: 3000,
        join_wait: 20.0,
        ack_wait: plan.ack_wait,
        llm_wait: plan.llm_wait,
        drain_wait: plan.drain_wait,
        timeout: plan.deadline,
        ready_file: None,
        progress: 1.0,
    }
}

/// Aborts the drive when the run ends early (an interrupt drops the run's future).
struct Driver(JoinHandle<Result<DriveEnd>>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run_with_processes(world: &mut World, plan: &Plan) -> u8 {
    let (joined_tx, joined_rx) = oneshot::channel();
    let mut driver = Driver(tokio::spawn(drive(
        drive_args(world, plan),
        Some(joined_tx),
    )));

    // Every client joined: the timeline is relative to this moment.
    if !matches!(
        tokio::time::timeout(JOIN_WITHIN, joined_rx).await,
        Ok(Ok(()))
    ) {
        world.say("the driver did not start sending");
        return 2;
    }
    world.sending_began();
    let t0 = Instant::now();
    for &(at, action) in &plan.timeline {
        let due = t0 + Duration::from_secs_f64(at);
        while Instant::now() < due && !driver.0.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if driver.0.is_finished() {
            break;
        }
        world.play(action).await;
    }

    // Every process must still be up (a crash on its own is a finding too).
    let mut crashed = crashed_now(world);
    // The driver bounds itself (its --timeout); this is the backstop.
    let limit = Duration::from_secs_f64(plan.deadline + 15.0);
    let (code, summary) = match tokio::time::timeout(limit, &mut driver.0).await {
        Ok(Ok(Ok(end))) => {
            let code = end.exit_code();
            match end {
                DriveEnd::Checked { summary, .. } => (code, summary),
                _ => (code, String::new()),
            }
        }
        Ok(Ok(Err(err))) => (2, format!("chaos: the drive failed: {err:#}\n")),
        Ok(Err(join)) => (2, format!("chaos: the drive task failed: {join}\n")),
        Err(_) => {
            world.say(&format!(
                "the driver exceeded {}s; stopping it",
                limit.as_secs()
            ));
            driver.0.abort();
            (1, String::new())
        }
    };
    // Processes that died during the drain count too.
    for name in crashed_now(world) {
        if !crashed.contains(&name) {
            crashed.push(name);
        }
    }

    println!();
    println!(
        "faults (script = since the script started; send+ = since the clients began sending):"
    );
    for line in world.fault_log().lines() {
        println!("  {line}");
    }
    print!("{summary}");
    let panics = panicked_logs(&world.tmp);
    let mut result = code;
    if !crashed.is_empty() {
        println!(
            "VIOLATION: processes not running at the end: {}",
            crashed.join(" ")
        );
        result = 1;
    }
    if !panics.is_empty() {
        println!("VIOLATION: panics in: {}", panics.join(" "));
        result = 1;
    }
    if result == 0 {
        world.say("PASS");
    } else {
        world.say(&format!("FAIL (exit {result})"));
    }
    result
}

/// The processes of the run that are not running now.
fn crashed_now(world: &World) -> Vec<String> {
    let mut down = match &world.redis {
        RedisSide::Standalone(r) => {
            if crate::lock(r).is_running() {
                Vec::new()
            } else {
                vec!["redis".to_owned()]
            }
        }
        RedisSide::Cluster(c) => c.masters_down(),
    };
    for name in ["node1", "node2", "worker1", "worker2"] {
        if !world.procs.alive(name) {
            down.push(name.to_owned());
        }
    }
    down
}

/// Relay logs that show a panic.
fn panicked_logs(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name.starts_with("node") || name.starts_with("worker")) && name.ends_with(".log")
        })
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|s| s.contains("panicked")))
        .map(|p| p.display().to_string())
        .collect();
    found.sort();
    found
}

/// Whether an executable named `tool` is on the PATH.
fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(tool)))
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
