//! The simulator alone in a real browser: `comfyume-sim --front-end-root --base-path` serves the
//! stock ComfyUI frontend 1.37.11; headless Chromium (Debian's) driven by Playwright
//! (tests/browser/video.mjs) runs the LTX-2 distilled template with the real Run button, and the
//! SaveVideo result, an H.264 MP4, plays in the frontend's <video> element (readyState 4).
//! Needs `scripts/install-test-deps.sh` and `scripts/install-frontend.sh target/test-data`
//! (scripts/test.sh runs both).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../../tests/support/frontend.rs"]
mod frontend;
use frontend::{frontend_dir, repo};

/// The simulator process and its data folder, both gone when the test ends however it ends.
struct Sim {
    child: Child,
    dir: PathBuf,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `comfyume-sim` on 127.0.0.1:0 under a random base path; returns it and its URL.
fn start_sim() -> (Sim, String) {
    let dir = std::env::temp_dir().join(format!(
        "comfyume-sim-browser-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let base = format!("/{}", uuid::Uuid::new_v4().simple());
    let mut child = Command::new(env!("CARGO_BIN_EXE_comfyume-sim"))
        .args(["--listen", "127.0.0.1:0", "--step-ms", "5", "--data-dir"])
        .arg(&dir)
        .arg("--front-end-root")
        .arg(frontend_dir())
        .args(["--base-path", &base])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keeps reading, so the simulator never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(url) = line.strip_prefix("comfyume-sim: simulated ComfyUI (no GPU) at ") {
                let _ = tx.send(url.to_string());
            } else {
                eprintln!("comfyume-sim: {line}");
            }
        }
    });
    let sim = Sim { child, dir };
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("comfyume-sim prints its URL");
    assert!(url.ends_with(&base), "{url} is under {base}");
    (sim, url)
}

#[test]
fn simulator_video_plays_in_chromium() {
    let browser_dir = repo().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/install-test-deps.sh"
    );
    let (_sim, url) = start_sim();
    let out = std::env::temp_dir().join(format!(
        "comfyume-sim-video-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let started = Instant::now();
    let output = Command::new("node")
        .arg(browser_dir.join("video.mjs"))
        .current_dir(&browser_dir)
        .env("BASE_URL", &url)
        .env("OUT_DIR", &out)
        // The simulator has no workflow-templates package (ComfyUI without one answers 404 too).
        .env("ALLOW_FAILED", r"/templates/(index|fuse_options)\.json$")
        .output()
        .expect("node runs (scripts/install-test-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "video.mjs failed after {:?} ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\nscreenshots in {}",
        started.elapsed(),
        output.status,
        out.display()
    );
    println!("video.mjs passed in {:?}: {stdout}", started.elapsed());
    let _ = std::fs::remove_dir_all(&out);
}
