//! Watching ComfyUI: start and supervise it (`COMFYUI_CMD`) or attach to a running one,
//! tell when it answers, fetch its node definitions, run the warm-up workflow, notice
//! when it dies, restart it with backoff.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use comfyume_comfyui::{BackendError, JobSpec, OutcomeKind};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::Comfy;
use crate::{Shared, lock};

/// One probe's time limit.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Probes while ComfyUI is up, and while waiting for it.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const WAIT_PROBE_EVERY: Duration = Duration::from_millis(200);
/// Failed probes in a row before ComfyUI counts as down.
const PROBE_STRIKES: u32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Up this long: the next failure starts the backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// SIGTERM to ComfyUI, then SIGKILL after this.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why ComfyUI stopped being usable.
enum Gone {
    Exited(String),
    NotAnswering,
    Shutdown,
}

/// The supervisor task: runs until `stop` is cancelled, then stops the ComfyUI it started.
pub(crate) async fn supervise(shared: Arc<Shared>, cmd: Option<String>, stop: CancellationToken) {
    let mut backoff = BACKOFF_FIRST;
    let mut first = true;
    loop {
        if stop.is_cancelled() {
            return;
        }
        if first || cmd.is_some() {
            shared.set_comfy(Comfy::Starting);
        }
        first = false;
        let mut child = match &cmd {
            Some(c) => match spawn(c) {
                Ok(child) => Some(child),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start ComfyUI");
                    shared.set_comfy(Comfy::Down(format!("ComfyUI could not be started: {e}")));
                    if sleep_or_stop(backoff, &stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
            None => None,
        };
        let up_since = Instant::now();
        let life = async {
            if let Err(g) = wait_answering(&shared, &mut child).await {
                return g;
            }
            tracing::info!("ComfyUI answers");
            if let Err(g) = prepare_until_ready(&shared, &mut child).await {
                return g;
            }
            watch_alive(&shared, &mut child).await
        };
        let gone = tokio::select! {
            g = life => g,
            _ = stop.cancelled() => Gone::Shutdown,
        };
        let reason = match gone {
            Gone::Shutdown => {
                if let Some(child) = child {
                    stop_child(child).await;
                }
                return;
            }
            Gone::Exited(why) => why,
            Gone::NotAnswering => "ComfyUI is not answering".to_owned(),
        };
        tracing::error!(reason = %reason, "ComfyUI is down");
        shared.set_comfy(Comfy::Down(reason));
        shared.deaths.send_modify(|n| *n += 1);
        *lock(&shared.object_info) = None;
        if let Some(child) = child {
            // Hung rather than dead: make sure it is gone before a new one starts.
            stop_child(child).await;
        }
        if cmd.is_some() {
            if up_since.elapsed() >= STABLE_AFTER {
                backoff = BACKOFF_FIRST;
            }
            tracing::info!(after_ms = backoff.as_millis() as u64, "restarting ComfyUI");
            if sleep_or_stop(backoff, &stop).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// True if `stop` fired first.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}

fn spawn(cmd: &str) -> std::io::Result<Child> {
    let program = cmd.split_whitespace().next().unwrap_or_default();
    // Only the program: the rest of the command line may hold secrets.
    tracing::info!(program, "starting ComfyUI");
    Command::new("sh")
        .arg("-c")
        // `exec`: the signal goes to ComfyUI itself, not to a shell.
        .arg(format!("exec {cmd}"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

async fn child_exit(child: &mut Option<Child>) -> String {
    match child {
        Some(c) => match c.wait().await {
            Ok(status) => format!("ComfyUI exited ({status})"),
            Err(e) => format!("ComfyUI could not be waited for: {e}"),
        },
        None => std::future::pending().await,
    }
}

async fn probe(shared: &Shared) -> bool {
    let url = format!("{}/system_stats", shared.comfy_url.trim_end_matches('/'));
    matches!(shared.probe.get(url).send().await, Ok(r) if r.status().is_success())
}

async fn wait_answering(shared: &Shared, child: &mut Option<Child>) -> Result<(), Gone> {
    let wait = async {
        while !probe(shared).await {
            tokio::time::sleep(WAIT_PROBE_EVERY).await;
        }
    };
    tokio::select! {
        _ = wait => Ok(()),
        why = child_exit(child) => Err(Gone::Exited(why)),
    }
}

/// Node definitions, then the warm-up; retried with backoff while ComfyUI lives.
async fn prepare_until_ready(shared: &Shared, child: &mut Option<Child>) -> Result<(), Gone> {
    let mut backoff = BACKOFF_FIRST;
    loop {
        shared.set_comfy(Comfy::WarmingUp);
        let res = tokio::select! {
            r = prepare(shared) => r,
            why = child_exit(child) => return Err(Gone::Exited(why)),
        };
        match res {
            Ok(()) => {
                shared.set_comfy(Comfy::Ready);
                tracing::info!("worker ready");
                return Ok(());
            }
            Err(e) => {
                tracing::error!(error = %e, "warm-up failed; retrying");
                shared.set_comfy(Comfy::WarmupFailed(e));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    why = child_exit(child) => return Err(Gone::Exited(why)),
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if !probe(shared).await {
                    return Err(Gone::NotAnswering);
                }
            }
        }
    }
}

async fn prepare(shared: &Shared) -> Result<(), String> {
    let info = shared
        .comfy
        .object_info()
        .await
        .map_err(|e| format!("object_info: {e}"))?;
    let body = serde_json::to_vec(&info).map_err(|e| e.to_string())?;
    *lock(&shared.object_info) = Some(Bytes::from(body));
    if let Some(prompt) = &shared.warmup {
        let limit = Duration::from_secs(shared.args.warmup_timeout_secs.max(1));
        tokio::time::timeout(limit, warm_up(shared, prompt.clone()))
            .await
            .map_err(|_| format!("no result within {} s", limit.as_secs()))??;
    }
    Ok(())
}

async fn warm_up(shared: &Shared, prompt: serde_json::Value) -> Result<(), String> {
    let id = format!("warmup-{}", uuid::Uuid::new_v4().simple());
    let dir = shared.jobs_dir.join(&id);
    let spec = JobSpec {
        id: id.clone(),
        user: "warmup".into(),
        prompt,
        extra_data: json!({}),
        outputs_to_execute: vec![],
        inputs: vec![],
        output_dir: dir.join("output"),
        temp_dir: dir.join("temp"),
        attempt: 1,
        reattach: false,
    };
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel(64);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let (_itx, irx) = watch::channel(false);
    let res = shared.comfy.run(spec, tx, irx).await;
    drain.abort();
    let _ = tokio::fs::remove_dir_all(&dir).await;
    match res {
        Ok(o) => match o.kind {
            OutcomeKind::Success => {
                tracing::info!(ms = started.elapsed().as_millis() as u64, "warm-up ran");
                Ok(())
            }
            OutcomeKind::ExecutionError(data) => Err(format!(
                "{}: {}",
                data.get("node_type")
                    .and_then(|v| v.as_str())
                    .unwrap_or("node"),
                data.get("exception_message")
                    .and_then(|v| v.as_str())
                    .unwrap_or("error")
                    .trim()
            )),
            OutcomeKind::Interrupted(_) => Err("interrupted".into()),
        },
        Err(BackendError::Rejected(body)) => Err(format!(
            "ComfyUI refused the workflow: {}",
            body.pointer("/error/message")
                .and_then(|v| v.as_str())
                .unwrap_or("invalid prompt")
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Until ComfyUI exits or stops answering.
async fn watch_alive(shared: &Shared, child: &mut Option<Child>) -> Gone {
    let probes = async {
        let mut strikes = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                // A job just failed to reach it: one failed probe is enough.
                _ = shared.check_comfy.notified() => {
                    if !probe(shared).await {
                        return;
                    }
                    continue;
                }
            }
            if probe(shared).await {
                strikes = 0;
            } else {
                strikes += 1;
                tracing::warn!(strikes, "ComfyUI did not answer a probe");
                if strikes >= PROBE_STRIKES {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = probes => Gone::NotAnswering,
        why = child_exit(child) => Gone::Exited(why),
    }
}

/// A job could not reach ComfyUI: if a probe fails too, have the supervisor mark it
/// down now (not after its strikes), so health stops saying ready before the job's
/// `aborted` goes out.
pub(crate) async fn suspect(shared: &Shared) {
    if probe(shared).await {
        return;
    }
    shared.check_comfy.notify_one();
    let deadline = Instant::now() + PROBE_TIMEOUT * 2;
    while shared.lock().health.comfy == Comfy::Ready && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM, then SIGKILL after a grace.
async fn stop_child(mut child: Child) {
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        if let Ok(res) = tokio::time::timeout(STOP_GRACE, child.wait()).await {
            tracing::info!(status = ?res.ok(), "ComfyUI stopped");
            return;
        }
        tracing::warn!("ComfyUI did not stop after SIGTERM; killing it");
    }
    let _ = child.kill().await;
}
