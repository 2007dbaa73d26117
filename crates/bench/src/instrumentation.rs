//! `instrumentation`: what metrics recording costs. Two `comfyume serve` processes on the
//! same machine, one with metrics (`COMFYUME_METRICS=on`, its `/metrics` scraped as a
//! Prometheus would, more often) and one without (`COMFYUME_METRICS=off`: no recorder, every
//! metrics macro a no-op), take the same submissions (`POST /api/prompt`, no backend) in
//! alternating rounds (on, off, off, on, ...), so that drift of the machine and the growing
//! queue fall on both alike. Throughput and latency percentiles per server, and the difference.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::common::{self, Serve, Summary};
use crate::submit::{Kind, Phase, phase};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Submissions per round.
    #[arg(long, default_value_t = 2_000)]
    pub jobs: usize,
    /// Rounds per server.
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// Participants submitting (job i belongs to participant i mod N), each with a WebSocket open.
    #[arg(long, default_value_t = 50)]
    pub participants: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// `alternate`: the servers take turns (on, off, off, on, ...), each alone on the machine;
    /// `together`: both are driven at once in every round, so each moment's load falls on both.
    #[arg(long, default_value = "together")]
    pub mode: Mode,
    /// How often the metrics server's `/metrics` is read during its rounds (Prometheus: 15 s).
    #[arg(long, default_value_t = 1.0)]
    pub scrape_every_s: f64,
    /// `RUST_LOG` of both servers (`info`: a line per request and per job, as in production).
    #[arg(long, default_value = "info")]
    pub rust_log: String,
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Alternate,
    Together,
}

/// One server under test.
struct Side {
    name: &'static str,
    serve: Serve,
    cookies: Arc<Vec<(String, String)>>,
    _sockets: Vec<tokio::task::JoinHandle<()>>,
    phases: Vec<Phase>,
    submitted: usize,
}

