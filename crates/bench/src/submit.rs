//! `submit`: latency and rate of `POST /api/prompt` on the real `comfyume serve`
//! with no backend (`INFERENCE_MODE=none`: every accepted job stays queued, so
//! the queue grows to the full depth), against a read (`GET /api/prompt`) in the
//! same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::common::{self, Serve, Summary};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Jobs submitted.
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Participants submitting (job i belongs to participant i mod N).
    #[arg(long, default_value_t = 200)]
    pub participants: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, default_value = "target/release/comfyume")]
    pub bin: PathBuf,
    #[arg(long, default_value = "target/test-data/frontend/1.37.11")]
    pub frontend: PathBuf,
    /// MAX_QUEUE_DEPTH of the server.
    #[arg(long, default_value_t = 20_000)]
    pub max_queue_depth: u32,
    /// MAX_QUEUED_PER_USER of the server.
    #[arg(long, default_value_t = 100)]
    pub max_queued_per_user: u32,
    /// Reads (GET /api/prompt) in each read phase (default: as many as jobs).
    #[arg(long)]
    pub reads: Option<usize>,
    /// Then this many more submissions and reads one at a time (latency without queueing).
    #[arg(long, default_value_t = 500)]
    pub probe: usize,
    /// Each participant keeps the UI's WebSocket open, so every submission also sends them
    /// a `status` message (`--websockets false`: no sockets, no status work).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub websockets: bool,
}

/// What one phase of requests gave.
pub(crate) struct Phase {
    /// CPU time the server and this client used during the phase (ms).
    pub(crate) server_cpu_ms: f64,
    pub(crate) client_cpu_ms: f64,
    pub(crate) latencies: Vec<Duration>,
    pub(crate) wall: Duration,
    pub(crate) ok: usize,
    pub(crate) failed: usize,
    pub(crate) first_failure: Option<String>,
    /// From the last round of reads: each participant's `queue_remaining`.
    pub(crate) remaining: Vec<u64>,
}

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Submit,
    Read,
}

/// `count` requests of `kind`, `concurrency` in flight, request i as participant i mod N.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn phase(
    server_pid: u32,
    client: &reqwest::Client,
    base: &str,
    cookies: &Arc<Vec<(String, String)>>,
    kind: Kind,
    count: usize,
    concurrency: usize,
    offset: usize,
) -> Result<Phase> {
    let next = Arc::new(AtomicUsize::new(0));
    let (server_cpu0, client_cpu0) = (
        common::cpu_ms(server_pid)?,
        common::cpu_ms(std::process::id())?,
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, base, cookies, next) = (
            client.clone(),
            base.to_string(),
            cookies.clone(),
            next.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut ok, mut failed, mut first_failure) = (0, 0, None);
            let mut remaining: Vec<(usize, u64)> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() > deadline {
                    break;
                }
                let p = i % cookies.len();
                let (user, cookie) = &cookies[p];
                let rb = match kind {
                    Kind::Submit => {
                        let body = json!({
                            "client_id": format!("bench-{user}"),
                            "prompt": common::tiny_prompt((offset + i) as u64),
                            "extra_data": {},
                        });
                        client
                            .post(format!("{base}/{user}/api/prompt"))
                            .header("cookie", cookie)
                            .header("content-type", "application/json")
                            .body(body.to_string())
                    }
                    Kind::Read => client
                        .get(format!("{base}/{user}/api/prompt"))
                        .header("cookie", cookie),
                };
                let t0 = Instant::now();
                let res = async {
                    let r = rb.send().await?;
                    let status = r.status();
                    let body = r.bytes().await?;
                    Ok::<_, reqwest::Error>((status, body))
                }
                .await;
                let dt = t0.elapsed();
                match res {
                    Ok((s, body)) if s == 200 => {
                        ok += 1;
                        lat.push(dt);
                        if let Kind::Read = kind
                            && i + cookies.len() >= count
                        {
                            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let n = v["exec_info"]["queue_remaining"].as_u64().unwrap_or(0);
                            remaining.push((p, n));
                        }
                    }
                    Ok((s, body)) => {
                        failed += 1;
                        first_failure.get_or_insert_with(|| {
                            format!("{s}: {}", String::from_utf8_lossy(&body))
                        });
                    }
                    Err(e) => {
                        failed += 1;
                        first_failure.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (lat, ok, failed, first_failure, remaining)
        }));
    }
    let mut out = Phase {
        server_cpu_ms: 0.0,
        client_cpu_ms: 0.0,
        latencies: Vec::with_capacity(count),
        wall: Duration::ZERO,
        ok: 0,
        failed: 0,
        first_failure: None,
        remaining: vec![0; cookies.len()],
    };
    for w in workers {
        let (lat, ok, failed, ff, remaining) = w.await?;
        out.latencies.extend(lat);
        out.ok += ok;
        out.failed += failed;
        if out.first_failure.is_none() {
            out.first_failure = ff;
        }
        for (p, n) in remaining {
            out.remaining[p] = n;
        }
    }
    out.wall = started.elapsed();
    out.server_cpu_ms = common::cpu_ms(server_pid)? - server_cpu0;
    out.client_cpu_ms = common::cpu_ms(std::process::id())? - client_cpu0;
    Ok(out)
}

