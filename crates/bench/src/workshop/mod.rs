//! `workshop`: a workshop day of faults. N participants use their ComfyUI
//! through the real `comfyume serve` (sign in, load the UI, hold the
//! WebSocket, click Run in bursts, look at results, close a tab now and then)
//! while jobs run on several `comfyume-sim` processes, and scripted faults hit
//! at set moments: a backend's WebSocket cut, a backend SIGKILLed mid-job, a
//! backend hanging, a backend answering garbage, the database locked by
//! another process, the data disk full, `serve` SIGKILLed and restarted.
//!
//! Afterwards every job the server knows is read back (each participant's
//! `/api/jobs`), every result fetched through `/api/view`, and the simulators'
//! logs read for how often each job was sent and run. Jobs lost, run twice,
//! stuck and outputs lost must all be 0 (the command fails otherwise).

mod analysis;
mod participant;
mod plan;
mod procs;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::common;
use analysis::JobSpan;
use participant::{Kind, Participant, Shared};
use plan::{Behaviour, Day, FaultKind, Step};
use procs::{DbLock, Garbage, ServeCtl, SimProc, Tmpfs, epoch_ms};

/// Timeouts of `serve` that are not configurable: their production values apply.
const REQUEST_TIMEOUT_S: u64 = 10;
const STOP_GRACE_S: u64 = 15;
const RECONCILE_S: u64 = 30;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Participants (the long form: 200).
    #[arg(long, default_value_t = 20)]
    pub participants: usize,
    /// Seconds during which participants submit (faults fall in 5-85 % of it).
    #[arg(long, default_value_t = 300)]
    pub duration: u64,
    /// Simulator processes (`COMFYUI_URLS`).
    #[arg(long, default_value_t = 3)]
    pub sims: usize,
    /// Simulated time per sampler step (`SIMULATOR_STEP_MS`).
    #[arg(long, default_value_t = 250)]
    pub step_ms: u64,
    /// Sampler steps of a Run, drawn between these.
    #[arg(long, default_value_t = 4)]
    pub steps_min: u32,
    #[arg(long, default_value_t = 12)]
    pub steps_max: u32,
    /// Think time between bursts, seconds, drawn between these.
    #[arg(long, default_value_t = 5)]
    pub think_min: u64,
    #[arg(long, default_value_t = 30)]
    pub think_max: u64,
    /// Most Runs clicked in one burst.
    #[arg(long, default_value_t = 3)]
    pub burst_max: u32,
    /// Share of clicks after which the tab is closed at once.
    #[arg(long, default_value_t = 0.08)]
    pub close_tab_share: f64,
    /// Share of Runs of the no-model graph (the rest: Flux.2 graphs).
    #[arg(long, default_value_t = 0.2)]
    pub nomodel_share: f64,
    /// `JOB_TIMEOUT` of serve, seconds (production: 600).
    #[arg(long, default_value_t = 30)]
    pub job_timeout: u64,
    /// `JOB_START_TIMEOUT` of serve, seconds (production: 600).
    #[arg(long, default_value_t = 20)]
    pub start_timeout: u64,
    /// `MAX_ATTEMPTS` of serve.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Faults to script, comma-separated keys (drop_websocket, kill_backend,
    /// hang_backend, garbage_backend, db_lock, disk_full, kill_serve), "all" or "none".
    #[arg(long, default_value = "all")]
    pub faults: String,
    /// How long a hang lasts, seconds (default: past the timeouts it must trip).
    #[arg(long)]
    pub hang_secs: Option<u64>,
    /// How long a killed backend stays down, seconds.
    #[arg(long, default_value_t = 8)]
    pub backend_down_secs: u64,
    /// How long the garbage server stands in for a backend, seconds.
    #[arg(long, default_value_t = 10)]
    pub garbage_secs: u64,
    /// How long the database stays locked, seconds (serve's busy timeout is 5 s).
    #[arg(long, default_value_t = 8)]
    pub db_lock_secs: u64,
    /// How long the data disk stays full, seconds.
    #[arg(long, default_value_t = 8)]
    pub disk_full_secs: u64,
    /// How long serve stays down after its SIGKILL, seconds.
    #[arg(long, default_value_t = 2)]
    pub serve_down_secs: u64,
    /// Size of the tmpfs mounted as the data disk (MiB; needs root for `mount`).
    #[arg(long, default_value_t = 64)]
    pub disk_mib: u64,
    /// Fairness window, seconds.
    #[arg(long, default_value_t = 30)]
    pub window_secs: u64,
    /// After the run: how long jobs may take to end before they count as stuck
    /// (default: every attempt's start and job timeouts plus the grace and a reconcile).
    #[arg(long)]
    pub drain_secs: Option<u64>,
    /// Seed of the participants' behaviour.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    #[arg(long, default_value = "target/release/comfyume-sim")]
    pub sim_bin: PathBuf,
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
    /// Keep the run's directory (logs of serve and the simulators) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

impl Args {
    fn hang(&self) -> u64 {
        self.hang_secs.unwrap_or(
            self.job_timeout
                .max(self.start_timeout)
                .max(REQUEST_TIMEOUT_S)
                + 5,
        )
    }

