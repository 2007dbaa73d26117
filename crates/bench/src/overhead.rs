//! `overhead`: the same jobs driven straight at the simulator (`POST /prompt` +
//! its WebSocket until `executing: null`) and through the real `comfyume serve`
//! (`POST /api/prompt` + the participant's WebSocket until `executing: null`),
//! in the same run, on the same simulator (in this process).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::common::{self, Serve, Ws};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Jobs per path.
    #[arg(long, default_value_t = 200)]
    pub jobs: usize,
    /// Jobs in flight at once (one participant, or one simulator client, each).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// 0: the no-model graph (64x64 image inverted and saved: pure overhead);
    /// N: a Flux.2 graph with N sampler steps (progress and preview frames relayed).
    #[arg(long, default_value_t = 0)]
    pub steps: u32,
    /// Simulated time per sampler step.
    #[arg(long, default_value_t = 0)]
    pub step_ms: u64,
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
}

fn prompt(a: &Args, k: u64) -> Value {
    if a.steps == 0 {
        common::nomodel_prompt(k)
    } else {
        common::flux_prompt(a.steps, k, 64)
    }
}

/// Where a worker sends its jobs.
#[derive(Clone)]
struct Target {
    post_url: String,
    cookie: Option<String>,
    client_id: String,
}

async fn one_job(
    client: &reqwest::Client,
    t: &Target,
    ws: &mut Ws,
    prompt: Value,
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut rb = client
        .post(&t.post_url)
        .header("content-type", "application/json")
        .body(json!({"client_id": t.client_id, "prompt": prompt}).to_string());
    if let Some(c) = &t.cookie {
        rb = rb.header("cookie", c);
    }
    let r = rb.send().await?;
    if r.status() != 200 {
        bail!("{}: {} {}", t.post_url, r.status(), r.text().await?);
    }
    let v: Value = r.json().await?;
    let id = v["prompt_id"].as_str().context("no prompt_id")?;
    common::until_done(ws, id, Duration::from_secs(60)).await?;
    Ok(t0.elapsed())
}

/// `jobs` jobs over `targets` (one worker each); per-job latencies and the wall time.
async fn drive(
    a: &Args,
    client: &reqwest::Client,
    targets: Vec<(Target, Ws)>,
    offset: u64,
) -> Result<(Vec<Duration>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (t, mut ws) in targets {
        let (client, next) = (client.clone(), next.clone());
        let prompts: Vec<Value> = (0..a.jobs).map(|i| prompt(a, offset + i as u64)).collect();
        let jobs = a.jobs;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    break;
                }
                lat.push(one_job(&client, &t, &mut ws, prompts[i].clone()).await?);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, started.elapsed()))
}

pub async fn run(a: Args) -> Result<()> {
    let bin = common::absolute(&a.bin)?;
    let frontend = common::absolute(&a.frontend)
        .context("install it with scripts/install-frontend.sh target/test-data")?;
    let client = common::http_client()?;
    let sim = common::spawn_sim(a.step_ms).await?;
    let c = a.concurrency.max(1);

    // Straight at the simulator: each worker its own client id and socket.
    let mut direct_targets = Vec::new();
    for w in 0..c {
        let client_id = format!("direct-{w}");
        let ws = common::ws_connect(&format!("{}?clientId={client_id}", sim.ws_url()), &[]).await?;
        direct_targets.push((
            Target {
                post_url: format!("{}/prompt", sim.url()),
                cookie: None,
                client_id,
            },
            ws,
        ));
    }
    // Warm-up (not measured): first connections, first job.
    {
        let (t, ws) = &mut direct_targets[0];
        for k in 0..3 {
            one_job(&client, t, ws, prompt(&a, 9_000_000 + k)).await?;
        }
    }
    let (direct, direct_wall) = drive(&a, &client, direct_targets, 1_000_000).await?;

    // Through comfyume serve: each worker is a participant with its own tab.
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let users = common::create_workshop(&bin, &data, c).await?;
    let env = [
        ("INFERENCE_MODE", "local".to_string()),
        ("COMFYUI_URLS", sim.url()),
    ];
    let serve = Serve::start(&bin, &data, &frontend, &env).await?;
    let mut serve_targets = Vec::new();
    for (u, p) in &users {
        let cookie = common::login(&client, &serve.base, u, p).await?;
        let client_id = format!("tab-{u}");
        let ws = common::ws_connect(
            &format!("ws://{}/{u}/ws?clientId={client_id}", serve.addr),
            &[("cookie", cookie.clone())],
        )
        .await?;
        serve_targets.push((
            Target {
                post_url: format!("{}/{u}/api/prompt", serve.base),
                cookie: Some(cookie),
                client_id,
            },
            ws,
        ));
    }
    {
        let (t, ws) = &mut serve_targets[0];
        for k in 0..3 {
            one_job(&client, t, ws, prompt(&a, 9_100_000 + k)).await?;
        }
    }
    let (through, serve_wall) = drive(&a, &client, serve_targets, 2_000_000).await?;
    let log = serve.log.clone();
    Serve::stop(serve).await;
    let st = sim.state();
    sim.shutdown().await;
    if st.jobs_failed + st.jobs_interrupted > 0 {
        bail!(
            "{} simulator jobs did not succeed",
            st.jobs_failed + st.jobs_interrupted
        );
    }

    let sd = common::summarize(&direct);
    let ss = common::summarize(&through);
    let ratio = serve_wall.as_secs_f64() / direct_wall.as_secs_f64();
    let per_job_ms =
        (serve_wall.as_secs_f64() - direct_wall.as_secs_f64()) * 1000.0 / a.jobs as f64 * c as f64;
    common::print_machine();
    println!(
        "{} jobs per path, {c} in flight, {} on the simulator (step_ms {}); serve log {}",
        a.jobs,
        if a.steps == 0 {
            "no-model graph (64x64 image inverted, saved)".to_string()
        } else {
            format!("Flux.2 graph, {} steps", a.steps)
        },
        a.step_ms,
        log.display()
    );
    let rows = vec![
        vec![
            "straight at the simulator".into(),
            format!("{:.3} s", direct_wall.as_secs_f64()),
            sd.brief(),
            "baseline".into(),
        ],
        vec![
            "through comfyume serve".into(),
            format!("{:.3} s", serve_wall.as_secs_f64()),
            ss.brief(),
            format!("{ratio:.2} x wall; +{per_job_ms:.2} ms per job"),
        ],
    ];
    common::print_table(
        "overhead",
        &[
            "path",
            "wall",
            "per job p50 / p90 / p99 / max",
            "comparison",
        ],
        &rows,
    );
    let summary = json!({
        "bench": "overhead",
        "machine": common::machine(),
        "jobs": a.jobs,
        "concurrency": c,
        "steps": a.steps,
        "step_ms": a.step_ms,
        "direct_wall_s": (direct_wall.as_secs_f64() * 1000.0).round() / 1000.0,
        "serve_wall_s": (serve_wall.as_secs_f64() * 1000.0).round() / 1000.0,
        "ratio": (ratio * 100.0).round() / 100.0,
        "added_ms_per_job": (per_job_ms * 100.0).round() / 100.0,
        "direct": sd.json_ms(),
        "through_serve": ss.json_ms(),
    });
    println!("{summary}");
    Ok(())
}