pub async fn run(args: Args) -> Result<()> {
    let bin = common::absolute(&args.bin)?;
    let frontend = common::absolute(&args.frontend)
        .context("install it with scripts/install-frontend.sh target/test-data")?;
    let client = common::http_client()?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let users = common::create_workshop(&bin, &data, args.participants).await?;
    let nodes = common::import_sim_object_info(&client, &bin, &data).await?;
    let env = [
        ("INFERENCE_MODE", "none".to_string()),
        ("MAX_QUEUE_DEPTH", args.max_queue_depth.to_string()),
        ("MAX_QUEUED_PER_USER", args.max_queued_per_user.to_string()),
    ];
    let serve = Serve::start(&bin, &data, &frontend, &env).await?;

    // The prompt must be valid for the node set the server holds.
    let info: Value = client
        .get(format!("{}/api/object_info", serve.base))
        .basic_auth(&users[0].0, Some(&users[0].1))
        .send()
        .await?
        .json()
        .await?;
    for class in ["EmptyImage", "SaveImage"] {
        if info.get(class).is_none() {
            bail!("the server's node set ({nodes} classes) has no {class}");
        }
    }

    // Sign every participant in once and reuse the cookie, as a browser does.
    let t_login = Instant::now();
    let mut cookies = Vec::new();
    for (u, p) in &users {
        cookies.push((u.clone(), common::login(&client, &serve.base, u, p).await?));
    }
    let login_wall = t_login.elapsed();
    // One socket per participant, as the open UI keeps; drained in the background, counting
    // the `status` messages the submissions cause.
    let statuses = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut readers = Vec::new();
    if args.websockets {
        let ws_base = serve.base.replacen("http://", "ws://", 1);
        for (i, (u, cookie)) in cookies.iter().enumerate() {
            let url = format!("{ws_base}/{u}/ws?clientId=bench{i}");
            let mut ws = common::ws_connect(&url, &[("cookie", cookie.clone())]).await?;
            let statuses = statuses.clone();
            readers.push(tokio::spawn(async move {
                use futures_util::StreamExt;
                while let Some(Ok(m)) = ws.next().await {
                    if let tokio_tungstenite::tungstenite::Message::Text(t) = m
                        && t.as_str().contains("\"exec_info\"")
                    {
                        statuses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    let cookies = Arc::new(cookies);
    let n = args.jobs;
    let c = args.concurrency;
    // At least one round over every participant (the depth is summed from the last one).
    let reads = args.reads.unwrap_or(n).max(cookies.len());

    // Reads on the empty queue (also provisions each participant's folders,
    // which a page load does before anyone queues).
    let read_empty = phase(
        serve.pid,
        &client,
        &serve.base,
        &cookies,
        Kind::Read,
        reads,
        c,
        0,
    )
    .await?;
    let mem_before = serve.mem()?;
    let submit = phase(
        serve.pid,
        &client,
        &serve.base,
        &cookies,
        Kind::Submit,
        n,
        c,
        0,
    )
    .await?;
    let read_full = phase(
        serve.pid,
        &client,
        &serve.base,
        &cookies,
        Kind::Read,
        reads,
        c,
        0,
    )
    .await?;
    let depth: u64 = read_full.remaining.iter().sum();
    let submit_one = phase(
        serve.pid,
        &client,
        &serve.base,
        &cookies,
        Kind::Submit,
        args.probe,
        1,
        n,
    )
    .await?;
    let read_one = phase(
        serve.pid,
        &client,
        &serve.base,
        &cookies,
        Kind::Read,
        args.probe,
        1,
        0,
    )
    .await?;
    let mem_after = serve.mem()?;
    let log = serve.log.clone();
    Serve::stop(serve).await;
    for r in readers {
        r.abort();
    }
    let statuses = statuses.load(std::sync::atomic::Ordering::Relaxed);

    let s_sub = common::summarize(&submit.latencies);
    let s_empty = common::summarize(&read_empty.latencies);
    let s_full = common::summarize(&read_full.latencies);
    let s_sub1 = common::summarize(&submit_one.latencies);
    let s_read1 = common::summarize(&read_one.latencies);
    let rate = submit.ok as f64 / submit.wall.as_secs_f64();
    let read_rate = read_full.ok as f64 / read_full.wall.as_secs_f64();
    common::print_machine();
    println!(
        "binary: {} (INFERENCE_MODE=none, SQLite WAL), {} participants signed in (cookie) in {:.1} s, {} in flight; server log {}",
        bin.display(),
        args.participants,
        login_wall.as_secs_f64(),
        c,
        log.display()
    );
    let row = |what: &str, s: &Summary, ph: &Phase, goal: &str| {
        vec![
            what.to_string(),
            format!("{}", ph.ok),
            format!("{}", ph.failed),
            s.brief(),
            format!("{:.0}/s", ph.ok as f64 / ph.wall.as_secs_f64()),
            format!(
                "{:.0} / {:.0} us",
                ph.server_cpu_ms * 1000.0 / ph.ok.max(1) as f64,
                ph.client_cpu_ms * 1000.0 / ph.ok.max(1) as f64
            ),
            goal.to_string(),
        ]
    };
    let rows = vec![
        row("GET /api/prompt, empty queue", &s_empty, &read_empty, ""),
        row(
            &format!("POST /api/prompt, queue 0 -> {n}"),
            &s_sub,
            &submit,
            "p99 < 5 ms, > 2000/s",
        ),
        row(
            &format!("GET /api/prompt, {depth} queued"),
            &s_full,
            &read_full,
            "",
        ),
        row(
            &format!("POST /api/prompt at depth {depth}, one at a time"),
            &s_sub1,
            &submit_one,
            "p99 < 5 ms",
        ),
        row(
            &format!(
                "GET /api/prompt at depth {}, one at a time",
                depth + submit_one.ok as u64
            ),
            &s_read1,
            &read_one,
            "",
        ),
    ];
    common::print_table(
        &format!("submit ({c} in flight unless stated)"),
        &[
            "requests",
            "200",
            "failed",
            "p50 / p90 / p99 / max",
            "rate",
            "CPU per request: server / client",
            "goal",
        ],
        &rows,
    );
    println!(
        "queue depth at the end: {depth} (sum of each participant's queue_remaining); submit p99 / read p99 on the full queue: {:.1}x; RSS {:.1} -> {:.1} MiB",
        s_sub.p99_us / s_full.p99_us,
        mem_before.rss_mib(),
        mem_after.rss_mib()
    );
    if args.websockets {
        println!(
            "{} WebSockets open (one per participant, as the UI keeps); status messages received: {statuses}",
            args.participants
        );
    } else {
        println!("no WebSockets open (--websockets false): no status messages to send");
    }
    if let Some(f) = &submit.first_failure {
        println!("first refused submission: {f}");
    }
    let summary = json!({
        "bench": "submit",
        "machine": common::machine(),
        "jobs": n,
        "participants": args.participants,
        "concurrency": c,
        "websockets": args.websockets,
        "status_messages": statuses,
        "accepted": submit.ok,
        "refused": submit.failed,
        "wall_s": (submit.wall.as_secs_f64() * 1000.0).round() / 1000.0,
        "accepted_per_s": rate.round(),
        "submit": s_sub.json_ms(),
        "submit_server_cpu_us": (submit.server_cpu_ms * 1000.0 / submit.ok.max(1) as f64).round(),
        "read_full_server_cpu_us": (read_full.server_cpu_ms * 1000.0 / read_full.ok.max(1) as f64).round(),
        "read_empty_queue": s_empty.json_ms(),
        "read_full_queue": s_full.json_ms(),
        "read_full_per_s": read_rate.round(),
        "submit_one_at_a_time": s_sub1.json_ms(),
        "read_one_at_a_time": s_read1.json_ms(),
        "queue_depth_end": depth,
        "rss_mib_after": (mem_after.rss_mib() * 10.0).round() / 10.0,
        "goal": {"p99_ms": 5, "accepted_per_s": 2000},
    });
    println!("{summary}");
    Ok(())
}
