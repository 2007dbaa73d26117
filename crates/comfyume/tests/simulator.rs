//! The built-in simulator `serve` starts has no login, like ComfyUI itself. It listens on
//! loopback under a random path prefix only `serve` knows: a request to its port without the
//! prefix gets 404 (another local user cannot submit to it), and the participants' jobs still
//! run on it through `serve`.

use crate::helpers;

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn add_user(data: &Path, name: &str, password: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_comfyume"))
        .arg("--data-dir")
        .arg(data)
        .args(["users", "add", name, "--password-stdin"])
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

/// `serve` with the simulator; returns it, its URL and the simulator's `host:port`.
fn start(data: &Path, frontend: &Path) -> (Server, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_comfyume"))
        .args(helpers::serve_args(data, frontend))
        .env("INFERENCE_MODE", "simulator")
        .env("SIMULATOR_STEP_MS", "1")
        .env_remove("SIMULATOR_BASE_PATH")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let (mut url, mut sim) = (None, None);
    while url.is_none() || sim.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve prints its URL and the simulator's address");
        if let Some(u) = line.strip_prefix("listening on ") {
            url = Some(u.to_string());
        }
        if let Some(rest) = line.strip_prefix("backend: simulator at ") {
            sim = rest.split_whitespace().next().map(str::to_string);
        }
    }
    (server, url.unwrap(), sim.unwrap())
}

#[tokio::test]
async fn builtin_simulator_answers_only_under_serves_secret_path() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let frontend = tmp.path().join("frontend");
    helpers::fake_frontend(&frontend);
    add_user(&data, "user001", "first-secret");
    let (_server, url, sim) = start(&data, &frontend);
    assert!(sim.starts_with("127.0.0.1:"), "loopback only: {sim}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Someone else on the machine finds the port: nothing answers there but 404.
    for path in [
        "/",
        "/prompt",
        "/api/prompt",
        "/object_info",
        "/queue",
        "/history",
        "/system_stats",
        "/view?filename=x.png",
        "/sim/state",
    ] {
        let r = http
            .get(format!("http://{sim}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "GET {path}");
    }
    for path in ["/prompt", "/api/prompt", "/interrupt", "/queue"] {
        let r = http
            .post(format!("http://{sim}{path}"))
            .json(&json!({"prompt": helpers::workflow("nomodel.json")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "POST {path}");
    }
    match tokio_tungstenite::connect_async(format!("ws://{sim}/ws")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 404)
        }
        other => panic!("a WebSocket without the prefix: {other:?}"),
    }

    // The participant's job runs on it through serve all the same.
    let r = http
        .post(format!("{url}/user001/api/prompt"))
        .basic_auth("user001", Some("first-secret"))
        .json(&json!({"prompt": helpers::workflow("nomodel.json"), "client_id": "tab"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["prompt_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let entry = loop {
        let h: Value = http
            .get(format!("{url}/user001/api/history/{id}"))
            .basic_auth("user001", Some("first-secret"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(e) = h.get(&id).filter(|e| e["status"]["completed"].is_boolean()) {
            break e.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    let image = &entry["outputs"]["3"]["images"][0];
    let r = http
        .get(format!("{url}/user001/api/view"))
        .query(&[
            ("filename", image["filename"].as_str().unwrap()),
            ("subfolder", image["subfolder"].as_str().unwrap()),
            ("type", "output"),
        ])
        .basic_auth("user001", Some("first-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(image::load_from_memory(&r.bytes().await.unwrap()).is_ok());
}
