//! Test harness: a fresh server on 127.0.0.1:0 with its own data directory,
//! real SQLite store, two participants and an instructor, and a typed client
//! that talks HTTP and WebSocket exactly as the frontend does.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use comfyume_gateway::{AppState, Settings};
use comfyume_store::{Role, Store};
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const PASSWORD: &str = "correct horse battery";
pub const ADMIN: &str = "teacher";

/// A file of the captured ComfyUI v0.11.0 data in the repository (`tests/fixtures/comfyui/`).
pub fn shared(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/comfyui"
    ))
    .join(rel)
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub base: String,
    pub data_dir: PathBuf,
    pub state: AppState,
    pub store: Arc<dyn Store>,
    pub dispatcher: Arc<comfyume_dispatch::Dispatcher>,
    pub admin: comfyume_admin::Admin,
    _tmp: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A minimal stand-in for the frontend's static folder (the browser test uses
/// the real one): enough for routing, caching and the extension list.
pub fn fake_frontend(dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::create_dir_all(dir.join("extensions/core")).unwrap();
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(
        dir.join("index.html"),
        "<!doctype html><title>ComfyUI</title><script src=\"./assets/index-abc.js\"></script>",
    )
    .unwrap();
    std::fs::write(
        dir.join("assets/index-abc.js"),
        "console.log('x');".repeat(200),
    )
    .unwrap();
    std::fs::write(dir.join("extensions/core/groupNode.js"), "export {}").unwrap();
    std::fs::write(dir.join("scripts/app.js"), "export const app = {}").unwrap();
}

/// The queue settings of test servers (the defaults of `comfyume serve`).
pub fn queue_cfg() -> comfyume_dispatch::QueueConfig {
    comfyume_dispatch::QueueConfig::default()
}

/// PASSWORD as a cost-4 bcrypt hash (an htpasswd import), made once per test
/// binary. Three argon2id hashes per server were most of the suite's CPU time;
/// sign-in still runs the real check (and upgrades the hash to argon2id).
fn quick_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| bcrypt::hash(PASSWORD, 4).unwrap())
}

/// The captured ComfyUI `/object_info` (592 classes), parsed once per test binary.
pub fn captured_object_info() -> Value {
    static INFO: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    INFO.get_or_init(|| {
        serde_json::from_str(&std::fs::read_to_string(shared("api/object_info.json")).unwrap())
            .unwrap()
    })
    .clone()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let mut opts = AppOptions::default();
    tweak(&mut opts.settings_tweak);
    spawn_full(opts).await
}

/// Everything a test may choose about its server.
pub struct AppOptions {
    /// Applied over the defaults (data and frontend dirs are the harness's own).
    pub settings_tweak: Settings,
    pub queue: comfyume_dispatch::QueueConfig,
    /// Backends jobs run on; none: jobs stay queued.
    pub backends: Vec<Arc<dyn comfyume_dispatch::Backend>>,
    pub dispatch: comfyume_dispatch::DispatchConfig,
    /// Node definitions: the real ComfyUI capture (default) or none (taken from
    /// the first backend, as `serve` does).
    pub real_object_info: bool,
    /// Reuse a data directory (a restart); otherwise a fresh one with users.
    pub reuse: Option<tempfile::TempDir>,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            settings_tweak: Settings::with_data_dir("unused", "unused"),
            queue: queue_cfg(),
            backends: Vec::new(),
            dispatch: comfyume_dispatch::DispatchConfig::default(),
            real_object_info: true,
            reuse: None,
        }
    }
}

