//! `dashboard`: what the instructor's dashboard costs `comfyume serve` during a busy
//! workshop, and how soon its events arrive. N participants (200 by default) each keep a
//! WebSocket open and loop: submit a job, wait for its end, think 2-6 s. Jobs run on a
//! simulator in this process (one GPU, two backend slots), so a backlog builds and the queue
//! changes all the time. The same server is measured in five phases of equal length,
//! alternating: no dashboard, the dashboard's stream open (a WebSocket client reading every
//! message, as the page does), no dashboard, open, no dashboard. Reported: serve's CPU (share of one core) and
//! resident memory per phase, the stream's messages and bytes, and for every job submitted
//! while it is open, the time from the submission's 200 to the first dashboard message
//! listing that job.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{self, Serve};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, default_value_t = 200)]
    pub participants: usize,
    /// Length of each phase.
    #[arg(long, default_value_t = 25)]
    pub phase_secs: u64,
    /// Time one job takes on the simulator (a 4-step sampler).
    #[arg(long, default_value_t = 400)]
    pub job_ms: u64,
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
}

fn basic(user: &str, pw: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// Submissions not yet seen on the dashboard: id -> when the 200 came.
type Pending = Arc<Mutex<HashMap<String, Instant>>>;

struct Phase {
    name: &'static str,
    secs: f64,
    cpu_ms: f64,
    rss_mib: f64,
    jobs: u64,
}

/// What every participant's loop shares.
#[derive(Clone)]
struct Shared {
    base: String,
    client: reqwest::Client,
    stop: Arc<AtomicBool>,
    pending: Pending,
    /// Whether the dashboard is open (submissions are then timed).
    watching: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
}

/// One participant: a WebSocket, then submit / wait for the end / think, until `stop`.
async fn participant(sh: Shared, user: String, auth: String, seed: u64) -> Result<()> {
    let Shared {
        base,
        client,
        stop,
        pending,
        watching,
        done,
    } = sh;
    let ws_url = format!(
        "ws://{}/{user}/ws?clientId=bench-{user}",
        base.trim_start_matches("http://")
    );
    let mut ws = common::ws_connect(&ws_url, &[("authorization", auth.clone())]).await?;
    let mut rng = seed;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let body = json!({
            "client_id": format!("bench-{user}"),
            "prompt": common::flux_prompt(4, seed * 10_000 + n, 64),
        });
        n += 1;
        let r = client
            .post(format!("{base}/{user}/api/prompt"))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if status != 200 {
            bail!("POST /api/prompt for {user}: {status} {v}");
        }
        let id = v["prompt_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no prompt_id"))?
            .to_string();
        if watching.load(Ordering::Relaxed) {
            pending.lock().unwrap().insert(id.clone(), Instant::now());
        }
        common::until_done(&mut ws, &id, Duration::from_secs(600)).await?;
        done.fetch_add(1, Ordering::Relaxed);
        // Think 2-6 s (a cheap LCG: every participant its own sequence).
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let think = 2000 + (rng >> 33) % 4000;
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
    Ok(())
}

/// The dashboard's stream: reads every message, as the page does; records when each
/// pending job first appears.
async fn dashboard(
    base: String,
    auth: String,
    stop: Arc<AtomicBool>,
    pending: Pending,
) -> Result<(Vec<Duration>, u64, u64)> {
    let url = format!("ws://{}/admin/ws", base.trim_start_matches("http://"));
    let mut ws = common::ws_connect(&url, &[("authorization", auth)]).await?;
    let mut seen = Vec::new();
    let (mut msgs, mut bytes) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let m = match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Err(_) => continue,
            Ok(None) => bail!("the dashboard's stream closed"),
            Ok(Some(m)) => m?,
        };
        let Message::Text(t) = m else { continue };
        let at = Instant::now();
        msgs += 1;
        bytes += t.len() as u64;
        let v: Value = serde_json::from_str(t.as_str())?;
        let q = &v["sections"]["queue"];
        if q.is_null() {
            continue;
        }
        let mut p = pending.lock().unwrap();
        for list in ["waiting", "running"] {
            for j in q[list].as_array().into_iter().flatten() {
                if let Some(t0) = j["id"].as_str().and_then(|id| p.remove(id)) {
                    seen.push(at - t0);
                }
            }
        }
    }
    Ok((seen, msgs, bytes))
}

