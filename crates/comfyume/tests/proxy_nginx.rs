//! A workshop behind a reverse proxy, as `.env.example` recommends: Debian's nginx in front of
//! the real `comfyume serve` (jobs on its built-in simulator), with nginx's defaults where a
//! site's config usually keeps them (`Host $proxy_host`) and the usual forwarding headers.
//! With `TRUSTED_PROXIES` naming nginx, a participant signs in, loads the page, opens the
//! WebSocket and runs a job through it; and the sign-in throttle tells clients apart by the
//! address nginx forwards, so one seat's failures do not slow down the room. Test clients
//! connect from different loopback addresses (127.0.0.2, …), which Linux routes on `lo`.
//!
//! nginx comes from `scripts/install-test-deps.sh`; it runs here as a child process on a
//! free port with a generated config, in the foreground, from a temporary prefix.

use crate::helpers;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use helpers::{PASSWORD, Resp, TestApp, is_end_of};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const NGINX: &str = "/usr/sbin/nginx";

/// Children killed (by their own pid) when the test ends, however it ends.
struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port nothing listens on now (bound to port 0, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nginx_conf(prefix: &Path, port: u16, upstream: &str) -> String {
    let p = prefix.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 600s;
        }}
    }}
}}
"#
    )
}

/// Starts nginx in front of `upstream` (`host:port`); returns it and its address.
fn start_nginx(dir: &Path, upstream: &str) -> (Child, SocketAddr) {
    assert!(
        Path::new(NGINX).exists(),
        "{NGINX} is missing: run scripts/install-test-deps.sh (Debian's nginx package)"
    );
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(&prefix).unwrap();
    let port = free_port();
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&prefix, port, upstream)).unwrap();
    let child = Command::new(NGINX)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

/// `comfyume serve` on a free port, trusting nginx (127.0.0.1), jobs on the simulator.
fn start_serve(data: &Path, frontend: &Path) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfyume"));
    cmd.env_clear()
        .current_dir(data.parent().unwrap())
        .args(helpers::serve_args(data, frontend))
        .env("TRUSTED_PROXIES", "127.0.0.1/32")
        .env("INFERENCE_MODE", "simulator")
        .env("SIMULATOR_STEP_MS", "5")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    let (child, url) = helpers::spawn_serve(cmd);
    let upstream = url.trim_start_matches("http://").to_string();
    (child, upstream)
}

/// Two participants and an instructor, made before the server starts.
async fn accounts(data: &Path) {
    use comfyume_store::{Role, UserStore};
    std::fs::create_dir_all(data).unwrap();
    let store = comfyume_store::sqlite::SqliteStore::open(&data.join("comfyume.db"))
        .await
        .unwrap();
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    for u in ["user001", "user002"] {
        store
            .import_bcrypt(u, &hash, Role::Participant)
            .await
            .unwrap();
    }
    store
        .import_bcrypt(helpers::ADMIN, &hash, Role::Admin)
        .await
        .unwrap();
    store.close().await;
}

/// A browser at `ip`, talking to nginx.
struct Seat {
    http: reqwest::Client,
    ip: IpAddr,
    proxy: SocketAddr,
}

impl Seat {
    fn new(ip: [u8; 4], proxy: SocketAddr) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ip = IpAddr::from(ip);
        Seat {
            http: reqwest::Client::builder()
                .local_address(ip)
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            ip,
            proxy,
        }
    }

    /// The page's own origin, as the browser sends it on POSTs and upgrades.
    fn origin(&self) -> String {
        format!("http://{}", self.proxy)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    async fn login(&self, user: &str, password: &str) -> Resp {
        TestApp::send(
            self.http
                .post(self.url("/login"))
                .header("Origin", self.origin())
                .form(&[("username", user), ("password", password), ("next", "")]),
        )
        .await
    }

    async fn with_cookie(
        &self,
        cookie: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Resp {
        let mut rb = self
            .http
            .request(method.clone(), self.url(path))
            .header("cookie", cookie)
            .header("accept", "text/html,application/json");
        if method != Method::GET {
            rb = rb.header("Origin", self.origin());
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        TestApp::send(rb).await
    }

    /// The WebSocket as the frontend opens it (cookie, own Origin), from this seat's address.
    async fn ws(&self, cookie: &str, path: &str) -> helpers::Ws {
        let mut req = format!("ws://{}{path}", self.proxy)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        req.headers_mut()
            .insert("origin", self.origin().parse().unwrap());
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((self.ip, 0).into()).unwrap();
        let tcp = sock.connect(self.proxy).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
                .await
                .expect("the upgrade through nginx is accepted");
        ws
    }
}

fn session_cookie(r: &Resp) -> String {
    r.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("comfyume_session=") && !c.starts_with("comfyume_session=;"))
        .map(|c| c.split(';').next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no session cookie: {} {}", r.status, r.text()))
}

/// `workflows/nomodel.json`, a captured ComfyUI workflow that needs no model.
fn nomodel() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 16711680}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "nomodel"}}
    })
}

