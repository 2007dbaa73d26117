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
mod report;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::common;
use participant::{Participant, Shared};
use plan::{Behaviour, Day, FaultKind, Step};
use procs::{DbLock, Garbage, ServeCtl, SimProc, Tmpfs, epoch_ms};
use report::{Measures, Report};

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
            // An idle pick ends the process (garbage_backend): only once the simulator has
            // been quiet for a while, or a job it finished a moment ago would lose its
            // results while serve still collects them, and its re-run elsewhere would count
            // as a job run twice (seen once in CI, RELIABILITY R4).
            if let Some(i) = idle
                && self.sims[i]
                    .settled(&self.client, Duration::from_millis(1500))
                    .await
            {
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