pub async fn spawn_full(opts: AppOptions) -> TestApp {
    let fresh = opts.reuse.is_none();
    let tmp = opts.reuse.unwrap_or_else(|| tempfile::tempdir().unwrap());
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let frontend = tmp.path().join("frontend");
    fake_frontend(&frontend);
    let store: Arc<dyn Store> = Arc::new(
        comfyume_store::sqlite::SqliteStore::open(&data_dir.join("comfyume.db"))
            .await
            .unwrap(),
    );
    if fresh {
        for u in ["user001", "user002"] {
            store
                .import_bcrypt(u, quick_hash(), Role::Participant)
                .await
                .unwrap();
        }
        store
            .import_bcrypt(ADMIN, quick_hash(), Role::Admin)
            .await
            .unwrap();
    }
    let mut settings = opts.settings_tweak;
    settings.data_dir = data_dir.clone();
    settings.frontend_dir = frontend;
    let (state, in_flight) = comfyume_gateway::build_state(settings, store.clone(), opts.queue)
        .await
        .unwrap();
    if opts.real_object_info {
        comfyume_gateway::replace_object_info(&state, captured_object_info(), "test")
            .await
            .unwrap();
    } else if let Some(b) = opts.backends.first() {
        let info = b.object_info().await.unwrap();
        comfyume_gateway::replace_object_info(&state, info, "backend")
            .await
            .unwrap();
    }
    comfyume_admin::settings::restore(&state).await;
    let dispatcher = comfyume_dispatch::Dispatcher::new(
        state.queue.clone(),
        opts.backends,
        opts.dispatch,
        data_dir.clone(),
    );
    dispatcher.start(in_flight);
    let admin = comfyume_admin::Admin::new(&state, Some(dispatcher.clone()));
    let admin_routes = comfyume_admin::audited(
        comfyume_admin::routes_with(admin.clone(), None),
        &state,
        &admin,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    tokio::spawn(async move {
        comfyume_gateway::launch_with(st, listener, admin_routes, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    TestApp {
        addr,
        base: format!("http://{addr}"),
        data_dir,
        state,
        store,
        dispatcher,
        admin,
        _tmp: Some(tmp),
        shutdown: Some(tx),
    }
}

impl TestApp {
    /// Stops the server and hands back its data directory (for a restart).
    pub fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self._tmp.take().unwrap()
    }
}

/// A simulator on 127.0.0.1:0 and a `comfyui` backend pointed at it.
pub async fn sim_backend(
    name: &str,
    step_ms: u64,
) -> (comfyume_sim::SimHandle, Arc<dyn comfyume_dispatch::Backend>) {
    let cfg = comfyume_sim::SimConfig {
        step_ms,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = comfyume_sim::spawn(cfg, listener).await;
    let timeouts = comfyume_dispatch::Timeouts {
        request: std::time::Duration::from_secs(3),
        transfer: std::time::Duration::from_secs(10),
        silence: std::time::Duration::from_secs(5),
    };
    // As serve builds its ComfyUI backends.
    let b = comfyume_dispatch::comfyui::ComfyUiBackend::new(name, sim.url(), 2, timeouts)
        .unwrap()
        .announcing_results_early();
    (sim, Arc::new(b))
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A response, read whole.
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

impl TestApp {
    pub fn client() -> reqwest::Client {
        // Building a client costs ~100 ms (it loads the system's root
        // certificates); one per process. No idle pool: each test has its own
        // runtime and port, so a pooled connection could outlive its server.
        static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
        CLIENT
            .get_or_init(|| {
                // reqwest is built without a bundled TLS provider; tests speak plain
                // HTTP but the client still wants one installed.
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap()
            })
            .clone()
    }

    /// `user`'s request with Basic Auth; `path` is sent as given.
    pub async fn req(
        &self,
        user: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Resp {
        let mut rb = Self::client().request(method, format!("{}{path}", self.base));
        if let Some(u) = user {
            rb = rb.basic_auth(u, Some(PASSWORD));
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let r = rb.send().await.unwrap();
        Resp {
            status: r.status(),
            headers: r.headers().clone(),
            body: r.bytes().await.unwrap().to_vec(),
        }
    }

    pub async fn get(&self, user: &str, path: &str) -> Resp {
        self.req(Some(user), Method::GET, path, None).await
    }

    pub async fn post(&self, user: &str, path: &str, body: impl Into<Vec<u8>>) -> Resp {
        self.req(Some(user), Method::POST, path, Some(body.into()))
            .await
    }

    pub async fn post_json(&self, user: &str, path: &str, v: &Value) -> Resp {
        self.post(user, path, serde_json::to_vec(v).unwrap()).await
    }

    pub async fn delete(&self, user: &str, path: &str) -> Resp {
        self.req(Some(user), Method::DELETE, path, None).await
    }

    /// Multipart upload as the frontend sends it.
    pub async fn upload(
        &self,
        user: &str,
        path: &str,
        name: &str,
        bytes: Vec<u8>,
        fields: &[(&str, &str)],
    ) -> Resp {
        let mut form = reqwest::multipart::Form::new().part(
            "image",
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
        );
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        let r = Self::client()
            .post(format!("{}{path}", self.base))
            .basic_auth(user, Some(PASSWORD))
            .multipart(form)
            .send()
            .await
            .unwrap();
        Resp {
            status: r.status(),
            headers: r.headers().clone(),
            body: r.bytes().await.unwrap().to_vec(),
        }
    }

    /// Logs in through the form and returns the session cookie (`name=value`).
    pub async fn login(&self, user: &str, password: &str) -> Option<String> {
        let r = Self::client()
            .post(format!("{}/login", self.base))
            .form(&[("username", user), ("password", password), ("next", "")])
            .send()
            .await
            .unwrap();
        r.headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with("comfyume_session=") && !c.starts_with("comfyume_session=;"))
            .map(|c| c.split(';').next().unwrap().to_string())
    }

    /// A WebSocket as the frontend opens it, authenticated with Basic Auth.
    pub async fn ws(
        &self,
        user: &str,
        path: &str,
    ) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>
    {
        use base64::Engine;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .unwrap();
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{PASSWORD}"));
        req.headers_mut()
            .insert("authorization", format!("Basic {cred}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        ws
    }
}

/// Next text message as JSON, within 5 s.
pub async fn next_json<S>(ws: &mut S) -> Value
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
            .await
            .expect("a WebSocket message within 5 s")
            .expect("socket open")
            .expect("no socket error");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// A tiny valid PNG (w×h, RGBA, one colour).
pub fn png(w: u32, h: u32, rgba: [u8; 4]) -> Vec<u8> {
    let img = image::RgbaImage::from_pixel(w, h, image::Rgba(rgba));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

/// The four places ComfyUI's participant routes answer: `/X`, `/api/X`, and
/// both again under the participant's own prefix (the frontend derives its API
/// base from the page path).
pub fn variants(user: &str, path: &str) -> [String; 4] {
    [
        path.to_string(),
        format!("/api{path}"),
        format!("/{user}{path}"),
        format!("/{user}/api{path}"),
    ]
}

/// The WebSocket type the helpers return.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl TestApp {
    /// Any request, built by the caller (headers, credentials, body), read whole.
    pub async fn send(rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.unwrap();
        Resp {
            status: r.status(),
            headers: r.headers().clone(),
            body: r.bytes().await.unwrap().to_vec(),
        }
    }

    /// A request builder for `path` with no credentials.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        Self::client().request(method, format!("{}{path}", self.base))
    }

    /// GET without credentials, with extra headers.
    pub async fn anon_get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut rb = self.request(Method::GET, path);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        Self::send(rb).await
    }

    /// `user`'s GET (Basic Auth) with extra headers.
    pub async fn get_with(&self, user: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut rb = self
            .request(Method::GET, path)
            .basic_auth(user, Some(PASSWORD));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        Self::send(rb).await
    }

    /// A request authenticated only by a session cookie (`name=value`).
    pub async fn with_cookie(
        &self,
        cookie: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Resp {
        let mut rb = self.request(method, path).header("cookie", cookie);
        if let Some(b) = body {
            rb = rb.body(b);
        }
        Self::send(rb).await
    }

    /// The login form's POST, answered as is (no redirect following).
    pub async fn login_form(&self, user: &str, password: &str, next: &str) -> Resp {
        Self::send(self.request(Method::POST, "/login").form(&[
            ("username", user),
            ("password", password),
            ("next", next),
        ]))
        .await
    }

    /// A multipart upload with a caller-chosen file name and password.
    pub async fn upload_as(
        &self,
        user: &str,
        password: &str,
        path: &str,
        name: &str,
        bytes: Vec<u8>,
        fields: &[(&str, &str)],
    ) -> Resp {
        let mut form = reqwest::multipart::Form::new().part(
            "image",
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
        );
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        Self::send(
            self.request(Method::POST, path)
                .basic_auth(user, Some(password))
                .multipart(form),
        )
        .await
    }

    /// A WebSocket upgrade with exactly these headers (no credentials added):
    /// the error when the server refuses it.
    pub async fn ws_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        tokio_tungstenite::connect_async(req)
            .await
            .map(|(ws, _)| ws)
    }

    /// One HTTP/1.1 request written byte for byte (clients normalise `..`
    /// segments away; attackers do not). Returns the status and the raw body.
    pub async fn raw(&self, user: &str, target: &str) -> (u16, Vec<u8>) {
        use base64::Engine;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{PASSWORD}"));
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {cred}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
        let body = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => buf[i + 4..].to_vec(),
            None => Vec::new(),
        };
        (status, body)
    }

    /// A participant's folders on disk.
    pub fn dirs(&self, user: &str) -> comfyume_gateway::UserDirs {
        self.state.user_dirs(user)
    }
}

/// Asserts that no text message arrives on `ws` within `ms` milliseconds.
pub async fn assert_silent(ws: &mut Ws, ms: u64) {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(ms);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                panic!("unexpected WebSocket message: {t}")
            }
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("socket ended: {other:?}"),
        }
    }
}

/// Decodes an image body (PNG, JPEG, WebP).
pub fn decode(bytes: &[u8]) -> image::DynamicImage {
    image::load_from_memory(bytes).expect("a decodable image")
}

impl TestApp {
    /// A second process's state over the same store and data directory, as
    /// after a restart (the running server keeps its own).
    pub async fn fresh_state(&self) -> AppState {
        let frontend = self.data_dir.parent().unwrap().join("frontend");
        let settings = Settings::with_data_dir(&self.data_dir, &frontend);
        let (state, _) = comfyume_gateway::build_state(settings, self.store.clone(), queue_cfg())
            .await
            .unwrap();
        state
    }
}

// ---- queue and dispatch stories (tests/queue.rs, tests/dispatch.rs) ----

/// A workflow of `tests/fixtures/comfyui/workflows/` (API format).
pub fn workflow(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(shared(&format!("workflows/{name}"))).unwrap())
        .unwrap()
}

/// Backend call limits short enough for tests.
pub fn test_timeouts() -> comfyume_dispatch::Timeouts {
    comfyume_dispatch::Timeouts {
        request: std::time::Duration::from_secs(3),
        transfer: std::time::Duration::from_secs(10),
        silence: std::time::Duration::from_secs(5),
    }
}

/// A simulator with `slots` backend slots (one: the scheduler decides every job).
pub async fn sim_backend_slots(
    name: &str,
    step_ms: u64,
    slots: usize,
) -> (comfyume_sim::SimHandle, Arc<dyn comfyume_dispatch::Backend>) {
    let cfg = comfyume_sim::SimConfig {
        step_ms,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = comfyume_sim::spawn(cfg, listener).await;
    let b = backend_for(&sim, name, slots, test_timeouts());
    (sim, b)
}

/// Another `comfyui` backend pointed at a running simulator (a restarted
/// server reaches the same GPU under the same name).
pub fn backend_for(
    sim: &comfyume_sim::SimHandle,
    name: &str,
    slots: usize,
    timeouts: comfyume_dispatch::Timeouts,
) -> Arc<dyn comfyume_dispatch::Backend> {
    Arc::new(
        comfyume_dispatch::comfyui::ComfyUiBackend::new(name, sim.url(), slots, timeouts)
            .unwrap()
            .announcing_results_early(),
    )
}

/// A server in its own runtime, so it can die like a killed process: every
/// task (HTTP, dispatcher, backend connections) stops at once, the data
/// directory stays. The simulator lives in the test's runtime and goes on.
pub struct Process {
    rt: Option<tokio::runtime::Runtime>,
    pub app: Option<TestApp>,
}

pub fn spawn_process(opts: AppOptions) -> Process {
    let (rt, app) = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let app = rt.block_on(spawn_full(opts));
        (rt, app)
    })
    .join()
    .unwrap();
    Process {
        rt: Some(rt),
        app: Some(app),
    }
}

