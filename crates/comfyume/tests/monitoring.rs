//! Monitoring as an operator sees it: the real `comfyume serve` (a process, so its metrics
//! recorder is its own) runs a small workshop on a simulator; its `/metrics` passes
//! `promtool check metrics` and agrees with the store; a real Prometheus started with the
//! shipped configuration scrapes it and answers every query of the shipped dashboard and
//! rules; the shipped rules pass `promtool` and their unit tests; and with every secret of
//! a workshop in play at `RUST_LOG=trace`, no log line or metric shows one.

use crate::helpers;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use comfyume_store::{JobState, JobStore};
use serde_json::{Value, json};

/// `deploy/monitoring/` of this repository.
fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/monitoring")
}

/// A tool of Debian's `prometheus` package (scripts/install-test-deps.sh installs it).
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: run scripts/install-test-deps.sh (Debian's prometheus package)"
    );
}

/// Runs a tool, feeding `stdin`; its exit status and everything it printed.
fn run_tool(mut cmd: Command, stdin: Option<&[u8]>) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        input.write_all(b).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A child process killed (by its own pid) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `comfyume serve` process on free ports, its stderr in a file.
struct Serve {
    proc: Proc,
    base: String,
    metrics: String,
    data: PathBuf,
    /// Its stderr: the log lines.
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Serve {
    /// Accounts `(name, password, admin)` are created first with the CLI.
    fn start(accounts: &[(&str, &str, bool)], env: &[(&str, &str)]) -> Serve {
        use std::io::BufRead;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let frontend = tmp.path().join("frontend");
        helpers::fake_frontend(&frontend);
        for (name, password, admin) in accounts {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfyume"));
            cmd.arg("--data-dir")
                .arg(&data)
                .args(["users", "add", name, "--password-stdin"]);
            if *admin {
                cmd.arg("--admin");
            }
            let (ok, out) = run_tool(cmd, Some(format!("{password}\n").as_bytes()));
            assert!(ok, "users add {name}: {out}");
        }
        let log = tmp.path().join("serve.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfyume"));
        cmd.args(helpers::serve_args(&data, &frontend))
            .current_dir(tmp.path())
            .env_remove("RUST_LOG")
            .env_remove("LOG_FORMAT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let proc = Proc(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let (mut base, mut metrics) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while base.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "serve did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            if let Some(u) = line.strip_prefix("metrics on ") {
                metrics = Some(u.to_string());
            }
            if let Some(u) = line.strip_prefix("listening on ") {
                base = Some(u.to_string());
            }
        }
        Serve {
            proc,
            base: base.unwrap(),
            metrics: metrics.expect("a `metrics on` line before `listening on`"),
            data,
            log,
            _tmp: tmp,
        }
    }

    /// SIGTERM, and wait for the process to end.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.proc.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.proc.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn client() -> reqwest::Client {
    helpers::TestApp::client()
}

/// The metrics text, read whole.
async fn scrape(url: &str) -> String {
    let r = client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// One sample of the text format: the metric name and its labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    name: String,
    labels: BTreeMap<String, String>,
}

/// Every sample of a scrape.
fn parse(text: &str) -> BTreeMap<Key, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // Label values here never hold `",` (names and fixed words).
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        let v = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap(),
        };
        out.insert(
            Key {
                name: name.to_string(),
                labels: map,
            },
            v,
        );
    }
    out
}

/// The sum of a metric's samples whose labels include `with`.
fn sum(m: &BTreeMap<Key, f64>, name: &str, with: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            k.name == name
                && with
                    .iter()
                    .all(|(l, v)| k.labels.get(*l).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .sum()
}

/// A workflow of three ImageBlur nodes, 31 simulator steps each.
fn slow_prompt() -> Value {
    let blur = |from: &str| json!({"class_type": "ImageBlur", "inputs": {"image": [from, 0], "blur_radius": 31, "sigma": 1.0}});
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
        "2": blur("1"),
        "3": blur("2"),
        "4": blur("3"),
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "slow"}}
    })
}

/// A participant's requests (Basic Auth).
struct Who<'a> {
    base: &'a str,
    user: &'a str,
    password: &'a str,
}

