//! The real binary under a burst of submissions from 20 participants, killed
//! with SIGKILL mid-burst and restarted: every job that was answered 200 is
//! present, in order, exactly once.

use crate::helpers;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_comfyume")
}

/// Starts `serve` with jobs held in the queue (no backend drains it), and
/// returns the child and its base URL.
fn serve(data: &Path, frontend: &Path) -> (Child, String) {
    let mut cmd = Command::new(bin());
    cmd.args(helpers::serve_args(data, frontend))
        .env("INFERENCE_MODE", "local")
        // A closed port: jobs wait (and are retried) but none completes during the test.
        .env("COMFYUI_URLS", "http://127.0.0.1:9")
        .env("MAX_QUEUED_PER_USER", "10000")
        .env("MAX_QUEUE_DEPTH", "100000")
        .env("MAX_RUNNING_PER_USER", "0")
        .env("RUST_LOG", "error")
        .stderr(Stdio::null());
    helpers::spawn_serve(cmd)
}

fn prompt(n: usize) -> Value {
    json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": n % 1000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "crash"}}
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_no_acknowledged_job() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let frontend = tmp.path().join("frontend");
    helpers::fake_frontend(&frontend);
    let csv = tmp.path().join("sheet.csv");
    let out = Command::new(bin())
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "users",
            "create-workshop",
            "--count",
            "20",
        ])
        .args(["--csv", csv.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let users: Vec<(String, String)> = std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            (f.next().unwrap().to_string(), f.next().unwrap().to_string())
        })
        .collect();
    assert_eq!(users.len(), 20);
    // The object_info snapshot: the real ComfyUI capture, so EmptyImage validates.
    let info = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/comfyui/api/object_info.json"
    );
    assert!(
        Command::new(bin())
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "object-info",
                "import",
                info
            ])
            .output()
            .unwrap()
            .status
            .success()
    );

    let (mut child, base) = serve(&data, &frontend);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let acked: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let mut tasks = Vec::new();
    for (user, pass) in users.clone() {
        let (client, base, acked) = (client.clone(), base.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..400 {
                let r = client
                    .post(format!("{base}/api/prompt"))
                    .basic_auth(&user, Some(&pass))
                    .json(&prompt(n))
                    .send()
                    .await;
                let Ok(r) = r else { return };
                if r.status() != 200 {
                    return;
                }
                let Ok(body) = r.json::<Value>().await else {
                    return;
                };
                let id = body["prompt_id"].as_str().unwrap().to_string();
                acked
                    .lock()
                    .unwrap()
                    .entry(user.clone())
                    .or_default()
                    .push(id);
            }
        }));
    }
    // Mid-burst: wait until a good number of jobs were answered, then SIGKILL.
    for _ in 0..200 {
        let n: usize = acked.lock().unwrap().values().map(Vec::len).sum();
        if n >= 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(
        total >= 300,
        "the burst was answered ({total} jobs) before the kill"
    );
    assert!(total < 20 * 400, "the kill happened mid-burst");

    let (mut child, base) = serve(&data, &frontend);
    for (user, pass) in &users {
        let r: Value = client
            .get(format!("{base}/api/jobs?sort_by=created_at&sort_order=asc"))
            .basic_auth(user, Some(pass))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let present: Vec<&str> = r["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap())
            .collect();
        let mine = acked.get(user).cloned().unwrap_or_default();
        // Exactly once each, and in the order they were answered.
        let mut last = None;
        for id in &mine {
            let at: Vec<usize> = present
                .iter()
                .enumerate()
                .filter(|(_, p)| **p == id)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(
                at.len(),
                1,
                "{user}'s acknowledged job {id} present exactly once after the crash"
            );
            assert!(
                last.is_none_or(|l| at[0] > l),
                "{user}'s jobs keep their order"
            );
            last = Some(at[0]);
        }
        // At most one job more than acknowledged (accepted, answer lost in the kill).
        assert!(
            present.len() <= mine.len() + 1,
            "{user}: {} present, {} acknowledged",
            present.len(),
            mine.len()
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A copy of an output cut short by a kill leaves its hidden part file behind: the next
/// start removes it once nobody has written to it for an hour, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_files_left_by_a_killed_copy_are_removed_at_start() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let frontend = tmp.path().join("frontend");
    helpers::fake_frontend(&frontend);
    let video = data.join("outputs").join("user001").join("video");
    std::fs::create_dir_all(&video).unwrap();
    let stale = video.join(".comfyume-0123.part");
    let recent = video.join(".comfyume-4567.part");
    let output = video.join("clip.mp4");
    for p in [&stale, &recent, &output] {
        std::fs::write(p, b"bytes").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    for p in [&stale, &output] {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(two_hours_ago).unwrap();
    }
    let (mut child, _url) = serve(&data, &frontend);
    let gone = helpers::eventually(10_000, || !stale.exists()).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(gone, "the stale part file is still there");
    assert!(recent.exists(), "a copy that may be under way was removed");
    assert_eq!(std::fs::read(&output).unwrap(), b"bytes");
}
