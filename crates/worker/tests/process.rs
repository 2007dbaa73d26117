//! The real `comfyume-worker` binary: it starts and supervises ComfyUI (the simulator's
//! binary here), restarts it when it dies, and on SIGTERM aborts a running job within
//! its configured grace and exits.

use crate::helpers;
use crate::workspace_bin;

use std::process::Stdio;
use std::time::Duration;

use helpers::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use workspace_bin::workspace_bin;

/// A worker process; killed (its process group) when dropped.
struct WorkerProcess {
    child: Child,
    url: String,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl WorkerProcess {
    fn pid(&self) -> Option<rustix::process::Pid> {
        self.child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
    }

    fn sigterm(&self) {
        rustix::process::kill_process(self.pid().unwrap(), rustix::process::Signal::TERM).unwrap();
    }

    /// The ComfyUI process it started (its only child).
    fn comfyui_pid(&self) -> Option<i32> {
        let pid = self.child.id()?;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            if let Some(c) = children.split_whitespace().next() {
                return c.parse().ok();
            }
        }
        None
    }
}

async fn spawn_worker(envs: &[(&str, String)]) -> WorkerProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfyume-worker"));
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group: the test can kill it and its ComfyUI together.
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the worker prints its address")
        .unwrap()
        .unwrap();
    let url = first
        .strip_prefix("comfyume-worker listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .to_owned();
    // Keep draining stdout (ComfyUI's output goes there too).
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    WorkerProcess { child, url }
}

fn sim_cmd(step_ms: u64) -> String {
    let sim = workspace_bin("comfyume-sim", "comfyume-sim", &["sim", "wire"]);
    format!(
        "{} --listen 127.0.0.1:{{port}} --step-ms {step_ms}",
        sim.display()
    )
}

fn pid_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test]
async fn the_binary_supervises_comfyui_and_restarts_it_when_it_dies() {
    let data = tempfile::tempdir().unwrap();
    let w = spawn_worker(&[
        ("COMFYUI_CMD", sim_cmd(100)),
        ("WORKER_DATA_DIR", data.path().display().to_string()),
    ])
    .await;
    wait_health(&w.url, "ready", Duration::from_secs(60)).await;
    let first = w.comfyui_pid().expect("ComfyUI runs as the worker's child");

    // ComfyUI dies mid-job: the job is aborted, health turns 503, ComfyUI comes back.
    let mut events = Events::new(post_run(&w.url, &run_body("sup-1", sampler(50, 1))).await);
    events.until("started").await;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(first).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let rest = events.rest().await;
    let last = rest.last().unwrap();
    assert_eq!(last["type"], "aborted", "{last}");
    assert!(
        matches!(
            last["reason"].as_str(),
            Some("comfyui_died" | "comfyui_lost_job" | "comfyui_unreachable")
        ),
        "{last}"
    );
    let seen = wait_health(&w.url, "ready", Duration::from_secs(60)).await;
    assert!(
        seen.iter().any(|s| s == "unhealthy" || s == "starting"),
        "{seen:?}"
    );
    let second = w.comfyui_pid().unwrap();
    assert_ne!(first, second, "a new ComfyUI process");

    // And it works again.
    let all = Events::new(post_run(&w.url, &run_body("sup-2", nomodel("s"))).await)
        .rest()
        .await;
    assert_eq!(all.last().unwrap()["type"], "result");

    // SIGTERM with no job: the worker stops its ComfyUI and exits 0.
    w.sigterm();
    let mut w = w;
    let status = tokio::time::timeout(Duration::from_secs(20), w.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pid_alive(second) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ComfyUI left running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_mid_job_gives_aborted_within_the_configured_grace_then_exit() {
    let sim = sim(200).await;
    let w = spawn_worker(&[
        ("COMFYUI_URL", sim.url()),
        ("WORKER_ABORT_AFTER_SECS", "1".into()),
        ("LOG_FORMAT", "json".into()),
    ])
    .await;
    wait_health(&w.url, "ready", Duration::from_secs(30)).await;
    let mut events = Events::new(post_run(&w.url, &run_body("t-1", sampler(500, 1))).await);
    events.until("started").await;
    let t0 = std::time::Instant::now();
    w.sigterm();
    wait_health(&w.url, "stopping", Duration::from_secs(5)).await;
    let rest = events.rest().await;
    let last = rest.last().unwrap();
    assert_eq!(last["type"], "aborted");
    assert_eq!(last["reason"], "sigterm");
    let mut w = w;
    let status = tokio::time::timeout(Duration::from_secs(20), w.child.wait())
        .await
        .expect("exits after the job")
        .unwrap();
    assert!(status.success(), "{status}");
    // The abort came after the 1 s grace (order, not speed, is what is asserted).
    assert!(t0.elapsed() >= Duration::from_secs(1));
    // The job was interrupted on ComfyUI, not left running.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.state().current_job.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "job still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn logs_are_json_lines_without_secrets() {
    let sim = sim(5).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfyume-worker"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .env("COMFYUI_URL", sim.url())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .env("WORKER_TOKEN", "tok-SECRET-1")
        .env("OUTPUT_STORE_ENDPOINT", "http://127.0.0.1:9")
        .env("OUTPUT_STORE_BUCKET", "b")
        .env("OUTPUT_STORE_ACCESS_KEY_ID", "ID-SECRET-2")
        .env("OUTPUT_STORE_SECRET_ACCESS_KEY", "KEY-SECRET-3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = out
        .next_line()
        .await
        .unwrap()
        .unwrap()
        .strip_prefix("comfyume-worker listening on ")
        .unwrap()
        .to_owned();
    let stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut all = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push(l);
        }
        all
    });
    wait_health(&url, "ready", Duration::from_secs(30)).await;
    let c = client();
    let mut body = run_body("log-1", nomodel("l"));
    body["extra_data"]["api_key_comfy_org"] = "COMFY-SECRET-4".into();
    let r = c
        .post(format!("{url}/run"))
        .bearer_auth("wrong-SECRET-5")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{url}/run"))
        .header("x-worker-token", "tok-SECRET-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        Events::new(r).rest().await.last().unwrap()["type"],
        "result"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(child.wait().await.unwrap().success());
    let lines = logs.await.unwrap();
    assert!(lines.len() > 5, "{lines:?}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        assert!(
            v.get("level").is_some() && v.get("message").is_some(),
            "{l}"
        );
        assert!(!l.contains("SECRET"), "a secret in the logs: {l}");
    }
}