impl Who<'_> {
    async fn post(&self, path: &str, body: String) -> (u16, Value, reqwest::header::HeaderMap) {
        let r = client()
            .post(format!("{}{path}", self.base))
            .basic_auth(self.user, Some(self.password))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            headers,
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = client()
            .get(format!("{}{path}", self.base))
            .basic_auth(self.user, Some(self.password))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Submits a workflow; the prompt id (asserting 200).
    async fn submit(&self, prompt: &Value) -> String {
        let body = json!({"client_id": "tab1", "prompt": prompt});
        let (status, v, _) = self.post("/api/prompt", body.to_string()).await;
        assert_eq!(status, 200, "{v}");
        v["prompt_id"].as_str().unwrap().to_string()
    }

    /// Waits until `/api/jobs/{id}` says one of `states`.
    async fn wait_status(&self, id: &str, states: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.get(&format!("/api/jobs/{id}")).await;
            let s = v["status"].as_str().unwrap_or("").to_string();
            if states.contains(&s.as_str()) {
                return s;
            }
            assert!(Instant::now() < deadline, "job {id} still {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until nothing waits or runs (the instructor's view of the queue).
async fn wait_idle(teacher: &Who<'_>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, v) = teacher.get("/admin/api/queue").await;
        assert_eq!(status, 200, "{v}");
        if v["waiting"].as_array().is_some_and(Vec::is_empty)
            && v["running"].as_array().is_some_and(Vec::is_empty)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the workshop never went idle: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free port on 127.0.0.1 (for Prometheus, which cannot be told to bind port 0 and say
/// which it got).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus started with the shipped configuration, its scrape target replaced by
/// `target` and its intervals shortened to a second (nothing else changed).
struct Prometheus {
    _proc: Proc,
    url: String,
    _tmp: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> Prometheus {
        let shipped = monitoring_dir().join("prometheus");
        let tmp = tempfile::tempdir().unwrap();
        let config = std::fs::read_to_string(shipped.join("prometheus.yml")).unwrap();
        assert!(config.contains("\"127.0.0.1:9188\""), "{config}");
        let config = config
            .replace("\"127.0.0.1:9188\"", &format!("\"{target}\""))
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
        std::fs::write(tmp.path().join("prometheus.yml"), config).unwrap();
        std::fs::create_dir_all(tmp.path().join("rules")).unwrap();
        std::fs::copy(
            shipped.join("rules/comfyume.yml"),
            tmp.path().join("rules/comfyume.yml"),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(tmp.path().join("prometheus.log")).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!(
                "--config.file={}",
                tmp.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = Prometheus {
            _proc: Proc(child),
            url: format!("http://127.0.0.1:{port}"),
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client().get(format!("{}/-/ready", p.url)).send().await
                && r.status() == 200
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not get ready: {}",
                std::fs::read_to_string(p._tmp.path().join("prometheus.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query: the API's whole answer (`status` is `success` or `error`).
    async fn query(&self, expr: &str) -> Value {
        client()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the server has been scraped `n` more times.
    async fn wait_scrapes(&self, n: u64) {
        let count = "count_over_time(up{job=\"comfyume\"}[1h])";
        let now = |v: Value| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let from = now(self.query(count).await);
        let deadline = Instant::now() + Duration::from_secs(30);
        while now(self.query(count).await) < from + n as f64 {
            assert!(Instant::now() < deadline, "prometheus stopped scraping");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `expr` gives `want` (a single number).
    async fn wait_value(&self, expr: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.query(expr).await;
            let got = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok());
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{expr} never became {want}: {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Grafana's built-in variables, as an instant query can take them.
fn grafana_expr(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$__interval", "15s")
}

/// Every Prometheus query of the shipped dashboard: (panel title, whether the panel must show
/// data after a workshop without serverless endpoints, expression).
fn dashboard_queries() -> Vec<(String, bool, String)> {
    let path = monitoring_dir().join("grafana/dashboards/workshop.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(d["title"], "Workshop");
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap().to_string();
        let desc = p["description"].as_str().unwrap_or("");
        assert!(!desc.is_empty(), "panel {title} explains itself");
        if p["datasource"]["type"] != "prometheus" {
            continue;
        }
        // Filled by the serverless backend only.
        let core = !desc.contains("(serverless only)");
        for t in p["targets"].as_array().unwrap() {
            out.push((title.clone(), core, t["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

/// `(alert name, expression)` of every shipped rule.
fn rule_exprs() -> Vec<(String, String)> {
    let path = monitoring_dir().join("prometheus/rules/comfyume.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    // promtool already checked the file; take its rules through Prometheus' own parser.
    let (ok, out) = run_tool(
        {
            let mut c = Command::new("python3");
            c.args([
                "-c",
                "import json, sys, yaml; d = yaml.safe_load(sys.stdin); print(json.dumps([[r.get('alert') or r.get('record'), r['expr']] for g in d['groups'] for r in g['rules']]))",
            ]);
            c
        },
        Some(text.as_bytes()),
    );
    assert!(ok, "python3 with PyYAML reads the rules: {out}");
    let v: Vec<(String, String)> = serde_json::from_str(out.trim()).unwrap();
    assert!(v.len() >= 8, "{v:?}");
    v
}

/// The simulated workshop: jobs that succeed, fail, are cancelled, interrupted, retried
/// and refused; an upload; a participant online. Then `/metrics` must pass `promtool
/// check metrics` and agree with the store, and a real Prometheus with the shipped
/// configuration must answer every query of the dashboard and the rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_workshop_is_measured_as_it_happened() {
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = comfyume_sim::spawn(
        comfyume_sim::SimConfig {
            step_ms: 20,
            ..Default::default()
        },
        sim_listener,
    )
    .await;
    let (pw1, pw2, pwt) = ("pw-user001-x", "pw-user002-y", "pw-teacher-z");
    let mut serve = Serve::start(
        &[
            ("user001", pw1, false),
            ("user002", pw2, false),
            ("teacher", pwt, true),
        ],
        &[("COMFYUI_URLS", sim.url().as_str()), ("MAX_ATTEMPTS", "3")],
    );
    let target = serve
        .metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let prometheus = Prometheus::start(&target).await;
    // It takes up to 5 s to pick its targets up: the workshop starts once it scrapes.
    prometheus.wait_value("up{job=\"comfyume\"}", 1.0).await;

    let u1 = Who {
        base: &serve.base,
        user: "user001",
        password: pw1,
    };
    let u2 = Who {
        base: &serve.base,
        user: "user002",
        password: pw2,
    };
    let teacher = Who {
        base: &serve.base,
        user: "teacher",
        password: pwt,
    };

    // user001 has ComfyUI open (a WebSocket), and uploads a picture.
    let host = serve.base.trim_start_matches("http://");
    let mut ws = {
        use base64::Engine;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{host}/ws?clientId=tab1")
            .into_client_request()
            .unwrap();
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("user001:{pw1}"));
        req.headers_mut()
            .insert("authorization", format!("Basic {cred}").parse().unwrap());
        tokio_tungstenite::connect_async(req).await.unwrap().0
    };
    let picture = helpers::png(16, 16, [10, 200, 30, 255]);
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(picture.clone()).file_name("cat.png"),
    );
    let r = client()
        .post(format!("{}/api/upload/image", serve.base))
        .basic_auth("user001", Some(pw1))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Jobs that succeed, one with its own prompt_id; one whose workflow fails.
    let nomodel = helpers::workflow("nomodel.json");
    let fixed_id = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let ok1 = u1.submit(&nomodel).await;
    let ok2 = u2.submit(&nomodel).await;
    let body = json!({"client_id": "tab1", "prompt": nomodel, "prompt_id": fixed_id});
    let (status, v, headers) = u1.post("/api/prompt", body.to_string()).await;
    assert_eq!(status, 200, "{v}");
    let request_id = headers["x-request-id"].to_str().unwrap().to_string();
    assert!(
        comfyume_gateway::observe::valid_request_id(&request_id),
        "{request_id}"
    );
    let failing = u2.submit(&helpers::workflow("runtime_error.json")).await;
    u1.wait_status(&ok1, &["completed"]).await;
    u1.wait_status(fixed_id, &["completed"]).await;
    u2.wait_status(&ok2, &["completed"]).await;
    u2.wait_status(&failing, &["failed"]).await;

    // Refused: not JSON, an unknown node, the same prompt_id again.
    let (status, v, _) = u1.post("/api/prompt", "{not json".into()).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (400, Some("invalid_json"))
    );
    let unknown = json!({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}});
    let (status, v, _) = u1.post("/api/prompt", unknown.to_string()).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (400, Some("invalid_prompt"))
    );
    let (status, v, _) = u1.post("/api/prompt", body.to_string()).await;
    assert_eq!(
        (status, v["error"]["type"].as_str()),
        (400, Some("duplicate_prompt_id"))
    );

    // A slow job runs; the next one waits behind it (one running job per participant) and is
    // cancelled; then the slow one is interrupted.
    let slow = u1.submit(&slow_prompt()).await;
    let behind = u1.submit(&nomodel).await;
    let (status, _, _) = u1
        .post("/api/queue", json!({"delete": [behind]}).to_string())
        .await;
    assert_eq!(status, 200);
    u1.wait_status(&slow, &["in_progress"]).await;
    let (status, _, _) = u1
        .post("/api/interrupt", json!({"prompt_id": slow}).to_string())
        .await;
    assert_eq!(status, 200);
    u1.wait_status(&slow, &["cancelled"]).await;

    // The GPU server answers 500 to /prompt for a while: attempts fail and are retried.
    let fault = |f: Value| {
        let url = format!("{}/sim/fault", sim.url());
        async move {
            let r = client().post(url).json(&f).send().await.unwrap();
            assert!(r.status().is_success());
        }
    };
    fault(json!({"fault": "prompt_error"})).await;
    let retried = u2.submit(&nomodel).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sum(
        &parse(&scrape(&serve.metrics).await),
        "comfyume_dispatch_retries_total",
        &[],
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "no retry was counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fault(json!({"fault": "clear"})).await;
    u2.wait_status(&retried, &["completed", "failed"]).await;
    wait_idle(&teacher).await;

    // ---- /metrics: valid, and what happened --------------------------------------------------
    let text = scrape(&serve.metrics).await;
    let (valid, lint) = run_tool(
        {
            let mut c = Command::new(tool("promtool"));
            c.args(["check", "metrics"]);
            c
        },
        Some(text.as_bytes()),
    );
    assert!(valid, "promtool check metrics:\n{lint}\n{text}");
    let m = parse(&text);

    // The admin role also reads /metrics on the main listener; a participant does not.
    let (status, _) = teacher.get("/metrics").await;
    assert_eq!(status, 200);
    let r = client()
        .get(format!("{}/metrics", serve.base))
        .basic_auth("user001", Some(pw1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Prometheus has seen the final state before the server goes.
    let finished_total: f64 = ["succeeded", "failed", "cancelled", "interrupted"]
        .iter()
        .map(|o| sum(&m, "comfyume_jobs_finished_total", &[("outcome", o)]))
        .sum();
    prometheus
        .wait_value("sum(comfyume_jobs_finished_total)", finished_total)
        .await;
    // Two more scrapes: a rate needs two samples of the series the workshop's end created.
    prometheus.wait_scrapes(2).await;
    check_prometheus(&prometheus).await;
    drop(ws.close(None).await);
    serve.stop();

    // The store, read after the server stopped.
    let store = comfyume_store::sqlite::SqliteStore::open(&serve.data.join("comfyume.db"))
        .await
        .unwrap();
    let counts = store.job_state_counts().await.unwrap();
    let (jobs, total) = store
        .list_jobs(&comfyume_store::JobQuery::default())
        .await
        .unwrap();
    assert_eq!(total, 7, "{jobs:#?}");
    for (state, n) in &counts {
        assert_eq!(
            sum(&m, "comfyume_jobs", &[("state", state.as_str())]),
            *n as f64,
            "comfyume_jobs{{state={state}}}"
        );
        if state.is_finished() {
            assert_eq!(
                sum(
                    &m,
                    "comfyume_jobs_finished_total",
                    &[("outcome", state.as_str())]
                ),
                *n as f64,
                "comfyume_jobs_finished_total{{outcome={state}}}"
            );
        }
    }
    let count = |s: JobState| counts.iter().find(|(c, _)| *c == s).unwrap().1;
    assert!(count(JobState::Succeeded) >= 3);
    assert!(count(JobState::Failed) >= 1);
    assert_eq!(count(JobState::Cancelled), 1);
    assert_eq!(count(JobState::Interrupted), 1);
    assert_eq!(sum(&m, "comfyume_jobs_submitted_total", &[]), total as f64);
    for reason in ["invalid_json", "invalid_prompt", "duplicate_prompt_id"] {
        assert_eq!(
            sum(&m, "comfyume_jobs_refused_total", &[("reason", reason)]),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(sum(&m, "comfyume_jobs_refused_total", &[]), 3.0);

    // Attempts, retries and failures add up to what the store counted.
    let attempts: u32 = jobs.iter().map(|j| j.attempts).sum();
    let retries: u32 = jobs.iter().map(|j| j.attempts.saturating_sub(1)).sum();
    let gave_up = jobs
        .iter()
        .filter(|j| {
            j.error.as_ref().and_then(|e| e["exception_type"].as_str())
                == Some("ComfyUMe.BackendFailed")
        })
        .count() as u32;
    assert!(retries >= 1);
    assert_eq!(
        sum(
            &m,
            "comfyume_dispatch_attempts_total",
            &[("backend", "comfyui")]
        ),
        attempts as f64
    );
    assert_eq!(
        sum(
            &m,
            "comfyume_dispatch_retries_total",
            &[("backend", "comfyui")]
        ),
        retries as f64
    );
    assert_eq!(
        sum(
            &m,
            "comfyume_dispatch_failures_total",
            &[("backend", "comfyui"), ("reason", "protocol")]
        ),
        (retries + gave_up) as f64
    );
    // Waits and run times: one of each per job that started.
    let started = jobs.iter().filter(|j| j.started_at_ms.is_some()).count() as f64;
    assert_eq!(
        sum(
            &m,
            "comfyume_job_wait_seconds_count",
            &[("backend", "comfyui")]
        ),
        started
    );
    assert_eq!(
        sum(
            &m,
            "comfyume_job_run_seconds_count",
            &[("backend", "comfyui")]
        ),
        started
    );
    // Nothing waits or runs at the end; the backend is idle.
    for user in ["user001", "user002"] {
        for state in ["queued", "running"] {
            let k = Key {
                name: "comfyume_participant_jobs".into(),
                labels: [("user", user), ("state", state)]
                    .into_iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            };
            assert_eq!(m.get(&k), Some(&0.0), "{k:?}");
        }
    }
    assert_eq!(sum(&m, "comfyume_queue_oldest_wait_seconds", &[]), 0.0);
    assert_eq!(
        sum(&m, "comfyume_backend_slots", &[("backend", "comfyui")]),
        2.0
    );
    assert_eq!(
        sum(
            &m,
            "comfyume_backend_slots_in_use",
            &[("backend", "comfyui")]
        ),
        0.0
    );
    assert_eq!(
        sum(&m, "comfyume_backend_state", &[("backend", "comfyui")]),
        1.0,
        "exactly one state is 1"
    );
    // HTTP, sockets, bytes.
    assert_eq!(
        sum(
            &m,
            "comfyume_http_requests_total",
            &[
                ("route", "/api/prompt"),
                ("method", "POST"),
                ("status", "400")
            ]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &m,
            "comfyume_http_requests_total",
            &[
                ("route", "/api/prompt"),
                ("method", "POST"),
                ("status", "200")
            ]
        ),
        total as f64
    );
    assert_eq!(sum(&m, "comfyume_websockets_open", &[]), 1.0);
    assert_eq!(sum(&m, "comfyume_participants_online", &[]), 1.0);
    assert_eq!(
        sum(&m, "comfyume_upload_bytes_total", &[]),
        picture.len() as f64
    );
    assert!(sum(&m, "comfyume_http_sent_bytes_total", &[]) > 0.0);
    assert!(sum(&m, "comfyume_http_received_bytes_total", &[]) > picture.len() as f64);
    assert!(
        sum(
            &m,
            "comfyume_store_operation_duration_seconds_count",
            &[("op", "enqueue")]
        ) >= total as f64
    );
    assert!(sum(&m, "comfyume_data_dir_size_bytes", &[]) > 0.0);
    let build = m
        .keys()
        .find(|k| k.name == "comfyume_build_info")
        .expect("build info");
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!build.labels["commit"].is_empty());

    // Histograms are histograms (Grafana aggregates their buckets), not summaries.
    assert!(
        text.contains("# TYPE comfyume_job_wait_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("# TYPE comfyume_http_request_duration_seconds histogram"));
    // Bounded labels: routes are templates, no id of a job or request is a label value.
    for k in m.keys() {
        if let Some(route) = k.labels.get("route") {
            assert!(route == "static" || route.starts_with('/'), "{k:?}");
            assert!(!route.contains("user00"), "{k:?}");
        }
    }
    for j in &jobs {
        assert!(!text.contains(&j.id), "job id {} in the metrics", j.id);
    }
    assert!(!text.contains(&request_id));
}

/// Every dashboard and rule expression parses in a real Prometheus and the core panels have
/// data; every shipped rule evaluates without error.
async fn check_prometheus(p: &Prometheus) {
    let mut empty = Vec::new();
    for (title, core, expr) in dashboard_queries() {
        let q = grafana_expr(&expr);
        let v = p.query(&q).await;
        assert_eq!(v["status"], "success", "panel {title}: {q}: {v}");
        let has_data = v["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty());
        if core && !has_data {
            empty.push(format!("{title}: {q}"));
        }
    }
    assert!(empty.is_empty(), "core panels without data: {empty:#?}");
    for (name, expr) in rule_exprs() {
        let v = p.query(&expr).await;
        assert_eq!(v["status"], "success", "rule {name}: {expr}: {v}");
    }
    // Prometheus loaded the shipped rules and evaluates them cleanly.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = client()
            .get(format!("{}/api/v1/rules", p.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rules: Vec<&Value> = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        assert_eq!(rules.len(), rule_exprs().len(), "{v}");
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(Instant::now() < deadline, "rules not healthy: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `promtool check config`, `check rules` and `test rules` on the shipped files; `amtool
/// check-config` on the Alertmanager example; the Grafana and Loki files parse; and
/// docs/monitoring.md explains every panel and alert.
#[test]
fn the_shipped_monitoring_files_are_valid() {
    let dir = monitoring_dir();
    let promtool = tool("promtool");
    let check = |args: &[&str], cwd: &Path| {
        let mut c = Command::new(&promtool);
        c.args(args).current_dir(cwd);
        let (ok, out) = run_tool(c, None);
        assert!(ok, "promtool {args:?}:\n{out}");
        out
    };
    let prom = dir.join("prometheus");
    check(&["check", "config", "prometheus.yml"], &prom);
    let out = check(&["check", "rules", "rules/comfyume.yml"], &prom);
    assert!(out.contains("SUCCESS"), "{out}");
    // Unit tests of each alert: it fires when it should and stays silent otherwise.
    let out = check(&["test", "rules", "tests/comfyume_test.yml"], &prom);
    assert!(out.contains("SUCCESS"), "{out}");
    let tests = std::fs::read_to_string(prom.join("tests/comfyume_test.yml")).unwrap();
    for (alert, _) in rule_exprs() {
        let firing = tests
            .matches(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - exp_labels"
            ))
            .count();
        let silent = tests
            .matches(&format!("alertname: {alert}\n        exp_alerts: []"))
            .count();
        assert!(firing >= 1, "no test where {alert} fires");
        assert!(silent >= 1, "no test where {alert} stays silent");
    }

    let mut amtool = Command::new(tool("amtool"));
    amtool
        .args(["check-config", "alertmanager.yml"])
        .current_dir(dir.join("alertmanager"));
    let (ok, out) = run_tool(amtool, None);
    assert!(ok, "amtool check-config:\n{out}");

    for f in [
        "loki/loki.yml",
        "promtail/promtail.yml",
        "grafana/provisioning/datasources/comfyume.yml",
        "grafana/provisioning/dashboards/comfyume.yml",
    ] {
        let mut c = Command::new("python3");
        c.args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin), default=str))",
        ]);
        let text = std::fs::read(dir.join(f)).unwrap();
        let (ok, out) = run_tool(c, Some(&text));
        assert!(ok, "{f} is not YAML: {out}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        if f.starts_with("promtail") {
            // The labels Loki gets are the fields every JSON line has at its top level.
            for job in v["scrape_configs"].as_array().unwrap() {
                let stages = job["pipeline_stages"].as_array().unwrap();
                let labels = stages.iter().find_map(|s| s.get("labels")).unwrap();
                for l in ["user", "backend", "level"] {
                    assert!(labels.get(l).is_some(), "{f}: label {l}");
                }
                let json_stage = stages.iter().find_map(|s| s.get("json")).unwrap();
                assert_eq!(json_stage["expressions"]["user"], "user");
                assert_eq!(json_stage["expressions"]["backend"], "backend");
            }
        }
        if f.contains("datasources") {
            let uids: Vec<&str> = v["datasources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["uid"].as_str().unwrap())
                .collect();
            assert_eq!(uids, ["comfyume-prometheus", "comfyume-loki"]);
        }
    }

    // Every panel refers to a provisioned data source; the docs explain each panel and alert.
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/monitoring.md"),
    )
    .unwrap();
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("grafana/dashboards/workshop.json")).unwrap(),
    )
    .unwrap();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        if p["type"] != "row" {
            let uid = p["datasource"]["uid"].as_str().unwrap();
            assert!(
                ["comfyume-prometheus", "comfyume-loki"].contains(&uid),
                "{title}"
            );
        }
        assert!(
            docs.contains(&format!("**{title}**")),
            "docs/monitoring.md explains panel {title}"
        );
    }
    for (alert, _) in rule_exprs() {
        assert!(
            docs.contains(&format!("`{alert}`")),
            "docs/monitoring.md explains {alert}"
        );
    }
}

/// A job runs with every kind of secret in play: a participant's password (and a wrong
/// one), their session cookie, an `Authorization` header, a backend URL with credentials, the
/// provider's API key in the environment, and comfy.org keys in `extra_data`. At
/// `RUST_LOG=trace` none appears in any log line or in `/metrics`; every line is JSON; the
/// job's lines carry its id, participant, backend and attempt, and the request's its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_or_a_metric() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = comfyume_sim::spawn(
        comfyume_sim::SimConfig {
            step_ms: 10,
            ..Default::default()
        },
        sim_listener,
    )
    .await;
    let password = "Pw-5ecret-horse-91";
    let wrong = "Wr0ng-guess-77x";
    let backend_key = "backend-api-key-3c9f";
    let provider_key = "provider-key-8d21";
    let comfy_key = "comfyorg-key-51f0";
    let comfy_token = "comfyorg-token-a7e2";
    // A ComfyUI behind Basic Auth: the credentials live in its URL.
    let backend_url = sim
        .url()
        .replacen("http://", &format!("http://apiuser:{backend_key}@"), 1);
    let mut serve = Serve::start(
        &[("user001", password, false)],
        &[
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "trace"),
            ("COMFYUI_URLS", backend_url.as_str()),
            ("SERVERLESS_API_KEY", provider_key),
        ],
    );
    let base = serve.base.clone();

    // A wrong password, then the right one through the login form: a session cookie.
    let form = |pw: &str| {
        client().post(format!("{base}/login")).form(&[
            ("username", "user001"),
            ("password", pw),
            ("next", ""),
        ])
    };
    let r = form(wrong).send().await.unwrap();
    assert_ne!(r.status(), 303, "the wrong password was refused");
    let r = form(password).send().await.unwrap();
    let token = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("comfyume_session="))
        .and_then(|c| c.split(';').next())
        .filter(|t| !t.is_empty())
        .expect("a session cookie")
        .to_string();
    let cookie = format!("comfyume_session={token}");
    // Basic Auth, and a stray bearer token next to the cookie.
    let r = client()
        .get(format!("{base}/api/prompt"))
        .basic_auth("user001", Some(password))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("{base}/api/prompt"))
        .header("cookie", &cookie)
        .header("authorization", format!("Bearer {provider_key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The tab's WebSocket, with the cookie.
    let mut ws = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let host = base.trim_start_matches("http://");
        let mut req = format!("ws://{host}/ws?clientId=tab1")
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        tokio_tungstenite::connect_async(req).await.unwrap().0
    };
    // The job, with the comfy.org keys ComfyUI's API nodes use.
    let body = json!({
        "client_id": "tab1",
        "prompt": helpers::workflow("nomodel.json"),
        "extra_data": {"api_key_comfy_org": comfy_key, "auth_token_comfy_org": comfy_token},
    });
    let r = client()
        .post(format!("{base}/api/prompt"))
        .header("cookie", &cookie)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    let id = v["prompt_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = client()
            .get(format!("{base}/api/jobs/{id}"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "the job did not complete: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = scrape(&serve.metrics).await;
    let r = client()
        .get(format!("{base}/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection() || r.status().is_success());
    drop(ws.close(None).await);
    serve.stop();

    let log = std::fs::read_to_string(&serve.log).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(lines.len() > 50, "trace level logs a lot: {}", lines.len());
    assert!(
        lines.iter().any(|l| l["level"] == "TRACE"),
        "RUST_LOG=trace was in force"
    );
    // Dependencies' `log` records keep their own target (tungstenite, reqwest, ...).
    assert!(
        lines
            .iter()
            .all(|l| l["target"] != "log" && l.get("log.file").is_none())
    );
    let secrets = [
        password.to_string(),
        wrong.to_string(),
        backend_key.to_string(),
        provider_key.to_string(),
        comfy_key.to_string(),
        comfy_token.to_string(),
        token.clone(),
        b64(&format!("user001:{password}")),
        b64(&format!("apiuser:{backend_key}")),
    ];
    for s in &secrets {
        if let Some(l) = log.lines().find(|l| l.contains(s.as_str())) {
            panic!("a secret ({s}) is in a log line: {l}");
        }
        assert!(
            !metrics.contains(s.as_str()),
            "a secret ({s}) is in the metrics"
        );
    }

    // The job's story, every line with its participant, and the dispatcher's and the backend
    // client's lines with its backend and attempt.
    let about: Vec<&Value> = lines
        .iter()
        .filter(|l| l["job_id"] == id.as_str())
        .collect();
    for l in &about {
        assert_eq!(l["user"], "user001", "{l}");
        let target = l["target"].as_str().unwrap_or("");
        if target.starts_with("comfyume_dispatch::dispatcher")
            || target.starts_with("comfyume_comfyui")
        {
            assert_eq!(l["backend"], "comfyui", "{l}");
            assert_eq!(l["attempt"], 1, "{l}");
        }
    }
    for msg in [
        "job queued",
        "job handed to its backend",
        "job started",
        "job finished",
    ] {
        assert!(
            about.iter().any(|l| l["message"] == msg),
            "no `{msg}` line about the job: {about:#?}"
        );
    }
    // The request's id: in its response header, on its request line and on the job's first line.
    let request_line = lines
        .iter()
        .find(|l| l["message"] == "request" && l["request_id"] == request_id.as_str())
        .expect("the request's line");
    assert_eq!(request_line["route"], "/api/prompt");
    assert_eq!(request_line["user"], "user001");
    assert_eq!(request_line["status"], 200);
    let queued = about.iter().find(|l| l["message"] == "job queued").unwrap();
    assert_eq!(queued["request_id"], request_id.as_str());
    // Every request line has an id.
    for l in lines.iter().filter(|l| l["message"] == "request") {
        assert!(
            l["request_id"].as_str().is_some_and(|r| !r.is_empty()),
            "{l}"
        );
    }
}

/// Every answer names its request (`X-Request-Id`); an id set by a trusted reverse proxy
/// (nginx's `$request_id`) is kept, so both logs name the same request; from anyone else, or
/// malformed, it is replaced.
#[tokio::test]
async fn request_ids_are_answered_and_kept_from_a_trusted_proxy() {
    let plain = helpers::spawn_app().await;
    let r = plain
        .get_with(
            "user001",
            "/api/prompt",
            &[("x-request-id", "from-the-client")],
        )
        .await;
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").unwrap();
    assert_ne!(
        id, "from-the-client",
        "an untrusted client does not choose it"
    );
    assert!(comfyume_gateway::observe::valid_request_id(&id));
    let again = plain
        .anon_get("/healthz", &[])
        .await
        .header("x-request-id")
        .unwrap();
    assert_ne!(again, id, "each request its own");

    let proxied = helpers::spawn_app_with(|s| {
        s.trusted_proxies = comfyume_gateway::proxy::parse_list("127.0.0.1").unwrap();
    })
    .await;
    let nginx_id = "0123456789abcdef0123456789abcdef";
    let r = proxied
        .get_with("user001", "/api/prompt", &[("x-request-id", nginx_id)])
        .await;
    assert_eq!(r.header("x-request-id").as_deref(), Some(nginx_id));
    // Not a safe token: replaced even from the proxy.
    let r = proxied
        .get_with("user001", "/api/prompt", &[("x-request-id", "a b\"c")])
        .await;
    let id = r.header("x-request-id").unwrap();
    assert!(comfyume_gateway::observe::valid_request_id(&id), "{id}");
}
