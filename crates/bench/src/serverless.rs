//! `serverless`: the worker path measured against the local path, in one run.
//!
//! 1. Added latency per job: the same jobs, one at a time, through `comfyume serve`
//!    to a simulator (INFERENCE_MODE=local) and through `comfyume serve` to the
//!    provider emulator (`comfyume-provider`) in front of one warm `comfyume-worker`
//!    replica with its own simulator (INFERENCE_MODE=serverless).
//! 2. Replicas kept busy under a backlog: R warm replicas, a backlog of jobs; the
//!    share of the replicas' time spent executing jobs.
//! 3. A spot eviction mid-job: the time from the eviction to the job's
//!    `execution_start` on the failover endpoint, as the participant's socket shows it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::common::{self, Serve, Ws};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Jobs per path for the latency comparison.
    #[arg(long, default_value_t = 100)]
    pub jobs: usize,
    /// Replicas for the backlog run.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Jobs in the backlog.
    #[arg(long, default_value_t = 30)]
    pub backlog: usize,
    /// Time one backlog job takes (10 sampler steps).
    #[arg(long, default_value_t = 500)]
    pub job_ms: u64,
    /// Spot evictions measured.
    #[arg(long, default_value_t = 5)]
    pub evictions: usize,
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    #[arg(long, default_value = "target/release/comfyume-provider")]
    pub provider: PathBuf,
    #[arg(long, default_value = "target/release/comfyume-worker")]
    pub worker: PathBuf,
    #[arg(long, default_value = "target/release/comfyume-sim")]
    pub sim: PathBuf,
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
}

/// The emulator process and the replicas it started (one process group).
struct Provider {
    child: tokio::process::Child,
    url: String,
}

impl Provider {
    async fn start(a: &Args, deployments: &[&str], step_ms: u64) -> Result<Provider> {
        let mut cmd = tokio::process::Command::new(common::absolute(&a.provider)?);
        cmd.args(["--listen", "127.0.0.1:0", "--health-interval-ms", "100"])
            .arg("--worker-bin")
            .arg(common::absolute(&a.worker)?)
            .arg("--sim-bin")
            .arg(common::absolute(&a.sim)?)
            .args(["--step-ms", &step_ms.to_string()]);
        for d in deployments {
            cmd.args(["--deployment", d]);
        }
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting comfyume-provider")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the emulator did not start")??
            .context("the emulator exited")?;
        let url = first
            .strip_prefix("comfyume-provider listening on ")
            .context("unexpected first line")?
            .to_owned();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Provider { child, url })
    }

    /// Waits until `n` replicas of `dep` answer ready.
    async fn ready(&self, client: &reqwest::Client, dep: &str, n: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st: Value = client
                .get(format!("{}/_emulator/state", self.url))
                .send()
                .await?
                .json()
                .await?;
            let ready = st["deployments"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["name"] == dep)
                .flat_map(|d| d["replicas"].as_array().cloned().unwrap_or_default())
                .filter(|r| r["health"] == "ready")
                .count();
            if ready >= n {
                return Ok(());
            }
            common::check_deadline(deadline, "waiting for warm replicas")?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status()
                .await;
        }
        let _ = self.child.wait().await;
    }
}

/// serve's settings for the emulator's deployments (`(variable, deployment)`).
fn serverless_env(
    p: &Provider,
    endpoints: &[(&str, &str)],
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("INFERENCE_MODE", "serverless".to_owned()),
        ("VERDA_API_URL", format!("{}/v1", p.url)),
        ("VERDA_CLIENT_ID", "emulator-client".into()),
        ("VERDA_CLIENT_SECRET", "emulator-secret".into()),
        ("SERVERLESS_POLL_SECS", "5".into()),
        ("SERVERLESS_FAIL_THRESHOLD", "1000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (var, dep) in endpoints {
        env.push((var.to_string(), format!("{}/{dep}", p.url)));
    }
    for (k, v) in extra {
        env.push((k.to_string(), v.clone()));
    }
    env
}

/// A participant signed in, with one socket.
struct Participant {
    user: String,
    cookie: String,
    ws: Ws,
}

async fn participants(
    client: &reqwest::Client,
    serve: &Serve,
    users: &[(String, String)],
) -> Result<Vec<Participant>> {
    let mut out = Vec::new();
    for (u, p) in users {
        let cookie = common::login(client, &serve.base, u, p).await?;
        let ws = common::ws_connect(
            &format!("ws://{}/{u}/ws?clientId=tab-{u}", serve.addr),
            &[("cookie", cookie.clone())],
        )
        .await?;
        out.push(Participant {
            user: u.clone(),
            cookie,
            ws,
        });
    }
    Ok(out)
}

