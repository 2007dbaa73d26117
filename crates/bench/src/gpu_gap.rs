//! `gpu-gap`: with a backlog, how much of the time the (simulated) GPU is busy,
//! and the gap between one job's end and the next one's start on it. The real
//! `comfyume serve` dispatches to a simulator in this process (so its state can be
//! read); measured with the default 2 backend slots (the next job handed over in
//! advance) and with 1 slot (hand-over only after the previous job ended).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::common::{self, Serve};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Jobs in the backlog.
    #[arg(long, default_value_t = 40)]
    pub jobs: usize,
    /// Time one job takes on the simulator (spread over its sampler steps).
    #[arg(long, default_value_t = 500)]
    pub job_ms: u64,
    /// Sampler steps per job.
    #[arg(long, default_value_t = 10)]
    pub steps: u32,
    /// Participants the jobs come from (round robin between them).
    #[arg(long, default_value_t = 4)]
    pub participants: usize,
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
}

struct GapRun {
    slots: usize,
    jobs: usize,
    span_ms: f64,
    busy_ms: f64,
    gaps: Vec<Duration>,
    job_ms: common::Summary,
}

/// (execution_start, end) timestamps (ms) of every job in the simulator's history.
fn intervals(history: &Value) -> Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    for (id, entry) in history.as_object().context("history is not an object")? {
        let msgs = entry["status"]["messages"]
            .as_array()
            .with_context(|| format!("{id} has no status messages"))?;
        let at = |names: &[&str]| {
            msgs.iter().find_map(|m| {
                let a = m.as_array()?;
                names
                    .contains(&a.first()?.as_str()?)
                    .then(|| a.get(1)?.get("timestamp")?.as_i64())?
            })
        };
        let start = at(&["execution_start"]).with_context(|| format!("{id}: no start"))?;
        let end = at(&[
            "execution_success",
            "execution_error",
            "execution_interrupted",
        ])
        .with_context(|| format!("{id}: no end"))?;
        out.push((start, end));
    }
    out.sort();
    Ok(out)
}