    fn drain(&self) -> u64 {
        self.drain_secs.unwrap_or(
            u64::from(self.max_attempts)
                * (self.start_timeout + self.job_timeout + STOP_GRACE_S + REQUEST_TIMEOUT_S)
                + RECONCILE_S
                + 30,
        )
    }

    fn length(&self, k: FaultKind) -> u64 {
        match k {
            FaultKind::DropWebsocket => 1,
            FaultKind::KillBackend => self.backend_down_secs,
            FaultKind::HangBackend => self.hang(),
            FaultKind::GarbageBackend => self.garbage_secs,
            FaultKind::DbLock => self.db_lock_secs,
            FaultKind::DiskFull => self.disk_full_secs,
            FaultKind::KillServe => self.serve_down_secs,
        }
    }

    fn fault_list(&self) -> Result<Vec<FaultKind>> {
        match self.faults.trim() {
            "all" => Ok(FaultKind::ALL.to_vec()),
            "none" | "" => Ok(Vec::new()),
            list => {
                let mut out = Vec::new();
                for key in list.split(',').map(str::trim) {
                    let k = FaultKind::ALL
                        .into_iter()
                        .find(|k| k.key() == key)
                        .with_context(|| format!("unknown fault {key:?}"))?;
                    out.push(k);
                }
                out.sort();
                out.dedup();
                Ok(out)
            }
        }
    }
}

/// What a scripted fault did.
#[derive(Debug, Clone)]
struct FaultRecord {
    kind: FaultKind,
    /// Seconds after the run's start.
    at_s: f64,
    length_s: f64,
    started_ms: i64,
    detail: String,
    /// Why it could not be run here.
    skipped: Option<String>,
}

/// What the faults act on.
struct Rig {
    client: reqwest::Client,
    sims: Vec<SimProc>,
    serve: ServeCtl,
    data: PathBuf,
    tmpfs: Option<Tmpfs>,
    tmpfs_refused: Option<String>,
    /// The simulator the previous fault hit.
    last_hit: Option<usize>,
}