async fn submit(
    client: &reqwest::Client,
    serve: &Serve,
    p: &Participant,
    prompt: Value,
) -> Result<String> {
    let r = client
        .post(format!("{}/{}/api/prompt", serve.base, p.user))
        .header("cookie", &p.cookie)
        .header("content-type", "application/json")
        .body(json!({"client_id": format!("tab-{}", p.user), "prompt": prompt}).to_string())
        .send()
        .await?;
    if r.status() != 200 {
        bail!("POST /api/prompt: {} {}", r.status(), r.text().await?);
    }
    let v: Value = r.json().await?;
    Ok(v["prompt_id"].as_str().context("no prompt_id")?.to_owned())
}

/// `n` jobs one after the other; the latency of each (POST to end of job).
async fn sequential(
    client: &reqwest::Client,
    serve: &Serve,
    p: &mut Participant,
    n: usize,
    seed: u64,
) -> Result<Vec<Duration>> {
    let mut out = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let id = submit(client, serve, p, common::nomodel_prompt(seed + i as u64)).await?;
        common::until_done(&mut p.ws, &id, Duration::from_secs(60)).await?;
        out.push(t0.elapsed());
    }
    Ok(out)
}

async fn new_serve(
    a: &Args,
    tmp: &Path,
    users: usize,
    env: &[(String, String)],
) -> Result<(Serve, Vec<(String, String)>)> {
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let bin = common::absolute(&a.bin)?;
    let frontend = common::absolute(&a.frontend)
        .context("install it with scripts/install-frontend.sh target/test-data")?;
    let data = tmp.join("data");
    let accounts = common::create_workshop(&bin, &data, users).await?;
    let client = common::http_client()?;
    common::import_sim_object_info(&client, &bin, &data).await?;
    let serve = Serve::start(&bin, &data, &frontend, &env).await?;
    Ok((serve, accounts))
}

/// A `comfyume-worker` process in front of `comfyume_url`; killed when dropped.
struct Worker {
    child: tokio::process::Child,
    url: String,
    /// The worker's own directory, removed with it.
    _dir: tempfile::TempDir,
}

