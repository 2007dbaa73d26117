//! The object store path against a real S3-compatible server (moto, started here): a
//! 50 MB output goes to the store in constant memory, and an input named by key comes
//! from it.

use crate::helpers;

use std::process::Stdio;
use std::time::Duration;

use helpers::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Moto {
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

async fn moto() -> Moto {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // The Python that scripts/install-test-deps.sh installed moto into.
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let child = Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 -m moto.server (scripts/install-test-deps.sh installs moto)");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client().get(&url).send().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Moto { child, url }
}

/// VmHWM (peak resident memory) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test]
async fn a_50_mb_output_goes_through_the_store_in_constant_memory() {
    let s3 = moto().await;
    let c = client();
    // The bucket, made through the S3 API (moto accepts unsigned requests).
    let r = c.put(format!("{}/outputs", s3.url)).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    // 4200x4200 noise: its PNG does not compress, about 53 MB.
    let sim = sim(5).await;
    let big = noise_png(4200, 4200);
    assert!(big.len() > 50_000_000, "{}", big.len());
    std::fs::write(sim.input_dir().join("big.png"), &big).unwrap();
    drop(big);
    // A small input the job takes from the store by key.
    let small = noise_png(32, 24);
    let r = c
        .put(format!("{}/outputs/inputs/u1/small.png", s3.url))
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    let data = tempfile::tempdir().unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_comfyume-worker"));
    worker
        .args(["--listen", "127.0.0.1:0"])
        .env_clear()
        .env("COMFYUI_URL", sim.url())
        .env("WORKER_DATA_DIR", data.path())
        .env("OUTPUT_STORE_ENDPOINT", &s3.url)
        .env("OUTPUT_STORE_BUCKET", "outputs")
        .env("OUTPUT_STORE_REGION", "us-east-1")
        .env("OUTPUT_STORE_ACCESS_KEY_ID", "testing")
        .env("OUTPUT_STORE_SECRET_ACCESS_KEY", "testing")
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = worker.spawn().unwrap();
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let url = first
        .strip_prefix("comfyume-worker listening on ")
        .unwrap()
        .to_owned();
    wait_health(&url, "ready", Duration::from_secs(30)).await;

    // The input by key: fetched from the store, uploaded to ComfyUI, output inline.
    let mut body = run_body("s3-in", resave("mine/small.png", "small"));
    body["inputs"] = json!([{"name": "mine/small.png", "store_key": "inputs/u1/small.png"}]);
    let all = Events::new(post_run(&url, &body).await).rest().await;
    assert_eq!(all.last().unwrap()["type"], "result", "{:?}", all.last());
    let files = inline_files(&all);
    let out = image::load_from_memory(files.values().next().unwrap()).unwrap();
    assert_eq!((out.width(), out.height()), (32, 24));

    let before = peak_rss(pid);
    let all = Events::new(post_run(&url, &run_body("s3-big", resave("big.png", "big"))).await)
        .rest()
        .await;
    let peak = peak_rss(pid);
    let last = all.last().unwrap();
    assert_eq!(last["type"], "result", "{last}");
    let stored = all
        .iter()
        .find(|e| e["type"] == "output_stored")
        .expect("the large output went to the store");
    assert!(!types(&all).contains(&"output_chunk".to_owned()));
    let size = stored["size"].as_u64().unwrap();
    assert!(size > 50_000_000, "{size}");
    let key = stored["store"]["key"].as_str().unwrap();
    assert_eq!(stored["store"]["bucket"], "outputs");
    assert!(key.starts_with("outputs/s3-big/"), "{key}");
    assert_eq!(last["files"][0]["delivery"], "store");
    assert_eq!(last["files"][0]["store"]["key"], key);

    // The object is complete and what the worker says it is.
    let mut r = c
        .get(format!("{}/outputs/{key}", s3.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut hash = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = r.chunk().await.unwrap() {
        got += chunk.len() as u64;
        hash.update(&chunk);
    }
    assert_eq!(got, size);
    assert_eq!(hex(&hash.finalize()), stored["sha256"].as_str().unwrap());

    // Constant memory: the worker's peak grew by far less than the 50 MB it moved.
    let growth = peak.saturating_sub(before);
    eprintln!(
        "worker peak RSS before {} MiB, after {} MiB, output {} MiB",
        before >> 20,
        peak >> 20,
        size >> 20
    );
    assert!(growth < 32 * 1024 * 1024, "peak RSS grew by {growth} bytes");

    // A retry of the finished job gets the same key again, nothing is run or stored anew.
    let again = Events::new(post_run(&url, &run_body("s3-big", resave("big.png", "big"))).await)
        .rest()
        .await;
    assert_eq!(again[0]["replay"], true);
    let replayed = again.iter().find(|e| e["type"] == "output_stored").unwrap();
    assert_eq!(replayed["store"]["key"], key);
    assert_eq!(again.last(), all.last());
    assert_eq!(sim.state().prompts_received, 2);
    // Killed and reaped here: nothing is left behind when the test process ends.
    child.kill().await.unwrap();
    s3.stop().await;
}