async fn one_config(a: &Args, slots: usize, client: &reqwest::Client) -> Result<GapRun> {
    let bin = common::absolute(&a.bin)?;
    let frontend = common::absolute(&a.frontend)
        .context("install it with scripts/install-frontend.sh target/test-data")?;
    let step_ms = a.job_ms / u64::from(a.steps.max(1));
    let sim = common::spawn_sim(step_ms).await?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let users = common::create_workshop(&bin, &data, a.participants).await?;
    let n = a.jobs.to_string();
    let env = [
        ("INFERENCE_MODE", "local".to_string()),
        ("COMFYUI_URLS", sim.url()),
        ("BACKEND_SLOTS", slots.to_string()),
        ("MAX_RUNNING_PER_USER", n.clone()),
        ("MAX_QUEUED_PER_USER", n.clone()),
        ("MAX_QUEUE_DEPTH", (a.jobs * 2).to_string()),
    ];
    let serve = Serve::start(&bin, &data, &frontend, &env).await?;
    let mut cookies = Vec::new();
    for (u, p) in &users {
        cookies.push((u.clone(), common::login(client, &serve.base, u, p).await?));
    }
    // The backlog: every job submitted at once, each with its own seed.
    for i in 0..a.jobs {
        let (u, cookie) = &cookies[i % cookies.len()];
        let body = json!({
            "client_id": format!("bench-{u}"),
            "prompt": common::flux_prompt(a.steps, (slots * 1_000_000 + i) as u64, 64),
        });
        let r = client
            .post(format!("{}/{u}/api/prompt", serve.base))
            .header("cookie", cookie)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        if r.status() != 200 {
            bail!("POST /api/prompt: {} {}", r.status(), r.text().await?);
        }
    }
    let deadline = Instant::now()
        + Duration::from_millis(a.job_ms * a.jobs as u64 * 3)
        + Duration::from_secs(60);
    loop {
        let s = sim.state();
        if s.jobs_succeeded + s.jobs_failed + s.jobs_interrupted >= a.jobs as u64 {
            if s.jobs_failed + s.jobs_interrupted > 0 {
                bail!(
                    "{} jobs did not succeed on the simulator",
                    s.jobs_failed + s.jobs_interrupted
                );
            }
            break;
        }
        common::check_deadline(deadline, "waiting for the backlog to drain")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy_ms = sim.state().busy_ms as f64;
    let history: Value = client
        .get(format!("{}/history?max_items={}", sim.url(), a.jobs * 2))
        .send()
        .await?
        .json()
        .await?;
    Serve::stop(serve).await;
    sim.shutdown().await;
    let iv = intervals(&history)?;
    if iv.len() != a.jobs {
        bail!(
            "simulator history has {} jobs, expected {}",
            iv.len(),
            a.jobs
        );
    }
    let gaps: Vec<Duration> = iv
        .windows(2)
        .map(|w| Duration::from_millis((w[1].0 - w[0].1).max(0) as u64))
        .collect();
    let job_ms = common::summarize(
        &iv.iter()
            .map(|(s, e)| Duration::from_millis((e - s).max(0) as u64))
            .collect::<Vec<_>>(),
    );
    Ok(GapRun {
        slots,
        jobs: iv.len(),
        span_ms: (iv[iv.len() - 1].1 - iv[0].0) as f64,
        busy_ms,
        gaps,
        job_ms,
    })
}

pub async fn run(a: Args) -> Result<()> {
    let client = common::http_client()?;
    let mut runs = Vec::new();
    for slots in [2, 1] {
        runs.push(one_config(&a, slots, &client).await?);
    }
    common::print_machine();
    println!(
        "real comfyume serve -> simulator (in this process) with {} jobs of ~{} ms ({} sampler steps of {} ms), from {} participants; timestamps from the simulator's history (1 ms resolution)",
        a.jobs,
        a.job_ms,
        a.steps,
        a.job_ms / u64::from(a.steps.max(1)),
        a.participants
    );
    let mut rows = Vec::new();
    let mut js = Vec::new();
    for r in &runs {
        let g = common::summarize(&r.gaps);
        let busy = r.busy_ms / r.span_ms * 100.0;
        rows.push(vec![
            format!("{}", r.slots),
            format!("{}", r.jobs),
            format!("{:.0}", r.span_ms),
            format!("{:.0}", r.busy_ms),
            format!("{busy:.2} %"),
            format!(
                "{:.2} / {:.0} / {:.0} ms",
                g.mean_us / 1000.0,
                g.p50_us / 1000.0,
                g.max_us / 1000.0
            ),
            format!("{:.0} ms", r.job_ms.p50_us / 1000.0),
            if r.slots == 2 {
                "> 99 %, gap < 5 ms".into()
            } else {
                "comparison".into()
            },
        ]);
        js.push(json!({
            "slots": r.slots, "jobs": r.jobs, "span_ms": r.span_ms, "busy_ms": r.busy_ms,
            "busy_percent": (busy * 100.0).round() / 100.0,
            "gap_mean_ms": (g.mean_us / 10.0).round() / 100.0, "gap_p50_ms": g.p50_us / 1000.0,
            "gap_max_ms": g.max_us / 1000.0, "job_p50_ms": r.job_ms.p50_us / 1000.0,
        }));
    }
    common::print_table(
        "gpu-gap",
        &[
            "backend slots",
            "jobs",
            "first start -> last end (ms)",
            "busy (ms)",
            "busy",
            "gap mean / p50 / max",
            "job p50",
            "goal",
        ],
        &rows,
    );
    println!("predecessor: polled for work every 2 s (a gap of up to 2000 ms per job)");
    let summary = json!({
        "bench": "gpu-gap",
        "machine": common::machine(),
        "job_ms": a.job_ms,
        "runs": js,
        "goal": {"busy_percent": 99, "gap_ms": 5},
    });
    println!("{summary}");
    Ok(())
}
