//! `dispatch-latency`: on an idle system, the time from sending `POST /api/prompt`
//! to the (simulated) GPU server accepting the prompt, against a `POST /prompt`
//! sent straight to that server, interleaved in the same run. In-process:
//! simulator, gateway and dispatcher as `serve` wires them. "Accepted" is the
//! simulator's `status` broadcast, seen by an observer WebSocket (event-driven,
//! the same signal for both paths).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comfyume_dispatch::comfyui::ComfyUiBackend;
use comfyume_dispatch::{Backend, DispatchConfig, Dispatcher, QueueConfig, Timeouts};
use comfyume_store::{JobState, Role, Store};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::common::{self, Ws};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Measured runs of each path (after 3 unmeasured warm-up runs).
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// Backend slots of the simulator.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
}

const USER: &str = "user001";
const PASSWORD: &str = "bench password 1";

/// Reads whatever is pending on the observer until it has been quiet for 5 ms.
async fn drain(ws: &mut Ws) {
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(5), ws.next()).await {}
}

/// Waits for the simulator's next `status` broadcast; when it arrived.
async fn next_status(ws: &mut Ws) -> Result<Instant> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = common::next_json(ws, deadline).await?;
        if v["type"] == "status" {
            return Ok(Instant::now());
        }
    }
}

async fn wait_until(what: &str, mut cond: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cond().await? {
            return Ok(());
        }
        common::check_deadline(deadline, what)?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub async fn run(a: Args) -> Result<()> {
    let client = common::http_client()?;
    let sim = common::spawn_sim(0).await?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let frontend = tmp.path().join("frontend");
    std::fs::create_dir_all(&data)?;
    std::fs::create_dir_all(&frontend)?;
    std::fs::write(
        frontend.join("index.html"),
        "<!doctype html><title>ComfyUI</title>",
    )?;
    let store: Arc<dyn Store> =
        Arc::new(comfyume_store::sqlite::SqliteStore::open(&data.join("comfyume.db")).await?);
    store.create_user(USER, PASSWORD, Role::Participant).await?;
    let settings = comfyume_gateway::Settings::with_data_dir(&data, &frontend);
    let (state, in_flight) =
        comfyume_gateway::build_state(settings, store.clone(), QueueConfig::default()).await?;
    let backend: Arc<dyn Backend> = Arc::new(ComfyUiBackend::new(
        "simulator",
        sim.url(),
        a.slots,
        Timeouts::default(),
    )?);
    let info = backend.object_info().await?;
    comfyume_gateway::replace_object_info(&state, info, "backend").await?;
    let dispatcher = Dispatcher::new(
        state.queue.clone(),
        vec![backend],
        DispatchConfig::default(),
        data.clone(),
    );
    let _dispatch = dispatcher.start(in_flight);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(comfyume_gateway::launch(state.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    let cookie = common::login(&client, &base, USER, PASSWORD).await?;
    let mut observer =
        common::ws_connect(&format!("{}?clientId=bench-observer", sim.ws_url()), &[]).await?;

    let warm = 3;
    let mut via_serve = Vec::new();
    let mut via_serve_resp = Vec::new();
    let mut direct = Vec::new();
    for i in 0..(a.runs + warm) {
        // Through the gateway: queue, dispatcher, backend client, POST /prompt.
        drain(&mut observer).await;
        let body =
            json!({"client_id": "bench-tab", "prompt": common::tiny_prompt(2 * i as u64 + 1)});
        let t0 = Instant::now();
        let post = {
            let rb = client
                .post(format!("{base}/{USER}/api/prompt"))
                .header("cookie", &cookie)
                .header("content-type", "application/json")
                .body(body.to_string());
            tokio::spawn(async move {
                let r = rb.send().await?;
                let at = Instant::now();
                let v: Value = r.error_for_status()?.json().await?;
                Ok::<_, reqwest::Error>((at, v))
            })
        };
        let seen = next_status(&mut observer).await?;
        let (answered, v) = post.await??;
        let id = v["prompt_id"]
            .as_str()
            .context("POST /api/prompt answered without prompt_id")?
            .to_string();
        if i >= warm {
            via_serve.push(seen - t0);
            via_serve_resp.push(answered - t0);
        }
        wait_until("the job to end", async || {
            Ok(store
                .get_job(&id)
                .await?
                .is_some_and(|j| j.state == JobState::Succeeded))
        })
        .await?;

        // Straight at the simulator.
        drain(&mut observer).await;
        let before = sim.state().jobs_succeeded;
        let body =
            json!({"client_id": "bench-direct", "prompt": common::tiny_prompt(2 * i as u64 + 2)});
        let t0 = Instant::now();
        let post = {
            let rb = client
                .post(format!("{}/prompt", sim.url()))
                .header("content-type", "application/json")
                .body(body.to_string());
            tokio::spawn(async move { rb.send().await?.error_for_status() })
        };
        let seen = next_status(&mut observer).await?;
        post.await??;
        if i >= warm {
            direct.push(seen - t0);
        }
        wait_until("the direct job to end", async || {
            let s = sim.state();
            Ok(s.jobs_succeeded > before && s.current_job.is_none() && s.queue_pending == 0)
        })
        .await?;
        // Idle between runs.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = sim.state();
    if st.jobs_failed > 0 {
        bail!("{} simulator jobs failed", st.jobs_failed);
    }
    let _ = stop_tx.send(());
    let _ = server.await;

    let s_serve = common::summarize(&via_serve);
    let s_resp = common::summarize(&via_serve_resp);
    let s_direct = common::summarize(&direct);
    common::print_machine();
    println!(
        "in-process: simulator (step_ms 0, {} slots) + gateway + dispatcher + SQLite; idle between runs; {} runs each, interleaved",
        a.slots, a.runs
    );
    let rows = vec![
        vec![
            "POST /api/prompt -> simulator accepted the prompt".into(),
            s_serve.brief(),
            format!("{:.2} x direct (p50)", s_serve.p50_us / s_direct.p50_us),
        ],
        vec![
            "POST /api/prompt -> its 200 (the job is durable)".into(),
            s_resp.brief(),
            String::new(),
        ],
        vec![
            "POST /prompt straight to the simulator -> accepted".into(),
            s_direct.brief(),
            "baseline".into(),
        ],
        vec![
            "dispatch overhead (p50 difference)".into(),
            format!("{} ms", common::ms(s_serve.p50_us - s_direct.p50_us)),
            String::new(),
        ],
    ];
    common::print_table(
        "dispatch-latency",
        &["path", "p50 / p90 / p99 / max", "comparison"],
        &rows,
    );
    let summary = json!({
        "bench": "dispatch-latency",
        "machine": common::machine(),
        "runs": a.runs,
        "via_serve": s_serve.json_ms(),
        "via_serve_http_200": s_resp.json_ms(),
        "direct": s_direct.json_ms(),
        "ratio_p50": (s_serve.p50_us / s_direct.p50_us * 100.0).round() / 100.0,
    });
    println!("{summary}");
    Ok(())
}
