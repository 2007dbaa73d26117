//! One replica's life as a process: the cold start, `comfyume-worker` started with its
//! own `comfyume-sim`, health probes, SIGTERM then SIGKILL on scale-down, SIGKILL without
//! notice on eviction, and its removal when the process is gone.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::DeploymentSettings;
use crate::scaling::Phase;
use crate::{Cmd, Emu, Health};

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The worker prints its address at once; this is generous for a loaded machine.
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) async fn run(
    emu: Arc<Emu>,
    s: DeploymentSettings,
    id: String,
    mut cmd: watch::Receiver<Cmd>,
    probe_now: Arc<Notify>,
) {
    let dep = s.name.clone();
    // Cold start: image pull and boot, before the process exists.
    let stopped_early = tokio::select! {
        _ = tokio::time::sleep(s.cold_start) => false,
        _ = cmd.wait_for(|c| *c != Cmd::Run) => true,
    };
    if stopped_early {
        emu.log(&dep, &id, "exited", "stopped before it started".into());
        remove(&emu, &dep, &id);
        return;
    }
    let mut child = match spawn(&emu, &s, &id) {
        Ok(c) => c,
        Err(e) => {
            emu.log(&dep, &id, "start_failed", e.to_string());
            remove(&emu, &dep, &id);
            return;
        }
    };
    let pid = child.id();
    set(&emu, &dep, &id, |r| {
        r.pid = pid;
        r.phase = Phase::Starting;
    });
    emu.log(
        &dep,
        &id,
        "process_started",
        format!("pid {}", pid.unwrap_or(0)),
    );

    let url = tokio::select! {
        u = read_address(&mut child) => u,
        _ = tokio::time::sleep(ADDRESS_TIMEOUT) => None,
        _ = cmd.wait_for(|c| *c != Cmd::Run) => None,
    };
    let Some(url) = url else {
        kill_tree(pid);
        let _ = child.wait().await;
        emu.log(&dep, &id, "exited", "no address from the worker".into());
        remove(&emu, &dep, &id);
        return;
    };
    set(&emu, &dep, &id, |r| r.url = Some(url.clone()));

    let mut kill_at: Option<Instant> = None;
    let exit = loop {
        let kill_deadline = async {
            match kill_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => break status,
            _ = kill_deadline => {
                emu.log(&dep, &id, "sigkill", format!("grace of {} ms over", s.grace.as_millis()));
                kill_tree(pid);
                kill_at = None;
            }
            changed = cmd.changed() => {
                if changed.is_err() {
                    continue;
                }
                let c = *cmd.borrow_and_update();
                match c {
                    Cmd::Run => {}
                    Cmd::Terminate if kill_at.is_none() => {
                        signal(pid, rustix::process::Signal::TERM);
                        emu.log(&dep, &id, "sigterm", String::new());
                        set(&emu, &dep, &id, |r| r.phase = Phase::Terminating);
                        kill_at = Some(Instant::now() + s.grace);
                    }
                    Cmd::Terminate => {}
                    Cmd::Kill => {
                        set(&emu, &dep, &id, |r| r.phase = Phase::Terminating);
                        kill_tree(pid);
                        emu.log(&dep, &id, "killed", String::new());
                    }
                }
            }
            _ = tick(&probe_now, emu.health_interval) => {
                let h = probe(&emu, &url).await;
                let mut became_ready = false;
                set(&emu, &dep, &id, |r| {
                    r.health = h;
                    if r.phase == Phase::Starting && matches!(h, Health::Ready | Health::Busy) {
                        r.phase = Phase::Running;
                        became_ready = true;
                    }
                });
                if became_ready {
                    emu.log(&dep, &id, "ready", String::new());
                }
                if h == Health::Ready {
                    emu.wake.notify_one();
                }
            }
        }
    };
    // Reaped now: its pid must not be signalled any more (it may be reused). What it
    // started was stopped by the worker itself, or killed with it above.
    let detail = match exit {
        Ok(status) => status.to_string(),
        Err(e) => e.to_string(),
    };
    emu.log(&dep, &id, "exited", detail);
    remove(&emu, &dep, &id);
}

async fn tick(probe_now: &Notify, every: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(every) => {}
        _ = probe_now.notified() => {}
    }
}

fn spawn(emu: &Emu, s: &DeploymentSettings, id: &str) -> std::io::Result<Child> {
    let dir = emu.data_dir.join(id);
    std::fs::create_dir_all(&dir)?;
    let mut sim = format!(
        "{} --listen 127.0.0.1:{{port}} --step-ms {} --data-dir {}",
        shell_quote(&emu.sim_bin.to_string_lossy()),
        s.step_ms,
        shell_quote(&dir.join("comfyui").to_string_lossy()),
    );
    for a in &emu.args.sim_args {
        sim.push(' ');
        sim.push_str(&shell_quote(a));
    }
    let mut cmd = Command::new(&emu.worker_bin);
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .env("COMFYUI_CMD", sim)
        .env("WORKER_DATA_DIR", dir.join("worker"))
        .env("WORKER_ID", id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in &emu.replica_env {
        cmd.env(k, v);
    }
    cmd.spawn()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The worker's first stdout line names its address; the rest is drained.
async fn read_address(child: &mut Child) -> Option<String> {
    let stdout = child.stdout.take()?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next_line().await.ok()??;
    let url = first
        .strip_prefix("comfyume-worker listening on ")?
        .trim()
        .to_owned();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Some(url)
}

async fn probe(emu: &Emu, url: &str) -> Health {
    let resp = emu
        .http
        .get(format!("{url}/health"))
        .timeout(PROBE_TIMEOUT)
        .send()
        .await;
    let Ok(resp) = resp else {
        return Health::Unhealthy;
    };
    if !resp.status().is_success() {
        return Health::Unhealthy;
    }
    // The provider's rules: 200 with a non-JSON body is healthy; JSON with status
    // ok/ready/healthy/running/up is ready, busy is busy, anything else unhealthy.
    let body = resp.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Err(_) => Health::Ready,
        Ok(v) => match v.get("status").and_then(|s| s.as_str()) {
            Some("ok" | "ready" | "healthy" | "running" | "up") => Health::Ready,
            Some("busy") => Health::Busy,
            _ => Health::Unhealthy,
        },
    }
}

fn set(emu: &Emu, dep: &str, id: &str, f: impl FnOnce(&mut crate::Replica)) {
    let mut w = emu.world();
    if let Some(r) = w
        .deps
        .get_mut(dep)
        .and_then(|d| d.replicas.iter_mut().find(|r| r.id == id))
    {
        f(r);
    }
}

fn remove(emu: &Emu, dep: &str, id: &str) {
    if let Some(d) = emu.world().deps.get_mut(dep) {
        d.replicas.retain(|r| r.id != id);
    }
    emu.wake.notify_one();
}

fn signal(pid: Option<u32>, sig: rustix::process::Signal) {
    if let Some(p) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// SIGKILL to a process and everything it started (read from /proc), children first
/// found, all killed: nothing of the replica survives.
fn kill_tree(pid: Option<u32>) {
    let Some(root) = pid else { return };
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        all.extend(children(all[i]));
        i += 1;
    }
    for p in all {
        signal(Some(p), rustix::process::Signal::KILL);
    }
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}
