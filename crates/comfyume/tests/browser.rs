//! The participant's story in a real browser: headless Chromium (Debian's),
//! driven by Playwright, against the real `comfyume serve` binary serving the
//! unmodified ComfyUI frontend 1.37.11. Needs `scripts/install-test-deps.sh`
//! and `scripts/install-frontend.sh target/test-data` (scripts/test.sh runs both).

use crate::helpers;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use crate::frontend;
use frontend::{frontend_dir, repo};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_comfyume")
}

fn add_user(data: &Path, name: &str, password: &str) {
    add_account(data, name, password, false);
}

fn add_account(data: &Path, name: &str, password: &str, admin: bool) {
    let mut args = vec![
        "--data-dir",
        data.to_str().unwrap(),
        "users",
        "add",
        name,
        "--password-stdin",
    ];
    if admin {
        args.push("--admin");
    }
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(password.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(data: &Path) -> (Server, String) {
    spawn_server(data, Some("5"))
}

/// `step_ms` sets SIMULATOR_STEP_MS; None leaves the simulator at its default (as in the demo).
fn spawn_server(data: &Path, step_ms: Option<&str>) -> (Server, String) {
    let mut cmd = Command::new(bin());
    match step_ms {
        Some(ms) => cmd.env("SIMULATOR_STEP_MS", ms),
        None => cmd.env_remove("SIMULATOR_STEP_MS"),
    };
    cmd.args(helpers::serve_args(data, &frontend_dir()))
        .env("INFERENCE_MODE", "simulator")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    let (child, url) = helpers::spawn_serve(cmd);
    (Server(child), url)
}

fn node_script(script: &str, base: &str, out: &Path) {
    node_script_with(script, base, out, &[]);
}

fn node_script_with(script: &str, base: &str, out: &Path, extra_env: &[(&str, &str)]) {
    let dir = repo().join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/install-test-deps.sh"
    );
    let started = Instant::now();
    let output = Command::new("node")
        .arg(dir.join(script))
        .current_dir(&dir)
        .env("BASE_URL", base)
        .env("USER1", "user001")
        .env("PASS1", "first-secret")
        .env("USER2", "user002")
        .env("PASS2", "second-secret")
        .env("OUT_DIR", out)
        .envs(extra_env.iter().copied())
        .output()
        .expect("node runs (scripts/install-test-deps.sh installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed after {:?} ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\nscreenshots in {}",
        started.elapsed(),
        output.status,
        out.display()
    );
    println!("{script} passed in {:?}: {stdout}", started.elapsed());
}

/// user001 signs in, the canvas and node library load, a workflow saved with
/// Ctrl+S is there after a reload; user002 does not see it. Any uncaught page
/// error or failed request (other than the known harmless 404s) fails it.
#[test]
fn participant_story_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    add_user(&data, "user001", "first-secret");
    add_user(&data, "user002", "second-secret");
    let (_server, base) = start_server(&data);
    let out = tmp.path().join("screenshots");
    std::fs::create_dir_all(&out).unwrap();
    node_script("story.mjs", &base, &out);
}

/// The story: a new participant (user001) closes the Templates dialog, opens
/// "Flux.2 Klein 9B - text to image" from the Workflows sidebar, presses Run, gets every node's
/// `executing`, the sampler's `progress` 1..4 and the queue overlay naming the running node,
/// then `executed` with an image and `execution_success`; the image loads as PNG through
/// /user001/api/view on the Save Image node and in the Assets sidebar, all within 30 s of
/// pressing Run. The simulator runs at its default speed, as in the demo. Any uncaught page
/// error or failed request (other than the known harmless 404s) fails it.
#[test]
fn participant_runs_flux_klein_template_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    add_user(&data, "user001", "first-secret");
    let (_server, base) = spawn_server(&data, None);
    let out = tmp.path().join("screenshots");
    std::fs::create_dir_all(&out).unwrap();
    node_script("run.mjs", &base, &out);
}

/// The instructor's story (issue 11): the dashboard shows user001's new job within a second;
/// the instructor cancels it and user001's page hears it; policy and pause show on the
/// dashboard and the room view without a reload; a broadcast appears in user001's ComfyUI
/// until cleared; results show (a hostile file name as text); the zip holds the outputs.
/// The simulator is slowed (200 ms a step) so the cancelled blur is still running.
#[test]
fn instructor_dashboard_story_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    add_user(&data, "user001", "first-secret");
    add_account(&data, "teacher", "teacher-secret", true);
    let (_server, base) = spawn_server(&data, Some("200"));
    let out = tmp.path().join("screenshots");
    std::fs::create_dir_all(&out).unwrap();
    let shot = std::env::var("DASHBOARD_SCREENSHOT").unwrap_or_default();
    let mut env = vec![("ADMIN", "teacher"), ("ADMIN_PASS", "teacher-secret")];
    if !shot.is_empty() {
        env.push(("SCREENSHOT", shot.as_str()));
    }
    node_script_with("dashboard.mjs", &base, &out, &env);
}

/// Issue 12's story: a new participant (user001) signs in through the login page; the
/// first-run Templates browser lists the five workshop templates with their thumbnails; they
/// open "Flux.2 Klein 4B - text to image" from it and press the real Run button; the result
/// shows on the canvas; the Model Library lists the backend's diffusion models; the Assets
/// panel shows the result; a reload while a job runs shows its progress at once (the socket's
/// first messages after `status` are the job's `execution_start`, `executing` and
/// `progress_state`) and follows it to the end; "Download my work" from the Workflow menu
/// yields a zip holding that result, byte for byte. No page error, no failed request other
/// than the known harmless 404s.
#[test]
fn participant_workshop_story_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    add_user(&data, "user001", "first-secret");
    let (_server, base) = spawn_server(&data, None);
    let out = tmp.path().join("screenshots");
    std::fs::create_dir_all(&out).unwrap();
    node_script("workshop.mjs", &base, &out);
}

/// The LTX-2 distilled template through `comfyume serve`: a signed-in participant presses
/// Run, and the SaveVideo result is an H.264 MP4 in subfolder `video` of their own outputs
/// that the frontend's `<video>` plays (readyState 4, time advancing, the stamp drawn).
#[test]
fn ltx2_distilled_video_plays_through_serve_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    add_user(&data, "user001", "first-secret");
    let (_server, base) = start_server(&data);
    let out = tmp.path().join("screenshots");
    std::fs::create_dir_all(&out).unwrap();
    node_script("video.mjs", &base, &out);
    let video = data.join("outputs/user001/video");
    let mp4s: Vec<_> = std::fs::read_dir(&video)
        .unwrap_or_else(|e| panic!("{}: {e}", video.display()))
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".mp4"))
        .collect();
    assert_eq!(
        mp4s.len(),
        1,
        "the video is in the participant's own video/ folder"
    );
}