impl Rig {
    /// A simulator running a job now (waiting up to 10 s for one), else the
    /// `fallback`-th; with `busy` false, one that is idle if there is one. The
    /// one the previous fault hit is taken only if no other fits: serve passes
    /// over a backend that just failed, so a fault there would meet no traffic.
    async fn pick(&mut self, busy: bool, fallback: usize) -> (usize, Option<String>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let n = self.sims.len();
        let chosen = loop {
            let mut idle = None;
            let mut found = None;
            for (i, s) in self.sims.iter().enumerate() {
                if !s.running() {
                    continue;
                }
                let again = self.last_hit == Some(i) && n > 1;
                match s.current_job(&self.client).await {
                    Some(job) if busy && (!again || found.is_none()) => {
                        found = Some((i, Some(job)));
                        if !again {
                            break;
                        }
                    }
                    None if !busy && (!again || idle.is_none()) => {
                        idle = Some(i);
                        if !again {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            if let Some(f) = found {
                break f;
            }
            if let Some(i) = idle {
                break (i, None);
            }
            if Instant::now() > deadline {
                break (fallback % n, None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.last_hit = Some(chosen.0);
        chosen
    }

    async fn inject(&mut self, step: &Step, index: usize) -> Result<(String, Option<String>)> {
        let len = step.length;
        let on = |i: usize, job: &Option<String>| match job {
            Some(j) => format!("sim{} (running job {})", i + 1, short(j)),
            None => format!("sim{} (no job running)", i + 1),
        };
        Ok(match step.kind {
            FaultKind::DropWebsocket => {
                let (i, job) = self.pick(true, index).await;
                self.sims[i]
                    .fault(&self.client, json!({"fault": "drop_websocket"}))
                    .await?;
                tokio::time::sleep(len).await;
                (
                    format!("{}: its WebSocket connections cut", on(i, &job)),
                    None,
                )
            }
            FaultKind::KillBackend => {
                let (i, job) = self.pick(true, index).await;
                self.sims[i].kill().await;
                tokio::time::sleep(len).await;
                self.sims[i].start(&self.client).await?;
                (
                    format!(
                        "{} SIGKILLed, restarted after {} s",
                        on(i, &job),
                        len.as_secs()
                    ),
                    None,
                )
            }
            FaultKind::HangBackend => {
                let (i, job) = self.pick(true, index).await;
                self.sims[i]
                    .fault(&self.client, json!({"fault": "hang"}))
                    .await?;
                tokio::time::sleep(len).await;
                self.sims[i]
                    .fault(&self.client, json!({"fault": "clear"}))
                    .await?;
                (
                    format!(
                        "{} hung (connections accepted, nothing answered or run) for {} s",
                        on(i, &job),
                        len.as_secs()
                    ),
                    None,
                )
            }
            FaultKind::GarbageBackend => {
                let (i, job) = self.pick(false, index).await;
                self.sims[i].kill().await;
                let g = Garbage::start(self.sims[i].port).await?;
                tokio::time::sleep(len).await;
                let n = g.stop().await;
                self.sims[i].start(&self.client).await?;
                (
                    format!(
                        "{} replaced by a server answering garbage for {} s ({n} requests answered)",
                        on(i, &job),
                        len.as_secs()
                    ),
                    None,
                )
            }
            FaultKind::DbLock => {
                let lock = DbLock::take(&self.data.join("comfyume.db"), len).await?;
                lock.release(len + Duration::from_secs(30)).await?;
                (
                    format!("BEGIN EXCLUSIVE held by python3 for {} s", len.as_secs()),
                    None,
                )
            }
            FaultKind::DiskFull => {
                let Some(t) = &self.tmpfs else {
                    return Ok((
                        String::new(),
                        Some(format!(
                            "not runnable here: {}",
                            self.tmpfs_refused.clone().unwrap_or_default()
                        )),
                    ));
                };
                let filler = self.data.join("filler.bin");
                let n = procs::fill_disk(&filler).await?;
                tokio::time::sleep(len).await;
                std::fs::remove_file(&filler)?;
                (
                    format!(
                        "the {} MiB tmpfs data disk filled ({:.1} MiB written) for {} s",
                        t.mib,
                        n as f64 / 1048576.0,
                        len.as_secs()
                    ),
                    None,
                )
            }
            FaultKind::KillServe => {
                self.serve.kill().await;
                tokio::time::sleep(len).await;
                let t = Instant::now();
                self.serve.restart().await?;
                (
                    format!(
                        "SIGKILLed; restarted on the same port and data after {} s (listening {:.0} ms after spawn)",
                        len.as_secs(),
                        t.elapsed().as_secs_f64() * 1000.0
                    ),
                    None,
                )
            }
        })
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

/// The script: each fault at its moment.
async fn drive_faults(mut rig: Rig, steps: Vec<Step>, t0: Instant) -> (Rig, Vec<FaultRecord>) {
    let mut out = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        tokio::time::sleep_until((t0 + step.at).into()).await;
        let started = Instant::now();
        let started_ms = epoch_ms();
        eprintln!(
            "[workshop] {:>6.1} s  fault: {}",
            t0.elapsed().as_secs_f64(),
            step.kind.name()
        );
        let (detail, skipped) = match rig.inject(step, i).await {
            Ok(r) => r,
            Err(e) => (format!("the fault itself failed: {e:#}"), None),
        };
        out.push(FaultRecord {
            kind: step.kind,
            at_s: (started - t0).as_secs_f64(),
            length_s: started.elapsed().as_secs_f64(),
            started_ms,
            detail,
            skipped,
        });
    }
    (rig, out)
}

/// A job as the server reports it at the end.
#[derive(Debug, Clone)]
struct FinalJob {
    id: String,
    user: String,
    status: String,
    reason: Option<String>,
    created_ms: i64,
    ended_ms: Option<i64>,
    /// For completed jobs: (files named, files fetched).
    outputs: (usize, usize),
}

/// ComfyUI's `execution_error` of a job detail, as "type: message".
fn failure_reason(job: &Value) -> Option<String> {
    let msgs = job["execution_status"]["messages"].as_array()?;
    let err = msgs.iter().rev().find_map(|m| {
        let a = m.as_array()?;
        matches!(
            a.first()?.as_str()?,
            "execution_error" | "execution_interrupted"
        )
        .then(|| (a[0].as_str().unwrap_or("").to_string(), a.get(1).cloned()))
    })?;
    let data = err.1.unwrap_or(Value::Null);
    if err.0 == "execution_interrupted" {
        return Some("interrupted".into());
    }
    Some(format!(
        "{}: {}",
        data["exception_type"].as_str().unwrap_or("?"),
        data["exception_message"].as_str().unwrap_or("?").trim()
    ))
}

/// Every job of every participant, waiting until none is pending or running
/// (or `bound` passes); then each one's detail and its files through /api/view.
async fn final_sweep(
    client: &reqwest::Client,
    base: &str,
    users: &[(String, String)],
    bound: Duration,
) -> Result<(Vec<FinalJob>, Duration)> {
    let mut cookies = Vec::new();
    for (u, p) in users {
        cookies.push(common::login(client, base, u, p).await?);
    }
    let list = |u: &str, c: &str| {
        let (u, c) = (u.to_string(), c.to_string());
        async move {
            let r = client
                .get(format!("{base}/{u}/api/jobs"))
                .header("cookie", c)
                .timeout(Duration::from_secs(30))
                .send()
                .await?
                .error_for_status()?;
            let v: Value = r.json().await?;
            Ok::<_, anyhow::Error>(v["jobs"].as_array().cloned().unwrap_or_default())
        }
    };
    let started = Instant::now();
    let deadline = started + bound;
    loop {
        let mut open = 0;
        for ((u, _), c) in users.iter().zip(&cookies) {
            open += list(u, c)
                .await?
                .iter()
                .filter(|j| !participant::is_terminal(j["status"].as_str().unwrap_or("")))
                .count();
        }
        if open == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let drained = started.elapsed();
    let mut out = Vec::new();
    for ((u, _), c) in users.iter().zip(&cookies) {
        for j in list(u, c).await? {
            let id = j["id"].as_str().unwrap_or_default().to_string();
            let status = j["status"].as_str().unwrap_or("?").to_string();
            let detail: Value = client
                .get(format!("{base}/{u}/api/jobs/{id}"))
                .header("cookie", c)
                .timeout(Duration::from_secs(30))
                .send()
                .await?
                .json()
                .await?;
            let mut outputs = (0, 0);
            if status == "completed" {
                for (name, sub, kind) in participant::output_files(&detail["outputs"]) {
                    outputs.0 += 1;
                    let r = client
                        .get(format!("{base}/{u}/api/view"))
                        .query(&[("filename", &name), ("subfolder", &sub), ("type", &kind)])
                        .header("cookie", c)
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await;
                    if let Ok(r) = r
                        && r.status() == 200
                        && r.bytes().await.is_ok_and(|b| !b.is_empty())
                    {
                        outputs.1 += 1;
                    }
                }
            }
            out.push(FinalJob {
                reason: failure_reason(&detail),
                created_ms: j["create_time"].as_i64().unwrap_or(0),
                ended_ms: j["execution_end_time"]
                    .as_i64()
                    .filter(|_| participant::is_terminal(&status)),
                id,
                user: u.clone(),
                status,
                outputs,
            });
        }
    }
    Ok((out, drained))
}

/// WARN and ERROR lines of serve's logs, counted by message.
fn log_summary(logs: &[PathBuf]) -> (usize, usize, BTreeMap<String, usize>) {
    let (mut warn, mut error) = (0, 0);
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for p in logs {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        for line in text.lines() {
            if let Some((level, msg)) = analysis::log_message(line) {
                match level.as_str() {
                    "WARN" => warn += 1,
                    "ERROR" => error += 1,
                    _ => continue,
                }
                *by.entry(format!("{level} {msg}")).or_default() += 1;
            }
        }
    }
    (warn, error, by)
}

fn pct(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub async fn run(args: Args) -> Result<()> {
    // Ctrl-C or SIGTERM ends the run with every child killed and the tmpfs unmounted.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = run_inner(args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    }
}

async fn run_inner(a: Args) -> Result<()> {
    let bin = common::absolute(&a.bin)?;
    let sim_bin = common::absolute(&a.sim_bin)
        .context("build it with cargo build --release -p comfyume-sim")?;
    let frontend = common::absolute(&a.frontend)
        .context("install it with scripts/install-frontend.sh target/test-data")?;
    if a.participants == 0 || a.sims == 0 {
        bail!("--participants and --sims must be at least 1");
    }
    let run = Duration::from_secs(a.duration);
    let faults = a.fault_list()?;
    let steps = plan::schedule(
        run,
        &faults
            .iter()
            .map(|&k| (k, Duration::from_secs(a.length(k))))
            .collect::<Vec<_>>(),
    )
    .map_err(anyhow::Error::msg)?;
    let client = common::http_client()?;
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();

    let dir = tempfile::Builder::new()
        .prefix("comfyume-workshop-")
        .tempdir()?;
    let root = dir.path().to_path_buf();
    let data = root.join("data");
    let (tmpfs, tmpfs_refused) = if faults.contains(&FaultKind::DiskFull) {
        match Tmpfs::mount(&data, a.disk_mib) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    eprintln!(
        "[workshop] run directory {} (data disk: {})",
        root.display(),
        match &tmpfs {
            Some(t) => format!("tmpfs of {} MiB", t.mib),
            None => "the machine's disk".into(),
        }
    );
    let users = common::create_workshop(&bin, &data, a.participants).await?;

    let mut sims = Vec::new();
    for i in 0..a.sims {
        let mut s = SimProc::new(i, &sim_bin, &root.join(format!("sim{}", i + 1)), a.step_ms)?;
        s.start(&client).await?;
        sims.push(s);
    }
    let urls: Vec<String> = sims.iter().map(SimProc::url).collect();
    let env: Vec<(&'static str, String)> = vec![
        ("INFERENCE_MODE", "local".into()),
        ("COMFYUI_URLS", urls.join(",")),
        ("JOB_TIMEOUT", a.job_timeout.to_string()),
        ("JOB_START_TIMEOUT", a.start_timeout.to_string()),
        ("MAX_ATTEMPTS", a.max_attempts.to_string()),
        (
            "MAX_QUEUE_DEPTH",
            (a.participants * a.burst_max as usize * 2)
                .max(100)
                .to_string(),
        ),
        ("RUST_LOG", "info".into()),
    ];
    let serve = ServeCtl::start(&bin, &data, &frontend, env).await?;
    let addr: std::net::SocketAddr = serve.listen.parse()?;
    let base = serve.base();

    // Serve's resident memory, sampled every second across restarts.
    let (stop_tx, stop_rx) = watch::channel(false);
    let rss_peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (pid, peak, mut stop) = (serve.pid.clone(), rss_peak.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                let p = pid.load(Ordering::SeqCst);
                if p != 0
                    && let Ok(m) = common::mem_of(p)
                {
                    peak.fetch_max(m.rss_kib, Ordering::SeqCst);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    };

    let behaviour = Behaviour {
        think_min: Duration::from_secs(a.think_min),
        think_max: Duration::from_secs(a.think_max.max(a.think_min)),
        burst_max: a.burst_max,
        steps_min: a.steps_min,
        steps_max: a.steps_max.max(a.steps_min),
        close_tab_share: a.close_tab_share,
        nomodel_share: a.nomodel_share,
    };
    let shared = Arc::new(Shared {
        client: client.clone(),
        addr,
        ledger: Mutex::new(Default::default()),
        stop: stop_rx.clone(),
        wait_limit: Duration::from_secs(a.drain()),
    });
    let t0 = Instant::now();
    let run_start_ms = epoch_ms();
    eprintln!(
        "[workshop] {} participants, {} simulators, {} s; faults: {}",
        a.participants,
        a.sims,
        a.duration,
        steps
            .iter()
            .map(|s| format!("{} at {} s", s.kind.key(), s.at.as_secs()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Sign-ins spread over the first seconds, as a room arrives.
    let arrive = Duration::from_secs(5).min(run / 20);
    let mut people = Vec::new();
    for (i, (u, p)) in users.iter().enumerate() {
        let who = Participant::new(shared.clone(), u.clone(), p.clone());
        let day = Day::new(a.seed, i, behaviour);
        let after = arrive.mul_f64(i as f64 / a.participants as f64);
        people.push(tokio::spawn(async move { who.day(day, after).await }));
    }
    let rig = Rig {
        client: client.clone(),
        sims,
        serve,
        data: data.clone(),
        tmpfs,
        tmpfs_refused,
        last_hit: None,
    };
    let script = tokio::spawn(drive_faults(rig, steps, t0));
    tokio::time::sleep_until((t0 + run).into()).await;
    let _ = stop_tx.send(true);
    let run_end_ms = epoch_ms();
    eprintln!("[workshop] submissions stopped; waiting for the participants' last jobs");
    let (rig, records) = script.await.context("the fault script crashed")?;
    let mut participant_errors = Vec::new();
    for p in people {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => participant_errors.push(format!("{e:#}")),
            Err(e) => participant_errors.push(format!("participant task: {e}")),
        }
    }
    let wall = t0.elapsed();

    // Every job the server knows, once nothing is pending or running any more.
    let drain = Duration::from_secs(a.drain());
    eprintln!(
        "[workshop] reading every job back (jobs not ended within {} s count as stuck)",
        drain.as_secs()
    );
    let (jobs, drained) = final_sweep(&client, &base, &users, drain).await?;
    let Rig {
        mut sims,
        serve,
        tmpfs,
        ..
    } = rig;
    let rss_end = serve.rss_kib();
    let _ = sampler.await;
    let serve_logs = serve.logs.clone();
    let restarts = serve.restarts;
    let (cpu_ms, hwm_kib) = serve.totals();
    serve.stop().await;
    for s in &mut sims {
        s.stop().await;
    }

    // How often each job reached a backend and ran there.
    let mut sim_logs = Vec::new();
    let mut killed = HashMap::new();
    for s in &sims {
        for (inc, log) in s.logs.iter().enumerate() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            sim_logs.push(((s.index, inc), analysis::parse_sim_log(&text)));
        }
        for &(inc, at) in &s.killed {
            killed.insert((s.index, inc), at);
        }
    }
    let on_backends = analysis::executions(&sim_logs, &killed);

    let ledger = std::mem::take(&mut *shared.ledger.lock().unwrap_or_else(|p| p.into_inner()));
    let report = Report::build(
        &a,
        &ledger,
        &jobs,
        &on_backends,
        &records,
        Measures {
            wall,
            drained,
            run_start_ms,
            run_end_ms,
            cpu_ms,
            hwm_kib,
            rss_peak_kib: rss_peak.load(Ordering::SeqCst),
            rss_end_kib: rss_end,
            restarts,
            load_at_start,
            serve_logs: log_summary(&serve_logs),
            participant_errors,
        },
    );
    report.print(&root);
    // Unmounted once nothing runs there any more.
    drop(tmpfs);
    if report.violations.is_empty() && !a.keep {
        dir.close()?;
    } else {
        let kept = dir.keep();
        eprintln!("[workshop] logs kept in {}", kept.display());
    }
    if !report.violations.is_empty() {
        bail!("{}", report.violations.join("; "));
    }
    Ok(())
}

struct Measures {
    wall: Duration,
    drained: Duration,
    run_start_ms: i64,
    run_end_ms: i64,
    cpu_ms: f64,
    hwm_kib: u64,
    rss_peak_kib: u64,
    rss_end_kib: Option<u64>,
    restarts: usize,
    load_at_start: String,
    serve_logs: (usize, usize, BTreeMap<String, usize>),
    participant_errors: Vec<String>,
}

struct Report {
    rows: Vec<Vec<String>>,
    fault_rows: Vec<Vec<String>>,
    reason_rows: Vec<Vec<String>>,
    failed_rows: Vec<Vec<String>>,
    log_rows: Vec<Vec<String>>,
    header: String,
    summary: Value,
    violations: Vec<String>,
}

impl Report {
    fn build(
        a: &Args,
        l: &participant::Ledger,
        jobs: &[FinalJob],
        on_backends: &BTreeMap<String, analysis::JobOnBackends>,
        records: &[FaultRecord],
        m: Measures,
    ) -> Report {
        let known: HashMap<&str, &FinalJob> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        let acked: HashSet<&str> = l.acked.iter().map(|x| x.id.as_str()).collect();
        let lost: Vec<String> = l
            .acked
            .iter()
            .filter(|x| !known.contains_key(x.id.as_str()))
            .map(|x| {
                format!(
                    "{} of {} (accepted at {:.1} s)",
                    x.id,
                    x.user,
                    (x.at_ms - m.run_start_ms) as f64 / 1000.0
                )
            })
            .collect();
        let stuck: Vec<&FinalJob> = jobs
            .iter()
            .filter(|j| !participant::is_terminal(&j.status))
            .collect();
        let outputs_lost: Vec<&FinalJob> = jobs
            .iter()
            .filter(|j| j.status == "completed" && (j.outputs.0 == 0 || j.outputs.1 < j.outputs.0))
            .collect();
        let unexplained: Vec<&FinalJob> = jobs
            .iter()
            .filter(|j| j.status == "failed" && j.reason.is_none())
            .collect();
        let twice: Vec<(String, String)> = on_backends
            .iter()
            .filter_map(|(id, b)| analysis::run_twice(b).map(|why| (id.clone(), why)))
            .collect();
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for j in jobs {
            *states.entry(j.status.clone()).or_default() += 1;
            if j.status != "completed" {
                let r = j.reason.clone().unwrap_or_else(|| j.status.clone());
                *reasons
                    .entry(format!("{}: {}", j.status, analysis::reason_kind(&r)))
                    .or_default() += 1;
            }
        }
        let unacked = jobs
            .iter()
            .filter(|j| !acked.contains(j.id.as_str()))
            .count();
        let mut posts: BTreeMap<usize, usize> = BTreeMap::new();
        let mut execs: BTreeMap<usize, usize> = BTreeMap::new();
        for j in jobs {
            let b = on_backends.get(&j.id);
            *posts.entry(b.map_or(0, |b| b.posts)).or_default() += 1;
            *execs
                .entry(b.map_or(0, |b| b.executions.len()))
                .or_default() += 1;
        }

        // Latency of participant requests, all and per kind.
        let all: Vec<Duration> = l.latency.iter().map(|(_, d)| *d).collect();
        let s_all = common::summarize(&all);
        let mut per_kind = BTreeMap::new();
        for k in [
            Kind::Login,
            Kind::Page,
            Kind::Api,
            Kind::Submit,
            Kind::Job,
            Kind::View,
        ] {
            let v: Vec<Duration> = l
                .latency
                .iter()
                .filter(|(kk, _)| *kk == k)
                .map(|(_, d)| *d)
                .collect();
            per_kind.insert(k, common::summarize(&v));
        }
        let errors: usize = l.errors.values().sum();

        // Fairness: jobs completed per participant per window.
        let spans: Vec<JobSpan> = jobs
            .iter()
            .map(|j| JobSpan {
                user: j.user.clone(),
                created_ms: j.created_ms,
                ended_ms: j.ended_ms,
                succeeded: j.status == "completed",
            })
            .collect();
        let windows = analysis::fairness(
            &spans,
            m.run_start_ms,
            m.run_end_ms,
            (a.window_secs * 1000) as i64,
        );
        let min_mean = |v: &[f64]| {
            let min = v.iter().copied().fold(f64::NAN, f64::min);
            // NaN (null in the JSON) without any window.
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            (min, mean, v.len())
        };
        let jains: Vec<f64> = windows.iter().filter_map(|w| w.jain).collect();
        let (jain_min, jain_mean, _) = min_mean(&jains);
        let busy_jains: Vec<f64> = windows.iter().filter_map(|w| w.jain_backlogged).collect();
        let (busy_min, busy_mean, busy_n) = min_mean(&busy_jains);
        let r3 = |v: f64| {
            if v.is_nan() {
                Value::Null
            } else {
                json!((v * 1000.0).round() / 1000.0)
            }
        };

        let mut violations = Vec::new();
        if !lost.is_empty() {
            violations.push(format!("{} accepted jobs lost: {:?}", lost.len(), lost));
        }
        if !twice.is_empty() {
            violations.push(format!("{} jobs run twice: {:?}", twice.len(), twice));
        }
        if !stuck.is_empty() {
            violations.push(format!(
                "{} jobs stuck: {:?}",
                stuck.len(),
                stuck.iter().map(|j| (&j.id, &j.status)).collect::<Vec<_>>()
            ));
        }
        if !unexplained.is_empty() {
            violations.push(format!(
                "{} jobs failed without a reason: {:?}",
                unexplained.len(),
                unexplained.iter().map(|j| &j.id).collect::<Vec<_>>()
            ));
        }
        if !outputs_lost.is_empty() {
            violations.push(format!(
                "{} succeeded jobs with outputs missing: {:?}",
                outputs_lost.len(),
                outputs_lost
                    .iter()
                    .map(|j| (&j.id, j.outputs))
                    .collect::<Vec<_>>()
            ));
        }

        let cpu_s = m.cpu_ms / 1000.0;
        let cpu_pct = m.cpu_ms / m.wall.as_secs_f64().max(0.001) / 10.0;
        let mib = |k: u64| k as f64 / 1024.0;
        let n = |v: usize| v.to_string();
        let rows = vec![
            vec![
                "jobs accepted (200 with a prompt_id)".into(),
                n(l.acked.len()),
                String::new(),
            ],
            vec![
                "  + jobs the server has that no participant saw accepted".into(),
                n(unacked),
                format!(
                    "{} tabs closed right after Run, {} submissions cut",
                    l.closed_tab,
                    l.ambiguous.len()
                ),
            ],
            vec![
                "end states (completed / failed / cancelled)".into(),
                format!(
                    "{} / {} / {}",
                    states.get("completed").unwrap_or(&0),
                    states.get("failed").unwrap_or(&0),
                    states.get("cancelled").unwrap_or(&0)
                ),
                "every job ends, failures with a reason".into(),
            ],
            vec!["jobs lost".into(), n(lost.len()), "0".into()],
            vec!["jobs run twice".into(), n(twice.len()), "0".into()],
            vec![
                format!("jobs stuck (not ended {} s after the run)", a.drain()),
                n(stuck.len()),
                "0".into(),
            ],
            vec![
                "outputs lost (succeeded, not fetchable)".into(),
                n(outputs_lost.len()),
                "0".into(),
            ],
            vec![
                "POST /prompt accepted by backends per job".into(),
                fmt_hist(&posts),
                "count: jobs".into(),
            ],
            vec![
                "executions on backends per job".into(),
                fmt_hist(&execs),
                "count: jobs".into(),
            ],
            vec![
                "submissions refused (status type: n)".into(),
                fmt_map(&l.refused),
                "a clear error, never a 200 that is lost".into(),
            ],
            vec![
                "participant requests p50 / p99".into(),
                format!(
                    "{} / {} ms",
                    common::ms(s_all.p50_us),
                    common::ms(s_all.p99_us)
                ),
                format!(
                    "{} requests answered, {errors} unanswered (server away)",
                    s_all.n
                ),
            ],
            vec![
                "  POST /api/prompt p50 / p99".into(),
                format!(
                    "{} / {} ms",
                    common::ms(per_kind[&Kind::Submit].p50_us),
                    common::ms(per_kind[&Kind::Submit].p99_us)
                ),
                format!("{} answered", per_kind[&Kind::Submit].n),
            ],
            vec![
                "job ends seen on the WebSocket / by re-reading".into(),
                format!("{} / {}", l.ended_ws.len(), l.ended_resync.len()),
                format!(
                    "{} socket connects, {} drops; {} jobs waited out by participants",
                    l.ws_connects,
                    l.ws_drops,
                    l.gave_up.len()
                ),
            ],
            vec![
                "outputs fetched during the run".into(),
                n(l.outputs_fetched),
                format!("{} not fetchable at the time", l.output_misses.len()),
            ],
            vec![
                format!(
                    "Jain's index of jobs done per participant per {} s window (min / mean)",
                    a.window_secs
                ),
                fmt_min_mean(jain_min, jain_mean),
                format!(
                    "{} windows; among participants with a job waiting or running",
                    jains.len()
                ),
            ],
            vec![
                "  the same among participants waiting all through the window".into(),
                fmt_min_mean(busy_min, busy_mean),
                format!("{busy_n} windows with two or more of them"),
            ],
            vec![
                "serve RSS peak (sampled 1/s) / VmHWM / at the end".into(),
                format!(
                    "{:.1} / {:.1} / {} MiB",
                    mib(m.rss_peak_kib),
                    mib(m.hwm_kib),
                    m.rss_end_kib
                        .map_or("-".into(), |k| format!("{:.1}", mib(k)))
                ),
                format!("over {} starts", m.restarts + 1),
            ],
            vec![
                "serve CPU".into(),
                format!("{cpu_s:.1} s"),
                format!(
                    "{:.1} % of one core over {:.0} s",
                    cpu_pct,
                    m.wall.as_secs_f64()
                ),
            ],
        ];
        let fault_rows = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let until = records.get(i + 1).map_or(i64::MAX, |n| n.started_ms);
                let failed: Vec<&FinalJob> = jobs
                    .iter()
                    .filter(|j| {
                        j.status != "completed"
                            && j.ended_ms.is_some_and(|e| e >= r.started_ms && e < until)
                    })
                    .collect();
                let mut why: BTreeMap<String, usize> = BTreeMap::new();
                for j in &failed {
                    *why.entry(j.reason.clone().unwrap_or_default()).or_default() += 1;
                }
                vec![
                    r.kind.name().to_string(),
                    format!("{:.0}", r.at_s),
                    format!("{:.0}", r.length_s),
                    r.skipped.clone().unwrap_or_else(|| r.detail.clone()),
                    if r.skipped.is_some() {
                        "-".into()
                    } else {
                        format!(
                            "{}{}",
                            failed.len(),
                            if why.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", fmt_map(&why))
                            }
                        )
                    },
                ]
            })
            .collect();
        let reason_rows = reasons
            .iter()
            .map(|(r, c)| vec![r.clone(), c.to_string()])
            .collect();
        let failed_rows = jobs
            .iter()
            .filter(|j| j.status != "completed")
            .take(40)
            .map(|j| {
                vec![
                    j.id.clone(),
                    j.user.clone(),
                    j.status.clone(),
                    format!(
                        "{:.1}",
                        (j.ended_ms.unwrap_or(0) - m.run_start_ms) as f64 / 1000.0
                    ),
                    l.retry_notices.get(&j.id).copied().unwrap_or(0).to_string(),
                    j.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let (warn, error, by) = &m.serve_logs;
        let mut top: Vec<(&String, &usize)> = by.iter().collect();
        top.sort_by(|x, y| y.1.cmp(x.1).then(x.0.cmp(y.0)));
        let log_rows = top
            .iter()
            .take(15)
            .map(|(msg, c)| vec![msg.to_string(), c.to_string()])
            .collect();

        let fairness = json!({
            "window_s": a.window_secs,
            "jain_min": r3(jain_min),
            "jain_mean": r3(jain_mean),
            "jain_backlogged_min": r3(busy_min),
            "jain_backlogged_mean": r3(busy_mean),
            "windows": windows.iter().map(|w| json!({
                "t_s": (w.start_ms - m.run_start_ms) / 1000, "active": w.active,
                "backlogged": w.backlogged, "done": w.done,
                "jain": w.jain.map(r3), "jain_backlogged": w.jain_backlogged.map(r3),
            })).collect::<Vec<_>>(),
        });
        let summary = json!({
            "bench": "workshop",
            "machine": common::machine(),
            "load_1m_at_start": m.load_at_start,
            "participants": a.participants,
            "duration_s": a.duration,
            "sims": a.sims,
            "step_ms": a.step_ms,
            "steps": [a.steps_min, a.steps_max],
            "seed": a.seed,
            "timeouts_s": {
                "job_timeout": a.job_timeout, "start_timeout": a.start_timeout,
                "backend_request": REQUEST_TIMEOUT_S, "stop_grace": STOP_GRACE_S,
                "reconcile": RECONCILE_S, "max_attempts": a.max_attempts,
            },
            "faults": records.iter().map(|r| json!({
                "fault": r.kind.key(), "at_s": pct(r.at_s), "length_s": pct(r.length_s),
                "ran": r.skipped.is_none(), "detail": r.skipped.clone().unwrap_or_else(|| r.detail.clone()),
            })).collect::<Vec<_>>(),
            "accepted": l.acked.len(),
            "unacknowledged_jobs": unacked,
            "closed_tab_clicks": l.closed_tab,
            "cut_submissions": l.ambiguous.len(),
            "refused": l.refused,
            "end_states": states,
            "reasons": reasons,
            "lost": lost.len(),
            "run_twice": twice.len(),
            "run_twice_jobs": twice.iter().map(|(id, why)| json!({"id": id, "why": why})).collect::<Vec<_>>(),
            "stuck": stuck.len(),
            "outputs_lost": outputs_lost.len(),
            "failed_without_reason": unexplained.len(),
            "posts_per_job": posts.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "executions_per_job": execs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "requests": s_all.json_ms(),
            "requests_by_kind": per_kind.iter().map(|(k, s)| (k.name().to_string(), s.json_ms())).collect::<serde_json::Map<_, _>>(),
            "requests_unanswered": errors,
            "ws": {"connects": l.ws_connects, "drops": l.ws_drops, "ends_seen": l.ended_ws.len(), "ends_reread": l.ended_resync.len()},
            "fairness": fairness,
            "serve": {
                "rss_peak_mib": pct(mib(m.rss_peak_kib)), "vmhwm_mib": pct(mib(m.hwm_kib)),
                "rss_end_mib": m.rss_end_kib.map(|k| pct(mib(k))),
                "cpu_s": pct(cpu_s), "cpu_pct_one_core": pct(cpu_pct), "starts": m.restarts + 1,
                "log_warn": warn, "log_error": error,
            },
            "wall_s": pct(m.wall.as_secs_f64()),
            "drain_s": pct(m.drained.as_secs_f64()),
            "participant_errors": m.participant_errors,
            "ok": violations.is_empty(),
        });
        let header = format!(
            "{} participants, {} simulators (step {} ms, {}-{} steps), {} s of submissions; JOB_TIMEOUT {} s, JOB_START_TIMEOUT {} s (configured), backend request {} s, stop grace {} s, reconcile {} s (production); load {} at start",
            a.participants,
            a.sims,
            a.step_ms,
            a.steps_min,
            a.steps_max,
            a.duration,
            a.job_timeout,
            a.start_timeout,
            REQUEST_TIMEOUT_S,
            STOP_GRACE_S,
            RECONCILE_S,
            m.load_at_start
        );
        Report {
            rows,
            fault_rows,
            reason_rows,
            failed_rows,
            log_rows,
            header,
            summary,
            violations,
        }
    }

    fn print(&self, root: &Path) {
        common::print_machine();
        println!("{}; run directory {}", self.header, root.display());
        common::print_table(
            "workshop: faults (failed jobs: those that ended between this fault and the next)",
            &["fault", "at s", "took s", "what", "jobs failed"],
            &self.fault_rows,
        );
        if !self.reason_rows.is_empty() {
            common::print_table(
                "workshop: jobs not completed, by reason",
                &["state: reason", "jobs"],
                &self.reason_rows,
            );
            common::print_table(
                "workshop: jobs not completed (first 40)",
                &[
                    "job",
                    "user",
                    "state",
                    "ended at s",
                    "retry notices",
                    "reason",
                ],
                &self.failed_rows,
            );
        }
        if !self.log_rows.is_empty() {
            common::print_table(
                "workshop: serve's WARN and ERROR log lines",
                &["message", "lines"],
                &self.log_rows,
            );
        }
        common::print_table("workshop", &["figure", "value", "goal / note"], &self.rows);
        println!("{}", self.summary);
    }
}

fn fmt_min_mean(min: f64, mean: f64) -> String {
    if min.is_nan() {
        return "-".into();
    }
    format!("{min:.3} / {mean:.3}")
}

fn fmt_hist(h: &BTreeMap<usize, usize>) -> String {
    h.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_map(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}