impl Worker {
    async fn start(a: &Args, client: &reqwest::Client, comfyui_url: &str) -> Result<Worker> {
        let dir = tempfile::tempdir()?;
        let mut child = tokio::process::Command::new(common::absolute(&a.worker)?)
            .args(["--listen", "127.0.0.1:0"])
            .env("COMFYUI_URL", comfyui_url)
            .env("WORKER_DATA_DIR", dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting comfyume-worker")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let url = lines
            .next_line()
            .await?
            .and_then(|l| {
                l.strip_prefix("comfyume-worker listening on ")
                    .map(str::to_owned)
            })
            .context("the worker did not print its address")?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let deadline = Instant::now() + Duration::from_secs(60);
        while client
            .get(format!("{url}/health"))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            common::check_deadline(deadline, "waiting for the worker")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Worker {
            child,
            url,
            _dir: dir,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Part 1: the same no-model jobs through the local path and the worker path (a worker
/// reached directly, and through the emulator).
async fn latency(
    a: &Args,
    client: &reqwest::Client,
) -> Result<(common::Summary, common::Summary, common::Summary)> {
    let sim = common::spawn_sim(0).await?;
    let tmp = tempfile::tempdir()?;
    let (serve, users) = new_serve(
        a,
        tmp.path(),
        1,
        &[
            ("INFERENCE_MODE".into(), "local".into()),
            ("COMFYUI_URLS".into(), sim.url()),
        ],
    )
    .await?;
    let mut p = participants(client, &serve, &users).await?;
    sequential(client, &serve, &mut p[0], 3, 9_000_000).await?;
    let local = sequential(client, &serve, &mut p[0], a.jobs, 1_000_000).await?;
    drop(p);
    Serve::stop(serve).await;

    // serve -> worker -> the same simulator.
    let w = Worker::start(a, client, &sim.url()).await?;
    let tmp = tempfile::tempdir()?;
    let (serve, users) = new_serve(
        a,
        tmp.path(),
        1,
        &[
            ("INFERENCE_MODE".into(), "serverless".into()),
            ("SERVERLESS_ENDPOINT_LAB".into(), w.url.clone()),
            ("SERVERLESS_MAX_IN_FLIGHT".into(), "1".into()),
        ],
    )
    .await?;
    let mut p = participants(client, &serve, &users).await?;
    sequential(client, &serve, &mut p[0], 3, 9_050_000).await?;
    let direct = sequential(client, &serve, &mut p[0], a.jobs, 1_500_000).await?;
    drop(p);
    Serve::stop(serve).await;
    w.stop().await;
    sim.shutdown().await;

    let prov = Provider::start(
        a,
        &["h200-spot:spot=true,min_replicas=1,max_replicas=1,cold_start_ms=0"],
        0,
    )
    .await?;
    prov.ready(client, "h200-spot", 1).await?;
    let tmp = tempfile::tempdir()?;
    let env = serverless_env(
        &prov,
        &[("SERVERLESS_ENDPOINT_H200_SPOT", "h200-spot")],
        &[],
    );
    let (serve, users) = new_serve(a, tmp.path(), 1, &env).await?;
    let mut p = participants(client, &serve, &users).await?;
    sequential(client, &serve, &mut p[0], 3, 9_100_000).await?;
    let worker = sequential(client, &serve, &mut p[0], a.jobs, 2_000_000).await?;
    drop(p);
    Serve::stop(serve).await;
    prov.stop().await;
    Ok((
        common::summarize(&local),
        common::summarize(&direct),
        common::summarize(&worker),
    ))
}

/// `(execution_start, end)` of a job, from the participant's `/api/history/{id}`.
async fn interval(
    client: &reqwest::Client,
    serve: &Serve,
    p: &Participant,
    id: &str,
) -> Result<(i64, i64)> {
    let h: Value = client
        .get(format!("{}/{}/api/history/{id}", serve.base, p.user))
        .header("cookie", &p.cookie)
        .send()
        .await?
        .json()
        .await?;
    let msgs = h[id]["status"]["messages"]
        .as_array()
        .with_context(|| format!("{id}: no status messages in history"))?;
    let at = |names: &[&str]| {
        msgs.iter().find_map(|m| {
            let a = m.as_array()?;
            names
                .contains(&a.first()?.as_str()?)
                .then(|| a.get(1)?.get("timestamp")?.as_i64())?
        })
    };
    Ok((
        at(&["execution_start"]).with_context(|| format!("{id}: no start"))?,
        at(&["execution_success", "execution_error"]).with_context(|| format!("{id}: no end"))?,
    ))
}

struct Backlog {
    busy: f64,
    span_ms: i64,
    exec_ms: i64,
}

/// Part 2: R warm replicas, a backlog of jobs from 4 participants.
async fn backlog(a: &Args, client: &reqwest::Client) -> Result<Backlog> {
    let r = a.replicas.max(1);
    let steps = 10;
    let step_ms = a.job_ms / steps;
    let dep = format!("h200-spot:spot=true,min_replicas={r},max_replicas={r},cold_start_ms=0");
    let prov = Provider::start(a, &[&dep], step_ms).await?;
    prov.ready(client, "h200-spot", r).await?;
    let tmp = tempfile::tempdir()?;
    let n = a.backlog.to_string();
    let env = serverless_env(
        &prov,
        &[("SERVERLESS_ENDPOINT_H200_SPOT", "h200-spot")],
        &[
            ("MAX_RUNNING_PER_USER", n.clone()),
            ("MAX_QUEUED_PER_USER", n.clone()),
            ("MAX_QUEUE_DEPTH", (a.backlog * 2).to_string()),
        ],
    );
    let (serve, users) = new_serve(a, tmp.path(), 4, &env).await?;
    let mut ps = participants(client, &serve, &users).await?;
    let mut ids: Vec<(usize, String)> = Vec::new();
    for i in 0..a.backlog {
        let k = i % ps.len();
        let prompt = common::flux_prompt(steps as u32, 5_000_000 + i as u64, 64);
        ids.push((k, submit(client, &serve, &ps[k], prompt).await?));
    }
    for (k, id) in &ids {
        common::until_done(&mut ps[*k].ws, id, Duration::from_secs(600)).await?;
    }
    let mut iv = Vec::new();
    for (k, id) in &ids {
        iv.push(interval(client, &serve, &ps[*k], id).await?);
    }
    drop(ps);
    Serve::stop(serve).await;
    prov.stop().await;
    let first = iv.iter().map(|x| x.0).min().unwrap_or(0);
    let last = iv.iter().map(|x| x.1).max().unwrap_or(0);
    let exec: i64 = iv.iter().map(|(s, e)| e - s).sum();
    let span = (last - first).max(1);
    Ok(Backlog {
        busy: exec as f64 / (span as f64 * r as f64),
        span_ms: span,
        exec_ms: exec,
    })
}

/// Part 3: a job runs on spot; the spot replica is evicted; how long until it runs on
/// the failover endpoint.
async fn evictions(a: &Args, client: &reqwest::Client) -> Result<Vec<Duration>> {
    let prov = Provider::start(
        a,
        &[
            "h200-spot:spot=true,min_replicas=1,max_replicas=1,cold_start_ms=0",
            "h200-on-demand:min_replicas=1,max_replicas=1,cold_start_ms=0",
        ],
        50,
    )
    .await?;
    prov.ready(client, "h200-on-demand", 1).await?;
    let tmp = tempfile::tempdir()?;
    let env = serverless_env(
        &prov,
        &[
            ("SERVERLESS_ENDPOINT_H200_SPOT", "h200-spot"),
            ("SERVERLESS_ENDPOINT_H200_ON_DEMAND", "h200-on-demand"),
        ],
        &[
            ("SERVERLESS_ACTIVE", "h200-spot".into()),
            ("SERVERLESS_FAILOVER", "h200-on-demand".into()),
        ],
    );
    let (serve, users) = new_serve(a, tmp.path(), 1, &env).await?;
    let mut ps = participants(client, &serve, &users).await?;
    let p = &mut ps[0];
    let mut out = Vec::new();
    for i in 0..a.evictions {
        prov.ready(client, "h200-spot", 1).await?;
        // A short job on spot first: the endpoint streams again (a cut in a row each
        // time would switch it to async mode).
        let id = submit(
            client,
            &serve,
            p,
            common::nomodel_prompt(7_000_000 + i as u64),
        )
        .await?;
        common::until_done(&mut p.ws, &id, Duration::from_secs(60)).await?;
        let id = submit(
            client,
            &serve,
            p,
            common::flux_prompt(40, 8_000_000 + i as u64, 64),
        )
        .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = common::next_json(&mut p.ws, deadline).await?;
            if v["type"] == "progress" && v["data"]["prompt_id"] == id.as_str() {
                break;
            }
        }
        let t0 = Instant::now();
        let r = client
            .post(format!("{}/_emulator/evict", prov.url))
            .json(&json!({"deployment": "h200-spot"}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("evict: {}", r.status());
        }
        loop {
            let v = common::next_json(&mut p.ws, deadline).await?;
            if v["type"] == "execution_start" && v["data"]["prompt_id"] == id.as_str() {
                out.push(t0.elapsed());
                break;
            }
        }
        common::until_done(&mut p.ws, &id, Duration::from_secs(60)).await?;
    }
    drop(ps);
    Serve::stop(serve).await;
    prov.stop().await;
    Ok(out)
}

pub async fn run(a: Args) -> Result<()> {
    let client = common::http_client()?;
    let (local, direct, worker) = latency(&a, &client).await?;
    let b = backlog(&a, &client).await?;
    let ev = evictions(&a, &client).await?;
    let evs = common::summarize(&ev);
    let added_p50 = (worker.p50_us - local.p50_us) / 1000.0;
    let added_mean = (worker.mean_us - local.mean_us) / 1000.0;
    let direct_p50 = (direct.p50_us - local.p50_us) / 1000.0;
    let direct_mean = (direct.mean_us - local.mean_us) / 1000.0;
    common::print_machine();
    let rows = vec![
        vec![
            "serve -> simulator (local)".into(),
            local.brief(),
            "baseline".into(),
        ],
        vec![
            "serve -> worker -> simulator".into(),
            direct.brief(),
            format!("+{direct_p50:.2} ms p50, +{direct_mean:.2} ms mean per job"),
        ],
        vec![
            "serve -> emulator -> worker -> simulator".into(),
            worker.brief(),
            format!("+{added_p50:.2} ms p50, +{added_mean:.2} ms mean per job"),
        ],
    ];
    common::print_table(
        &format!(
            "serverless: {} no-model jobs per path, one at a time",
            a.jobs
        ),
        &["path", "per job p50 / p90 / p99 / max", "added"],
        &rows,
    );
    common::print_table(
        "serverless: backlog",
        &["replicas", "jobs", "span", "executing", "busy"],
        &[vec![
            a.replicas.to_string(),
            a.backlog.to_string(),
            format!("{} ms", b.span_ms),
            format!("{} ms", b.exec_ms),
            format!("{:.2} %", b.busy * 100.0),
        ]],
    );
    common::print_table(
        "serverless: spot eviction mid-job to execution_start on the failover endpoint",
        &["evictions", "p50 / p90 / p99 / max"],
        &[vec![ev.len().to_string(), evs.brief()]],
    );
    let summary = json!({
        "bench": "serverless",
        "machine": common::machine(),
        "jobs": a.jobs,
        "local": local.json_ms(),
        "worker_direct": direct.json_ms(),
        "added_ms_p50_direct": (direct_p50 * 100.0).round() / 100.0,
        "added_ms_mean_direct": (direct_mean * 100.0).round() / 100.0,
        "worker_path": worker.json_ms(),
        "added_ms_p50": (added_p50 * 100.0).round() / 100.0,
        "added_ms_mean": (added_mean * 100.0).round() / 100.0,
        "backlog": {"replicas": a.replicas, "jobs": a.backlog, "job_ms": a.job_ms, "span_ms": b.span_ms, "executing_ms": b.exec_ms, "busy": (b.busy * 10_000.0).round() / 10_000.0},
        "eviction_to_running_elsewhere": evs.json_ms(),
    });
    println!("{summary}");
    Ok(())
}
