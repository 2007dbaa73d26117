//! One participant, as the stock frontend behaves: signs in (form, cookie),
//! loads the UI, keeps the WebSocket open (reconnecting with the same client
//! id, then re-reading its jobs, as the frontend does after a reconnect),
//! clicks Run in bursts with think time, waits on its socket for each job's
//! end, fetches each result through `/api/view`, and now and then closes the
//! tab right after a click (the request sent, the connection dropped).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;

use super::plan::{Action, Click, Day};
use super::procs::epoch_ms;
use crate::common;

/// The kinds of participant requests timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Login,
    Page,
    Api,
    Submit,
    Job,
    View,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Login => "POST /login",
            Kind::Page => "page and assets",
            Kind::Api => "UI API calls",
            Kind::Submit => "POST /api/prompt",
            Kind::Job => "GET /api/jobs/{id}",
            Kind::View => "GET /api/view",
        }
    }
}

/// A job the server acknowledged with 200.
#[derive(Debug, Clone)]
pub struct Acked {
    pub id: String,
    pub user: String,
    pub at_ms: i64,
}

/// Everything the participants saw, for the report.
#[derive(Default)]
pub struct Ledger {
    pub acked: Vec<Acked>,
    /// Clicks whose tab was closed right after the request went out.
    pub closed_tab: usize,
    /// Submissions that failed after the request may have reached the server.
    pub ambiguous: Vec<String>,
    /// Submissions answered with an error: "status type" -> count.
    pub refused: BTreeMap<String, usize>,
    pub latency: Vec<(Kind, Duration)>,
    /// Requests that got no answer (server down, reset), by kind.
    pub errors: BTreeMap<Kind, usize>,
    /// Jobs whose end the participant saw on its socket / learnt by re-reading.
    pub ended_ws: HashSet<String>,
    pub ended_resync: HashSet<String>,
    /// Jobs the participant stopped waiting for during the run.
    pub gave_up: HashSet<String>,
    /// "Retrying on another GPU" notices, per job.
    pub retry_notices: HashMap<String, usize>,
    pub ws_connects: usize,
    pub ws_drops: usize,
    pub outputs_fetched: usize,
    /// Outputs that could not be fetched during the run (the final check decides).
    pub output_misses: Vec<String>,
}

/// What every participant shares.
pub struct Shared {
    pub client: reqwest::Client,
    pub addr: SocketAddr,
    pub ledger: Mutex<Ledger>,
    pub stop: watch::Receiver<bool>,
    /// How long a participant waits for a burst's jobs before moving on.
    pub wait_limit: Duration,
}