impl Process {
    pub fn app(&self) -> &TestApp {
        self.app.as_ref().unwrap()
    }

    /// Kills the server (no graceful anything) and hands back its data directory.
    pub fn kill(mut self) -> tempfile::TempDir {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        self.app.take().unwrap().stop()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl TestApp {
    /// `POST /api/prompt` as the frontend sends it, for `user`'s tab `client_id`.
    pub async fn queue_prompt(&self, user: &str, client_id: &str, prompt: &Value) -> Resp {
        let body = serde_json::json!({"client_id": client_id, "prompt": prompt});
        self.post_json(user, "/api/prompt", &body).await
    }

    /// Submits and returns the prompt id (asserting 200).
    pub async fn submit(&self, user: &str, client_id: &str, prompt: &Value) -> String {
        let r = self.queue_prompt(user, client_id, prompt).await;
        assert_eq!(r.status, 200, "POST /api/prompt: {}", r.text());
        r.json()["prompt_id"].as_str().unwrap().to_string()
    }

    /// `/api/jobs/{id}`'s status for `user`.
    pub async fn job_status(&self, user: &str, id: &str) -> String {
        let r = self.get(user, &format!("/api/jobs/{id}")).await;
        assert_eq!(r.status, 200, "GET /api/jobs/{id}: {}", r.text());
        r.json()["status"].as_str().unwrap().to_string()
    }

    /// Waits (up to `secs`) until `user`'s job `id` has one of `states` in
    /// `/api/jobs/{id}`; returns it.
    pub async fn wait_job(&self, user: &str, id: &str, states: &[&str], secs: u64) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let s = self.job_status(user, id).await;
            if states.contains(&s.as_str()) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} still {s} after {secs} s (wanted {states:?})"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The files in `user`'s outputs folder (names, sorted; none half-written).
    pub fn output_files(&self, user: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data_dir.join("outputs").join(user))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Text messages on `ws` until one satisfies `stop` (included), within `secs`.
pub async fn messages_until(ws: &mut Ws, secs: u64, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!("no matching WebSocket message within {secs} s; got {out:#?}")
            })
            .expect("socket open")
            .expect("no socket error");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            let done = stop(&v);
            out.push(v);
            if done {
                return out;
            }
        }
    }
}