pub async fn run(a: Args) -> Result<()> {
    let bin = common::absolute(&a.bin)?;
    let frontend = common::absolute(&a.frontend)
        .context("install it with scripts/install-frontend.sh target/test-data")?;
    let sim = common::spawn_sim(a.job_ms / 4).await?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let users = common::create_workshop(&bin, &data, a.participants).await?;
    let out = common::run_cli(&bin, &data, &["users", "add", "teacher", "--admin"]).await?;
    let admin_pw = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .ok_or_else(|| anyhow!("no generated password for the instructor"))?
        .trim()
        .to_string();
    let cap = (a.participants * 4).to_string();
    let env = [
        ("INFERENCE_MODE", "local".to_string()),
        ("COMFYUI_URLS", sim.url()),
        ("MAX_QUEUED_PER_USER", "10".to_string()),
        ("MAX_QUEUE_DEPTH", cap),
        ("MAX_CONNECTIONS", "4096".to_string()),
    ];
    let serve = Serve::start(&bin, &data, &frontend, &env).await?;
    let client = common::http_client()?;

    let stop = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(false));
    let pending: Pending = Arc::default();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let shared = Shared {
        base: serve.base.clone(),
        client: client.clone(),
        stop: stop.clone(),
        pending: pending.clone(),
        watching: watching.clone(),
        done: done.clone(),
    };
    for (i, (u, p)) in users.iter().enumerate() {
        tasks.push(tokio::spawn(participant(
            shared.clone(),
            u.clone(),
            basic(u, p),
            i as u64 + 1,
        )));
        // Ramp up: the first credential checks (argon2) are spread out.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Warm-up: every participant signed in (one argon2 check each) and has a job in.
    tokio::time::sleep(Duration::from_secs(20)).await;

    let phase = |name: &'static str| {
        let pid = serve.pid;
        let done = done.clone();
        async move {
            let (c0, d0, t0) = (
                common::cpu_ms(pid)?,
                done.load(Ordering::Relaxed),
                Instant::now(),
            );
            tokio::time::sleep(Duration::from_secs(a.phase_secs)).await;
            let (c1, d1) = (common::cpu_ms(pid)?, done.load(Ordering::Relaxed));
            anyhow::Ok(Phase {
                name,
                secs: t0.elapsed().as_secs_f64(),
                cpu_ms: c1 - c0,
                rss_mib: common::mem_of(pid)?.rss_mib(),
                jobs: d1 - d0,
            })
        }
    };
    // Closed, open, closed, open, closed: the machine is shared, so the two kinds of phase
    // alternate and each is compared with its neighbours.
    let mut phases = Vec::new();
    let (mut seen, mut msgs, mut bytes, mut unseen) = (Vec::new(), 0u64, 0u64, 0usize);
    for round in 0..5 {
        if round % 2 == 0 {
            phases.push(phase("no dashboard").await?);
            continue;
        }
        let dash_stop = Arc::new(AtomicBool::new(false));
        watching.store(true, Ordering::Relaxed);
        let reader = tokio::spawn(dashboard(
            serve.base.clone(),
            basic("teacher", &admin_pw),
            dash_stop.clone(),
            pending.clone(),
        ));
        phases.push(phase("dashboard open").await?);
        watching.store(false, Ordering::Relaxed);
        dash_stop.store(true, Ordering::Relaxed);
        let (s, m, b) = reader.await??;
        seen.extend(s);
        msgs += m;
        bytes += b;
        let mut p = pending.lock().unwrap();
        unseen += p.len();
        p.clear();
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let mem_end = serve.mem()?;
    Serve::stop(serve).await;
    sim.shutdown().await;

    common::print_machine();
    println!(
        "real comfyume serve (release) -> simulator in this process (1 GPU, 2 slots, jobs of ~{} ms); {} participants, each: submit, wait for the end, think 2-6 s; phases of {} s",
        a.job_ms, a.participants, a.phase_secs
    );
    let rows: Vec<Vec<String>> = phases
        .iter()
        .map(|p| {
            vec![
                p.name.to_string(),
                format!("{:.1} %", p.cpu_ms / (p.secs * 1000.0) * 100.0),
                format!("{:.1} MiB", p.rss_mib),
                format!("{}", p.jobs),
            ]
        })
        .collect();
    common::print_table(
        "dashboard: cost to serve",
        &[
            "phase",
            "serve CPU (of one core)",
            "serve RSS at end",
            "jobs done",
        ],
        &rows,
    );
    let lat = common::summarize(&seen);
    let within_1s = seen
        .iter()
        .filter(|d| **d <= Duration::from_secs(1))
        .count();
    common::print_table(
        "dashboard: submission -> first message listing the job",
        &[
            "jobs",
            "p50 / p90 / p99 / max",
            "within 1 s",
            "not seen",
            "messages",
            "bytes/s",
        ],
        &[vec![
            format!("{}", lat.n),
            lat.brief(),
            format!("{within_1s} of {}", seen.len()),
            format!("{unseen}"),
            format!("{msgs}"),
            format!(
                "{:.0}",
                bytes as f64
                    / phases
                        .iter()
                        .filter(|p| p.name == "dashboard open")
                        .map(|p| p.secs)
                        .sum::<f64>()
            ),
        ]],
    );
    let summary = json!({
        "bench": "dashboard",
        "machine": common::machine(),
        "participants": a.participants,
        "phase_secs": a.phase_secs,
        "phases": phases.iter().map(|p| json!({
            "name": p.name, "cpu_percent": (p.cpu_ms / (p.secs * 1000.0) * 1000.0).round() / 10.0,
            "rss_mib": (p.rss_mib * 10.0).round() / 10.0, "jobs": p.jobs,
        })).collect::<Vec<_>>(),
        "latency": lat.json_ms(),
        "within_1s": within_1s,
        "unseen": unseen,
        "messages": msgs,
        "bytes": bytes,
        "hwm_mib": mem_end.hwm_mib(),
    });
    println!("{summary}");
    Ok(())
}
