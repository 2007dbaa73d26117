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

pub fn shared(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/comfyui"
    ))
    .join(rel)
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub base: String,
    pub data_dir: PathBuf,
    pub state: AppState,
    pub store: Arc<dyn Store>,
    _tmp: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A minimal stand-in for the frontend's static folder (the browser test uses
/// the real one): enough for routing, caching and the extension list.
fn fake_frontend(dir: &std::path::Path) {
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

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let frontend = tmp.path().join("frontend");
    fake_frontend(&frontend);
    let store: Arc<dyn Store> = Arc::new(
        comfyume_store::sqlite::SqliteStore::open(&data_dir.join("comfyume.db"))
            .await
            .unwrap(),
    );
    for u in ["user001", "user002"] {
        store
            .create_user(u, PASSWORD, Role::Participant)
            .await
            .unwrap();
    }
    store
        .create_user(ADMIN, PASSWORD, Role::Admin)
        .await
        .unwrap();
    let mut settings = Settings::with_data_dir(&data_dir, &frontend);
    tweak(&mut settings);
    let (state, _) = comfyume_gateway::build_state(settings, store.clone(), queue_cfg())
        .await
        .unwrap();
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(shared("api/object_info.json")).unwrap())
            .unwrap();
    comfyume_gateway::replace_object_info(&state, info, "test")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    tokio::spawn(async move {
        comfyume_gateway::launch(st, listener, async {
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
        _tmp: tmp,
        shutdown: Some(tx),
    }
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
        // reqwest is built without a bundled TLS provider; tests speak plain HTTP
        // but the client still wants one installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
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
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl TestApp {
    /// Any request, built by the caller (headers, credentials, body), read whole.
    pub async fn send(rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.unwrap();
        Resp { status: r.status(), headers: r.headers().clone(), body: r.bytes().await.unwrap().to_vec() }
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
        let mut rb = self.request(Method::GET, path).basic_auth(user, Some(PASSWORD));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        Self::send(rb).await
    }

    /// A request authenticated only by a session cookie (`name=value`).
    pub async fn with_cookie(&self, cookie: &str, method: Method, path: &str, body: Option<Vec<u8>>) -> Resp {
        let mut rb = self.request(method, path).header("cookie", cookie);
        if let Some(b) = body {
            rb = rb.body(b);
        }
        Self::send(rb).await
    }

    /// The login form's POST, answered as is (no redirect following).
    pub async fn login_form(&self, user: &str, password: &str, next: &str) -> Resp {
        Self::send(
            self.request(Method::POST, "/login")
                .form(&[("username", user), ("password", password), ("next", next)]),
        )
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
        let mut form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()));
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        Self::send(self.request(Method::POST, path).basic_auth(user, Some(password)).multipart(form)).await
    }

    /// A WebSocket upgrade with exactly these headers (no credentials added):
    /// the error when the server refuses it.
    pub async fn ws_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}{path}", self.addr).into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
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