async fn side(
    name: &'static str,
    metrics: &str,
    args: &Args,
    client: &reqwest::Client,
    root: &std::path::Path,
    frontend: &std::path::Path,
) -> Result<Side> {
    let bin = common::absolute(&args.bin)?;
    let data = root.join(name).join("data");
    let users = common::create_workshop(&bin, &data, args.participants).await?;
    common::import_sim_object_info(client, &bin, &data).await?;
    let depth = (args.jobs * args.rounds + 1).to_string();
    let env = [
        ("INFERENCE_MODE", "none".to_string()),
        ("COMFYUME_METRICS", metrics.to_string()),
        ("MAX_QUEUE_DEPTH", depth.clone()),
        ("MAX_QUEUED_PER_USER", depth),
        ("RUST_LOG", args.rust_log.clone()),
    ];
    let serve = Serve::start(&bin, &data, frontend, &env).await?;
    if (metrics == "on") != serve.metrics.is_some() {
        bail!(
            "{name}: COMFYUME_METRICS={metrics}, but metrics listener {:?}",
            serve.metrics
        );
    }
    let mut cookies = Vec::new();
    for (u, p) in &users {
        cookies.push((u.clone(), common::login(client, &serve.base, u, p).await?));
    }
    // One socket per participant, as the open UI keeps (each submission sends a `status`).
    let mut sockets = Vec::new();
    let ws_base = serve.base.replacen("http://", "ws://", 1);
    for (i, (u, cookie)) in cookies.iter().enumerate() {
        let url = format!("{ws_base}/{u}/ws?clientId=bench{i}");
        let mut ws = common::ws_connect(&url, &[("cookie", cookie.clone())]).await?;
        sockets.push(tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    Ok(Side {
        name,
        serve,
        cookies: Arc::new(cookies),
        _sockets: sockets,
        phases: Vec::new(),
        submitted: 0,
    })
}

/// One round of submissions to a server.
async fn submissions(s: &Side, client: &reqwest::Client, args: &Args) -> Result<Phase> {
    phase(
        s.serve.pid,
        client,
        &s.serve.base,
        &s.cookies,
        Kind::Submit,
        args.jobs,
        args.concurrency,
        s.submitted,
    )
    .await
}

/// Reads `/metrics` every `every` until stopped; how many reads and their total time.
fn scraper(url: String, every: Duration, client: reqwest::Client) -> Scraper {
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let (mut n, mut took) = (0u32, Duration::ZERO);
        loop {
            let t = Instant::now();
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
                && r.bytes().await.is_ok()
            {
                n += 1;
                took += t.elapsed();
            }
            tokio::select! {
                _ = s.notified() => return (n, took),
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
    Scraper { stop, task }
}

struct Scraper {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<(u32, Duration)>,
}

impl Scraper {
    async fn finish(self) -> (u32, Duration) {
        self.stop.notify_one();
        self.task.await.unwrap_or_default()
    }
}

/// In-process: what recording the metrics one submission touches costs, with the real
/// exporter's recorder (and with none, as `COMFYUME_METRICS=off` leaves it), in ns.
fn recording_cost(iterations: u32) -> (f64, f64) {
    use comfyume_gateway::telemetry as gw;
    let one = || {
        // The request (observe), the job (queue), the store call, the connection's bytes.
        let route = String::from("/api/prompt");
        metrics::counter!(gw::HTTP_REQUESTS, "route" => route.clone(), "method" => "POST", "status" => "200".to_owned())
            .increment(1);
        metrics::histogram!(gw::HTTP_DURATION, "route" => route).record(0.0015);
        metrics::counter!(comfyume_dispatch::telemetry::JOBS_SUBMITTED).increment(1);
        metrics::histogram!(comfyume_store::telemetry::STORE_OPERATION_DURATION, "op" => "enqueue")
            .record(0.0004);
    };
    let time = || {
        let t = Instant::now();
        for _ in 0..iterations {
            one();
        }
        t.elapsed().as_nanos() as f64 / iterations as f64
    };
    let off = time();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.01, 0.1, 1.0])
        .expect("buckets")
        .build_recorder();
    let on = metrics::with_local_recorder(&recorder, time);
    (on, off)
}

pub async fn run(args: Args) -> Result<()> {
    let (rec_on, rec_off) = recording_cost(200_000);
    println!(
        "recording one submission's metrics in-process: {rec_on:.0} ns with the exporter's recorder, {rec_off:.0} ns with none (200000 iterations)"
    );
    let frontend = common::absolute(&args.frontend)
        .context("install it with scripts/install-frontend.sh target/test-data")?;
    let client = common::http_client()?;
    let tmp = tempfile::tempdir()?;
    let mut on = side("on", "on", &args, &client, tmp.path(), &frontend).await?;
    let mut off = side("off", "off", &args, &client, tmp.path(), &frontend).await?;
    let (mut scrapes, mut scrape_time) = (0u32, Duration::ZERO);
    let every = Duration::from_secs_f64(args.scrape_every_s.max(0.05));
    for round in 0..args.rounds * 2 {
        // Alternate: on, off, off, on, on, off, ... (drift falls on both alike).
        let first_on = (round / 2) % 2 == 0;
        let metrics_on = (round % 2 == 0) == first_on;
        if args.mode == Mode::Together && round >= args.rounds {
            break;
        }
        let scrape = on
            .serve
            .metrics
            .clone()
            .filter(|_| metrics_on || args.mode == Mode::Together)
            .map(|url| scraper(url, every, client.clone()));
        let results: Vec<(bool, Phase)> = match args.mode {
            Mode::Together => {
                let (a, b) = tokio::join!(
                    submissions(&on, &client, &args),
                    submissions(&off, &client, &args)
                );
                vec![(true, a?), (false, b?)]
            }
            Mode::Alternate if metrics_on => vec![(true, submissions(&on, &client, &args).await?)],
            Mode::Alternate => vec![(false, submissions(&off, &client, &args).await?)],
        };
        if let Some(sc) = scrape {
            let (n, t) = sc.finish().await;
            scrapes += n;
            scrape_time += t;
        }
        for (is_on, p) in results {
            let s = if is_on { &mut on } else { &mut off };
            if p.failed > 0 {
                bail!(
                    "{}: {} submissions failed: {}",
                    s.name,
                    p.failed,
                    p.first_failure.clone().unwrap_or_default()
                );
            }
            s.submitted += args.jobs;
            s.phases.push(p);
        }
    }
    // The metrics server's own view, to show it counted every submission.
    let counted = match &on.serve.metrics {
        Some(url) => {
            let text = client.get(url).send().await?.text().await?;
            text.lines()
                .find_map(|l| l.strip_prefix("comfyume_jobs_submitted_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        }
        None => 0.0,
    };

    let stats = |s: &Side| {
        let lat: Vec<Duration> = s
            .phases
            .iter()
            .flat_map(|p| p.latencies.iter().copied())
            .collect();
        let ok: usize = s.phases.iter().map(|p| p.ok).sum();
        let wall: f64 = s.phases.iter().map(|p| p.wall.as_secs_f64()).sum();
        let cpu: f64 = s.phases.iter().map(|p| p.server_cpu_ms).sum();
        let per_round: Vec<f64> = s
            .phases
            .iter()
            .map(|p| p.ok as f64 / p.wall.as_secs_f64())
            .collect();
        (
            common::summarize(&lat),
            ok as f64 / wall,
            cpu * 1000.0 / ok.max(1) as f64,
            per_round,
        )
    };
    let (s_on, rate_on, cpu_on, rounds_on) = stats(&on);
    let (s_off, rate_off, cpu_off, rounds_off) = stats(&off);
    let pct = |a: f64, b: f64| (a - b) / b * 100.0;
    // Round by round (the n-th round of each), the throughput ratio; its median shrugs off
    // the rounds a neighbour's build disturbed.
    let mut ratios: Vec<f64> = rounds_on
        .iter()
        .zip(&rounds_off)
        .map(|(a, b)| a / b)
        .collect();
    let paired = common::median(&mut ratios);
    common::print_machine();
    println!(
        "binary: {} (INFERENCE_MODE=none, RUST_LOG={}), {} participants each with a WebSocket, {} in flight, {} rounds x {} submissions per server ({}); /metrics read {} times, once at each round's start and then every {} s ({:.1} ms each on average)",
        common::absolute(&args.bin)?.display(),
        args.rust_log,
        args.participants,
        args.concurrency,
        args.rounds,
        args.jobs,
        match args.mode {
            Mode::Together => "both at once",
            Mode::Alternate => "taking turns",
        },
        scrapes,
        args.scrape_every_s,
        scrape_time.as_secs_f64() * 1000.0 / scrapes.max(1) as f64
    );
    let row = |name: &str, s: &Summary, rate: f64, cpu: f64, rounds: &[f64]| {
        vec![
            name.to_string(),
            format!("{}", s.n),
            s.brief(),
            format!("{rate:.0}/s"),
            rounds
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
            format!("{cpu:.0} us"),
        ]
    };
    common::print_table(
        "POST /api/prompt with and without metrics recording",
        &[
            "server",
            "200",
            "p50 / p90 / p99 / max",
            "rate",
            "rate per round (/s)",
            "server CPU per request",
        ],
        &[
            row("COMFYUME_METRICS=on", &s_on, rate_on, cpu_on, &rounds_on),
            row(
                "COMFYUME_METRICS=off",
                &s_off,
                rate_off,
                cpu_off,
                &rounds_off,
            ),
        ],
    );
    println!(
        "with metrics ({:?}): throughput {:+.1} % (median of the {} round-by-round ratios: {:+.1} %), p99 {:+.1} %, p50 {:+.1} %, server CPU per request {:+.1} % (goal: under 5 %); the metrics server counted {counted} submissions",
        args.mode,
        pct(rate_on, rate_off),
        rounds_on.len().min(rounds_off.len()),
        (paired - 1.0) * 100.0,
        pct(s_on.p99_us, s_off.p99_us),
        pct(s_on.p50_us, s_off.p50_us),
        pct(cpu_on, cpu_off),
    );
    let summary = json!({
        "bench": "instrumentation",
        "machine": common::machine(),
        "jobs_per_round": args.jobs,
        "rounds": args.rounds,
        "participants": args.participants,
        "concurrency": args.concurrency,
        "rust_log": args.rust_log,
        "scrapes": scrapes,
        "on": {"submit": s_on.json_ms(), "per_s": rate_on.round(), "server_cpu_us": cpu_on.round()},
        "off": {"submit": s_off.json_ms(), "per_s": rate_off.round(), "server_cpu_us": cpu_off.round()},
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "throughput_diff_pct": (pct(rate_on, rate_off) * 10.0).round() / 10.0,
        "throughput_paired_median_diff_pct": ((paired - 1.0) * 1000.0).round() / 10.0,
        "server_cpu_diff_pct": (pct(cpu_on, cpu_off) * 10.0).round() / 10.0,
        "p99_diff_pct": (pct(s_on.p99_us, s_off.p99_us) * 10.0).round() / 10.0,
        "submissions_counted": counted,
        "recording_ns_per_submission": {"on": rec_on.round(), "off": rec_off.round()},
        "goal": {"diff_pct_under": 5},
    });
    println!("{summary}");
    Serve::stop(on.serve).await;
    Serve::stop(off.serve).await;
    Ok(())
}