struct Workshop {
    _tmp: tempfile::TempDir,
    _children: Kill,
    proxy: SocketAddr,
}

async fn workshop() -> Workshop {
    let tmp = tempfile::tempdir().unwrap();
    let data: PathBuf = tmp.path().join("data");
    let frontend = tmp.path().join("frontend");
    helpers::fake_frontend(&frontend);
    accounts(&data).await;
    let (serve, upstream) = start_serve(&data, &frontend);
    let mut children = Kill(vec![serve]);
    let (nginx, proxy) = start_nginx(tmp.path(), &upstream);
    children.0.push(nginx);
    Workshop {
        _tmp: tmp,
        _children: children,
        proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_signs_in_loads_the_page_and_runs_a_job_through_nginx() {
    let w = workshop().await;
    let seat = Seat::new([127, 0, 0, 2], w.proxy);

    // Sign in: a POST whose Origin is nginx's public address, while the Host the server
    // sees is nginx's upstream (`$proxy_host`).
    let r = seat.login("user001", PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location").as_deref(), Some("/user001/"));
    let cookie = session_cookie(&r);

    // The page.
    let page = seat
        .with_cookie(&cookie, Method::GET, "/user001/", None)
        .await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("ComfyUI"));

    // The WebSocket, then Run.
    let mut ws = seat.ws(&cookie, "/user001/ws?clientId=tab").await;
    let hello = helpers::next_json(&mut ws).await;
    assert_eq!(
        (hello["type"].as_str(), hello["data"]["sid"].as_str()),
        (Some("status"), Some("tab"))
    );
    ws.send(Message::Text(
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let r = seat
        .with_cookie(
            &cookie,
            Method::POST,
            "/user001/api/prompt",
            Some(json!({"client_id": "tab", "prompt": nomodel()})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["prompt_id"].as_str().unwrap().to_string();
    let msgs = helpers::messages_until(&mut ws, 30, |v| is_end_of(v, &id)).await;
    assert!(
        msgs.iter().any(|m| m["type"] == "execution_success"),
        "the job ran on the simulator: {msgs:#?}"
    );
    let history = seat
        .with_cookie(
            &cookie,
            Method::GET,
            &format!("/user001/api/history/{id}"),
            None,
        )
        .await;
    assert_eq!(history.status, 200);
    assert!(history.json()[&id]["outputs"]["3"]["images"][0]["filename"].is_string());

    // A foreign origin is still refused through the proxy.
    let evil = TestApp::send(
        seat.http
            .post(seat.url("/user001/api/settings/Comfy.Evil"))
            .header("cookie", &cookie)
            .header("Origin", "http://evil.example")
            .body("true"),
    )
    .await;
    assert_eq!(evil.status, 403);
    ws.close(None).await.ok();
    let _ = ws.next().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_the_sign_in_throttle_tells_the_seats_apart() {
    let w = workshop().await;
    let typo_seat = Seat::new([127, 0, 0, 3], w.proxy);
    // Ten failures for user002 from one seat: that seat is slowed down…
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(typo_seat.login("user002", "wrong").await.status.as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(typo_seat.login("user002", PASSWORD).await.status, 429);
    // …rotating its own X-Forwarded-For does not help (nginx appends the real address)…
    let spoofed = TestApp::send(
        typo_seat
            .http
            .get(typo_seat.url("/api/settings"))
            .basic_auth("user002", Some(PASSWORD))
            .header("X-Forwarded-For", "198.51.100.77"),
    )
    .await;
    assert_eq!(spoofed.status, 429);
    // …while the participant, at their own seat behind the same nginx, signs in at once,
    // and so does everyone else in the room.
    let own_seat = Seat::new([127, 0, 0, 4], w.proxy);
    assert_eq!(own_seat.login("user002", PASSWORD).await.status, 303);
    let neighbour = Seat::new([127, 0, 0, 5], w.proxy);
    assert_eq!(neighbour.login("user001", PASSWORD).await.status, 303);
    let r = TestApp::send(
        neighbour
            .http
            .get(neighbour.url("/api/settings"))
            .basic_auth("user002", Some(PASSWORD)),
    )
    .await;
    assert_eq!(r.status, 200);
}