/// The end-of-job marker for `id`: `executing` with `node: null`.
pub fn is_end_of(v: &Value, id: &str) -> bool {
    v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == id
}

/// Polls `cond` every 5 ms for up to `ms`; whether it became true.
pub async fn eventually(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The arguments of `comfyume --data-dir DATA serve` on free ports with `frontend`.
pub fn serve_args(data: &std::path::Path, frontend: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["--data-dir".into(), data.into()];
    for a in [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--frontend-dir",
    ] {
        args.push(a.into());
    }
    args.push(frontend.into());
    args
}

/// Starts a prepared `comfyume … serve` command (stdout piped) and waits for
/// its `listening on http://ADDR` line; returns the child and `http://ADDR`.
pub fn spawn_serve(mut cmd: std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(url) = line.strip_prefix("listening on ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("serve prints `listening on http://ADDR`");
    (child, url)
}

/// The entries of a zip archive (name, bytes), read through its central directory, every
/// CRC checked: enough of a reader to check what `export.zip` holds.
pub fn unzip(zip: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let u16_at = |i: usize| u16::from_le_bytes([zip[i], zip[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(zip[i..i + 4].try_into().unwrap()) as usize;
    let end = zip.len() - 22;
    assert_eq!(
        u32_at(end),
        0x0605_4b50,
        "no end of central directory record"
    );
    let (n, mut at) = (u16_at(end + 10), u32_at(end + 16));
    let mut out = Vec::new();
    for _ in 0..n {
        assert_eq!(u32_at(at), 0x0201_4b50, "central directory entry");
        let (method, crc) = (u16_at(at + 10), u32_at(at + 16) as u32);
        let (csize, nl, xl, cl) = (
            u32_at(at + 20),
            u16_at(at + 28),
            u16_at(at + 30),
            u16_at(at + 32),
        );
        let name = String::from_utf8(zip[at + 46..at + 46 + nl].to_vec()).unwrap();
        let local = u32_at(at + 42);
        assert_eq!(u32_at(local), 0x0403_4b50, "local header of {name}");
        let data_at = local + 30 + u16_at(local + 26) + u16_at(local + 28);
        let raw = &zip[data_at..data_at + csize];
        let bytes = match method {
            0 => raw.to_vec(),
            8 => {
                let mut v = Vec::new();
                flate2::read::DeflateDecoder::new(raw)
                    .read_to_end(&mut v)
                    .unwrap();
                v
            }
            m => panic!("{name}: compression method {m}"),
        };
        let mut c = flate2::Crc::new();
        c.update(&bytes);
        assert_eq!(c.sum(), crc, "CRC of {name}");
        out.push((name, bytes));
        at += 46 + nl + xl + cl;
    }
    out
}