impl Shared {
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn note(&self, f: impl FnOnce(&mut Ledger)) {
        f(&mut self.ledger.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Ends a participant's sockets have seen, shared by its tabs.
#[derive(Default)]
struct Board {
    ended: Mutex<HashSet<String>>,
    changed: Notify,
    /// Set after a socket reconnects: the frontend then re-reads queue and history.
    resync: AtomicBool,
}

pub struct Participant {
    sh: Arc<Shared>,
    pub user: String,
    pw: String,
    cookie: Mutex<String>,
    board: Arc<Board>,
    tabs: AtomicU64,
}

/// A tab: its client id and the task holding its socket.
struct Tab {
    client_id: String,
    close: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Tab {
    async fn close(self) {
        let _ = self.close.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// How long a participant still waits for its jobs once submissions stop.
const AFTER_STOP_WAIT: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The body the frontend posts for a Run.
pub fn prompt_body(click: &Click, client_id: &str) -> Value {
    let prompt = if click.steps == 0 {
        common::nomodel_prompt(click.seed)
    } else {
        common::flux_prompt(click.steps, click.seed, 64)
    };
    json!({
        "client_id": client_id,
        "prompt": prompt,
        "extra_data": {"extra_pnginfo": {"workflow": {"nodes": [], "links": [], "version": 0.4}}}
    })
}

/// `(filename, subfolder, type)` of every file a job's outputs name.
pub fn output_files(outputs: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let Some(nodes) = outputs.as_object() else {
        return out;
    };
    for ui in nodes.values() {
        let Some(kinds) = ui.as_object() else {
            continue;
        };
        for list in kinds.values() {
            for f in list.as_array().into_iter().flatten() {
                if let Some(name) = f.get("filename").and_then(Value::as_str) {
                    out.push((
                        name.to_string(),
                        f.get("subfolder")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        f.get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("output")
                            .to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// The status strings of ComfyUI's jobs API that mean the job is over.
pub fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

impl Participant {
    pub fn new(sh: Arc<Shared>, user: String, pw: String) -> Arc<Participant> {
        Arc::new(Participant {
            sh,
            user,
            pw,
            cookie: Mutex::new(String::new()),
            board: Arc::new(Board::default()),
            tabs: AtomicU64::new(0),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}/{}", self.sh.base(), self.user, path)
    }

    /// Signs in through the form, retrying while the server is away.
    async fn login(&self) -> Result<()> {
        let mut delay = Duration::from_millis(300);
        for _ in 0..60 {
            let t = Instant::now();
            match common::login(&self.sh.client, &self.sh.base(), &self.user, &self.pw).await {
                Ok(c) => {
                    self.sh.note(|l| l.latency.push((Kind::Login, t.elapsed())));
                    *lock(&self.cookie) = c;
                    return Ok(());
                }
                Err(_) => self
                    .sh
                    .note(|l| *l.errors.entry(Kind::Login).or_default() += 1),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(3));
        }
        bail!("{} could not sign in", self.user)
    }

    /// One request with the session cookie; re-signs in once on a 401. `None`
    /// when no answer came (counted as an error of its kind).
    async fn send(
        &self,
        kind: Kind,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Option<reqwest::Response> {
        for attempt in 0..2 {
            let cookie = lock(&self.cookie).clone();
            let mut rb = self
                .sh
                .client
                .request(method.clone(), self.url(path))
                .header("cookie", cookie)
                .timeout(Duration::from_secs(30));
            if let Some(b) = body {
                rb = rb
                    .header("content-type", "application/json")
                    .header("origin", self.sh.base())
                    .body(b.to_string());
            }
            let t = Instant::now();
            match rb.send().await {
                Ok(r) => {
                    self.sh.note(|l| l.latency.push((kind, t.elapsed())));
                    if r.status() == 401 && attempt == 0 && self.login().await.is_ok() {
                        continue;
                    }
                    return Some(r);
                }
                Err(_) => {
                    self.sh.note(|l| *l.errors.entry(kind).or_default() += 1);
                    return None;
                }
            }
        }
        None
    }

    /// A GET retried a few times while the server is away; the answer's JSON if it is 200.
    async fn get_json(&self, kind: Kind, path: &str) -> Option<Value> {
        for _ in 0..5 {
            if let Some(r) = self.send(kind, reqwest::Method::GET, path, None).await {
                if r.status() == 200 {
                    return r.json().await.ok();
                }
                if r.status() == 404 {
                    return None;
                }
            }
            if self.sh.stopped() {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        None
    }

    /// index.html, a few of the files it references, and the API calls of a page load.
    async fn load_ui(&self) {
        let Some(r) = self.send(Kind::Page, reqwest::Method::GET, "", None).await else {
            return;
        };
        let html = r.text().await.unwrap_or_default();
        for asset in crate::ui_load::referenced_assets(&html).iter().take(4) {
            if let Some(r) = self
                .send(Kind::Page, reqwest::Method::GET, asset, None)
                .await
            {
                let _ = r.bytes().await;
            }
        }
        for api in [
            "api/system_stats",
            "api/settings",
            "api/object_info",
            "api/queue",
            "api/history?max_items=64",
        ] {
            if let Some(r) = self.send(Kind::Api, reqwest::Method::GET, api, None).await {
                let _ = r.bytes().await;
            }
        }
    }

    /// Opens a tab: the UI, then its socket (kept open and reconnected by its own task).
    async fn open_tab(self: &Arc<Self>) -> Tab {
        self.load_ui().await;
        let n = self.tabs.fetch_add(1, Ordering::SeqCst);
        let client_id = format!("{}-tab{}", self.user, n + 1);
        let (close, closed) = watch::channel(false);
        let me = self.clone();
        let cid = client_id.clone();
        let task = tokio::spawn(async move { me.socket(cid, closed).await });
        Tab {
            client_id,
            close,
            task,
        }
    }

    /// The tab's WebSocket: records each job's end marker; reconnects like the
    /// frontend (same client id, growing pause) and asks for a re-read after.
    async fn socket(self: Arc<Self>, client_id: String, mut closed: watch::Receiver<bool>) {
        let url = format!(
            "ws://{}/{}/ws?clientId={client_id}",
            self.sh.addr, self.user
        );
        let mut delay = Duration::from_millis(300);
        let mut first = true;
        while !*closed.borrow() {
            let cookie = lock(&self.cookie).clone();
            let conn = tokio::time::timeout(
                Duration::from_secs(10),
                common::ws_connect(&url, &[("cookie", cookie)]),
            )
            .await;
            let mut ws = match conn {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    if format!("{e:#}").contains("401") {
                        let _ = self.login().await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = closed.changed() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(4));
                    continue;
                }
                Err(_) => continue,
            };
            delay = Duration::from_millis(300);
            self.sh.note(|l| l.ws_connects += 1);
            if !first {
                self.board.resync.store(true, Ordering::SeqCst);
                self.board.changed.notify_waiters();
            }
            first = false;
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(t))) => self.on_message(t.as_str()),
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            self.sh.note(|l| l.ws_drops += 1);
                            break;
                        }
                    },
                    _ = closed.changed() => {
                        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                        return;
                    }
                }
            }
        }
    }

    fn on_message(&self, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let id = v["data"]["prompt_id"].as_str().unwrap_or_default();
        match v["type"].as_str() {
            Some("executing") if v["data"]["node"].is_null() && !id.is_empty() => {
                lock(&self.board.ended).insert(id.to_string());
                self.board.changed.notify_waiters();
            }
            Some("comfyume")
                if !id.is_empty()
                    && v["data"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("Retrying")) =>
            {
                let id = id.to_string();
                self.sh
                    .note(|l| *l.retry_notices.entry(id).or_default() += 1);
            }
            _ => {}
        }
    }

    /// Clicks Run: `Some(id)` when the server accepted the job.
    async fn submit(&self, click: &Click, client_id: &str) -> Option<String> {
        let body = prompt_body(click, client_id);
        for _ in 0..10 {
            let cookie = lock(&self.cookie).clone();
            let t = Instant::now();
            let res = self
                .sh
                .client
                .post(self.url("api/prompt"))
                .header("cookie", cookie)
                .header("content-type", "application/json")
                .header("origin", self.sh.base())
                .timeout(Duration::from_secs(30))
                .body(body.to_string())
                .send()
                .await;
            match res {
                Ok(r) => {
                    self.sh
                        .note(|l| l.latency.push((Kind::Submit, t.elapsed())));
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    if status == 200
                        && let Some(id) = v["prompt_id"].as_str()
                    {
                        let a = Acked {
                            id: id.to_string(),
                            user: self.user.clone(),
                            at_ms: epoch_ms(),
                        };
                        self.sh.note(|l| l.acked.push(a));
                        return Some(id.to_string());
                    }
                    if status == 401 {
                        let _ = self.login().await;
                        continue;
                    }
                    let kind = v["error"]["type"].as_str().unwrap_or("").to_string();
                    self.sh
                        .note(|l| *l.refused.entry(format!("{status} {kind}")).or_default() += 1);
                    return None;
                }
                // Never reached the server (it is restarting): click again shortly.
                Err(e) if e.is_connect() => {
                    self.sh
                        .note(|l| *l.errors.entry(Kind::Submit).or_default() += 1);
                    if self.sh.stopped() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    let what = format!("{}: {e}", self.user);
                    self.sh.note(|l| {
                        *l.errors.entry(Kind::Submit).or_default() += 1;
                        l.ambiguous.push(what);
                    });
                    return None;
                }
            }
        }
        None
    }

    /// Clicks Run and closes the tab at once: the request goes out whole, the
    /// connection is dropped before any answer (after `linger`).
    async fn submit_and_close(&self, click: &Click, client_id: &str, linger: Duration) {
        let body = prompt_body(click, client_id).to_string();
        let cookie = lock(&self.cookie).clone();
        let head = format!(
            "POST /{}/api/prompt HTTP/1.1\r\nhost: {}\r\norigin: http://{}\r\ncookie: {cookie}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.user,
            self.sh.addr,
            self.sh.addr,
            body.len()
        );
        let sent = async {
            let mut s = tokio::net::TcpStream::connect(self.sh.addr).await?;
            s.write_all(head.as_bytes()).await?;
            s.write_all(body.as_bytes()).await?;
            tokio::time::sleep(linger).await;
            Ok::<_, std::io::Error>(())
        };
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(5), sent).await,
            Ok(Ok(()))
        );
        if ok {
            self.sh.note(|l| l.closed_tab += 1);
        }
    }

    /// Waits for the end of `ids` (their end markers on the socket; re-reads
    /// the jobs after a reconnect and every 15 s), bounded by the wait limit.
    async fn wait_ends(&self, ids: &[String]) -> Vec<String> {
        let mut deadline = Instant::now() + self.sh.wait_limit;
        let mut stop_seen = false;
        let mut open: Vec<String> = ids.to_vec();
        let mut ended = Vec::new();
        let mut last_read = Instant::now();
        loop {
            let changed = self.board.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let seen = lock(&self.board.ended);
                let (done, rest): (Vec<String>, Vec<String>) =
                    open.into_iter().partition(|id| seen.contains(id));
                open = rest;
                if !done.is_empty() {
                    let d = done.clone();
                    self.sh.note(|l| l.ended_ws.extend(d));
                    ended.extend(done);
                }
            }
            if open.is_empty() {
                return ended;
            }
            // After the run the participant leaves soon; the final read-back
            // decides what is stuck.
            if self.sh.stopped() && !stop_seen {
                stop_seen = true;
                deadline = deadline.min(Instant::now() + AFTER_STOP_WAIT);
            }
            if Instant::now() > deadline {
                let o = open.clone();
                self.sh.note(|l| l.gave_up.extend(o));
                return ended;
            }
            if self.board.resync.swap(false, Ordering::SeqCst)
                || last_read.elapsed() > Duration::from_secs(15)
            {
                last_read = Instant::now();
                let mut still = Vec::new();
                for id in open {
                    let st = self
                        .get_json(Kind::Job, &format!("api/jobs/{id}"))
                        .await
                        .and_then(|v| v["status"].as_str().map(str::to_string));
                    if st.as_deref().is_some_and(is_terminal) {
                        let i = id.clone();
                        self.sh.note(|l| {
                            l.ended_resync.insert(i);
                        });
                        ended.push(id);
                    } else {
                        still.push(id);
                    }
                }
                open = still;
                continue;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
        }
    }

    /// Looks at a finished job's result: its files through `/api/view`.
    async fn fetch_outputs(&self, id: &str) {
        let Some(job) = self.get_json(Kind::Job, &format!("api/jobs/{id}")).await else {
            return;
        };
        if job["status"] != "completed" {
            return;
        }
        for (name, sub, kind) in output_files(&job["outputs"]) {
            let path = format!(
                "api/view?filename={}&subfolder={}&type={}",
                enc(&name),
                enc(&sub),
                enc(&kind)
            );
            let mut got = false;
            for _ in 0..3 {
                if let Some(r) = self
                    .send(Kind::View, reqwest::Method::GET, &path, None)
                    .await
                    && r.status() == 200
                    && r.bytes().await.is_ok_and(|b| !b.is_empty())
                {
                    got = true;
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let what = format!("{id}: {name}");
            self.sh.note(|l| {
                if got {
                    l.outputs_fetched += 1;
                } else {
                    l.output_misses.push(what);
                }
            });
        }
    }

    /// The participant's day until the run stops (then the last burst's jobs
    /// are still waited for, within the wait limit).
    pub async fn day(self: Arc<Self>, mut plan: Day, start_after: Duration) -> Result<()> {
        tokio::time::sleep(start_after).await;
        self.login().await?;
        let mut tab = self.open_tab().await;
        let mut stop = self.sh.stop.clone();
        let mut linger_ms = 0u64;
        while !self.sh.stopped() {
            match plan.next().ok_or_else(|| anyhow!("a day has no end"))? {
                Action::Think(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = stop.changed() => {}
                    }
                }
                Action::Burst(clicks) => {
                    let mut ids = Vec::new();
                    for c in clicks {
                        if self.sh.stopped() {
                            break;
                        }
                        tokio::time::sleep(c.pause).await;
                        if c.closes_tab {
                            // 0, 5, 10 ... 25 ms after the request went out.
                            linger_ms = (linger_ms + 5) % 30;
                            self.submit_and_close(
                                &c,
                                &tab.client_id,
                                Duration::from_millis(linger_ms),
                            )
                            .await;
                            tab.close().await;
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                            tab = self.open_tab().await;
                            continue;
                        }
                        if let Some(id) = self.submit(&c, &tab.client_id).await {
                            ids.push(id);
                        }
                    }
                    for id in self.wait_ends(&ids).await {
                        self.fetch_outputs(&id).await;
                    }
                }
            }
        }
        tab.close().await;
        Ok(())
    }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_files_of_a_job() {
        let outputs = json!({
            "13": {"images": [
                {"filename": "flux2_00001_.png", "subfolder": "", "type": "output"},
                {"filename": "b c.png", "subfolder": "x/y", "type": "temp"}
            ]},
            "20": {"text": ["not a file"]},
            "21": "junk"
        });
        assert_eq!(
            output_files(&outputs),
            vec![
                ("flux2_00001_.png".into(), "".into(), "output".into()),
                ("b c.png".into(), "x/y".into(), "temp".into()),
            ]
        );
        assert!(output_files(&Value::Null).is_empty());
        assert_eq!(enc("b c/ä.png"), "b%20c%2F%C3%A4.png");
    }

    #[test]
    fn the_body_is_what_the_frontend_posts() {
        let c = Click {
            steps: 0,
            seed: 5,
            closes_tab: false,
            pause: Duration::ZERO,
        };
        let b = prompt_body(&c, "u-tab1");
        assert_eq!(b["client_id"], "u-tab1");
        assert_eq!(b["prompt"]["3"]["class_type"], "SaveImage");
        assert!(b["extra_data"]["extra_pnginfo"]["workflow"].is_object());
        let f = prompt_body(&Click { steps: 6, ..c }, "u");
        assert_eq!(f["prompt"]["7"]["inputs"]["steps"], 6);
        assert!(is_terminal("failed") && !is_terminal("in_progress"));
    }
}
