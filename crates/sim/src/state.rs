//! Everything the HTTP handlers, the WebSocket tasks and the prompt worker share.

use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::{ActiveFaults, Fault};
use crate::nodes::Data;
use comfyume_wire::shapes::ws::FORMAT_JPEG;
use comfyume_wire::shapes::{
    preview_image_frame, preview_image_with_metadata_frame, queue_item, status_message,
    to_python_json,
};

/// ComfyUI's `MAXIMUM_HISTORY_SIZE`.
pub const MAX_HISTORY: usize = 10_000;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Lock a mutex, recovering the data if a panicking thread poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone)]
pub struct Dirs {
    pub root: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub temp: PathBuf,
    /// Created by us (removed on graceful shutdown).
    pub owned: bool,
}

impl Dirs {
    pub fn by_type(&self, t: &str) -> Option<&Path> {
        match t {
            "output" => Some(&self.output),
            "input" => Some(&self.input),
            "temp" => Some(&self.temp),
            _ => None,
        }
    }

    /// `folder_paths.annotated_filepath`: `"x.png [output]"` names its own directory.
    pub fn annotated<'a>(&self, name: &'a str) -> (&'a str, Option<&Path>) {
        for (suffix, t) in [
            (" [output]", "output"),
            (" [input]", "input"),
            (" [temp]", "temp"),
        ] {
            if let Some(base) = name.strip_suffix(suffix) {
                return (base, self.by_type(t));
            }
        }
        (name, None)
    }

    /// Files in `input/`, sorted, as LoadImage lists them (subfolders as `sub/name`).
    pub fn input_files(&self) -> Vec<String> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let rel = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path(), &rel, out),
                    Ok(t) if t.is_file() => out.push(rel),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.input, "", &mut out);
        out.sort();
        out
    }
}

/// One entry of ComfyUI's prompt queue.
#[derive(Debug, Clone)]
pub struct QueueItem {
    /// `number` exactly as answered (int from the counter, float when the client sent one).
    pub number: serde_json::Number,
    pub sort_key: f64,
    /// Insertion order, the tie-breaker.
    pub seq: u64,
    pub prompt_id: String,
    pub prompt: Map<String, Value>,
    pub extra_data: Map<String, Value>,
    pub outputs: Vec<String>,
}

impl QueueItem {
    /// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
    pub fn to_json(&self) -> Value {
        queue_item(
            &self.number,
            &self.prompt_id,
            &Value::Object(self.prompt.clone()),
            &Value::Object(self.extra_data.clone()),
            &self.outputs,
        )
    }

    /// The socket id execution messages go to.
    pub fn client_id(&self) -> Option<String> {
        self.extra_data
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

#[derive(Debug, Clone)]
pub struct CacheEntry {
    pub values: Arc<Vec<Data>>,
    pub ui: Option<Value>,
}

#[derive(Debug, Default)]
pub struct Inner {
    pub counter: i64,
    pub seq: u64,
    pub pending: Vec<QueueItem>,
    pub running: Option<QueueItem>,
    pub history: Map<String, Value>,
    /// Classic cache: node signature → outputs of the previous prompt's nodes.
    pub cache: HashMap<String, CacheEntry>,
    /// Client of the running prompt and the node it executes (sent to a reconnecting socket).
    pub exec_client: Option<String>,
    pub last_node: Option<String>,
}

impl Inner {
    pub fn queue_remaining(&self) -> usize {
        self.pending.len() + usize::from(self.running.is_some())
    }

    /// Index of the next item: lowest `(number, insertion)`.
    pub fn next_index(&self) -> Option<usize> {
        self.pending
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| a.sort_key.total_cmp(&b.sort_key).then(a.seq.cmp(&b.seq)))
            .map(|(i, _)| i)
    }

    pub fn add_history(&mut self, prompt_id: String, entry: Value) {
        self.history.insert(prompt_id, entry);
        while self.history.len() > MAX_HISTORY {
            let Some(first) = self.history.keys().next().cloned() else {
                break;
            };
            self.history.shift_remove(&first);
        }
    }
}

/// A frame for one WebSocket.
#[derive(Debug, Clone)]
pub enum Outbound {
    Text(String),
    Binary(Vec<u8>),
}

#[derive(Debug)]
pub struct WsClient {
    pub conn: u64,
    pub tx: mpsc::UnboundedSender<Outbound>,
    pub preview_metadata: bool,
    /// Cancelling drops the socket without a close frame.
    pub kill: CancellationToken,
}

/// Which preview frames a send covers: ComfyUI sends type 4 from the progress handler (before
/// the `progress` message) and type 1 after it, each only to the clients that expect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewPhase {
    WithMetadata,
    Legacy,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub prompts_received: u64,
    pub prompts_accepted: u64,
    pub prompts_rejected: u64,
    pub jobs_run: u64,
    pub jobs_succeeded: u64,
    pub jobs_failed: u64,
    pub jobs_interrupted: u64,
    pub busy: Duration,
    pub current: Option<CurrentJobInner>,
}

#[derive(Debug, Clone)]
pub struct CurrentJobInner {
    pub prompt_id: String,
    pub number: serde_json::Number,
    pub started: Instant,
    pub node: Option<String>,
}

/// The job the simulated GPU is working on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurrentJob {
    pub prompt_id: String,
    pub number: Value,
    /// Node being executed, if any yet.
    pub node: Option<String>,
    pub running_ms: u64,
}

/// `GET /sim/state` and [`crate::SimHandle::state`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimState {
    /// Always `"comfyume-sim"`: this is a simulator, not a GPU server.
    pub simulator: &'static str,
    /// `"builtin"` or the served object_info file.
    pub node_set: String,
    pub step_ms: u64,
    pub faults: ActiveFaults,
    /// `POST /prompt` requests seen (including rejected ones and fault 500s).
    pub prompts_received: u64,
    pub prompts_accepted: u64,
    pub prompts_rejected: u64,
    /// Jobs the worker started executing.
    pub jobs_run: u64,
    pub jobs_succeeded: u64,
    pub jobs_failed: u64,
    pub jobs_interrupted: u64,
    pub current_job: Option<CurrentJob>,
    pub queue_pending: usize,
    /// Total time the worker spent executing jobs (the simulated GPU was busy), including the
    /// running job so far.
    pub busy_ms: u64,
    pub ws_clients: usize,
    pub history_items: usize,
    pub uptime_ms: u64,
}

pub struct Shared {
    pub catalog: Catalog,
    pub dirs: Dirs,
    pub step_ms: u64,
    pub cache_enabled: bool,
    pub max_upload_size: u64,
    pub inner: Mutex<Inner>,
    pub hub: Mutex<HashMap<String, WsClient>>,
    pub stats: Mutex<Stats>,
    pub work: Notify,
    pub interrupt: AtomicBool,
    pub faults: watch::Sender<ActiveFaults>,
    fault_gen: AtomicU64,
    /// Cancelled when the server dies (fault or `kill`): every connection is cut.
    pub root: CancellationToken,
    /// Cancelled on graceful shutdown.
    pub shutdown: CancellationToken,
    /// Parent of the current connections; replaced when refusing connections cuts them.
    pub epoch: Mutex<CancellationToken>,
    pub next_conn: AtomicU64,
    pub started: Instant,
    /// Server and worker tasks, aborted when the server dies.
    pub tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    pub died: AtomicBool,
    /// The frontend folder served at `/` (`--front-end-root`).
    pub front_end_root: Option<PathBuf>,
    /// Serialises writes to the user's settings and user data.
    pub user_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    pub fn new(
        catalog: Catalog,
        dirs: Dirs,
        step_ms: u64,
        cache_enabled: bool,
        max_upload_size: u64,
        front_end_root: Option<PathBuf>,
    ) -> Self {
        let root = CancellationToken::new();
        Self {
            catalog,
            dirs,
            step_ms,
            cache_enabled,
            max_upload_size,
            inner: Mutex::new(Inner::default()),
            hub: Mutex::new(HashMap::new()),
            stats: Mutex::new(Stats::default()),
            work: Notify::new(),
            interrupt: AtomicBool::new(false),
            faults: watch::Sender::new(ActiveFaults::default()),
            fault_gen: AtomicU64::new(0),
            epoch: Mutex::new(root.child_token()),
            root,
            shutdown: CancellationToken::new(),
            next_conn: AtomicU64::new(1),
            started: Instant::now(),
            tasks: Mutex::new(Vec::new()),
            died: AtomicBool::new(false),
            front_end_root,
            user_lock: tokio::sync::Mutex::new(()),
        }
    }

    // ---- WebSocket fan-out -------------------------------------------------------------

    /// ComfyUI `send_sync(event, data, sid)` for a built message (`{"type", "data"}`):
    /// `None` broadcasts, `Some` goes to that socket only.
    pub fn send(&self, sid: Option<&str>, message: &Value) {
        let text = to_python_json(message);
        let hub = lock(&self.hub);
        match sid {
            None => {
                for c in hub.values() {
                    let _ = c.tx.send(Outbound::Text(text.clone()));
                }
            }
            Some(sid) => {
                if let Some(c) = hub.get(sid) {
                    let _ = c.tx.send(Outbound::Text(text));
                }
            }
        }
    }

    /// A latent preview: type 4 (with metadata JSON) for clients that announced
    /// `supports_preview_metadata`, type 1 for the others.
    pub fn send_preview(
        &self,
        sid: Option<&str>,
        phase: PreviewPhase,
        jpeg: &[u8],
        metadata: &Value,
    ) {
        let frame = match phase {
            PreviewPhase::WithMetadata => preview_image_with_metadata_frame(metadata, jpeg),
            PreviewPhase::Legacy => preview_image_frame(FORMAT_JPEG, jpeg),
        };
        let wants = |c: &WsClient| c.preview_metadata == (phase == PreviewPhase::WithMetadata);
        let hub = lock(&self.hub);
        let targets: Vec<&WsClient> = match sid {
            None => hub.values().collect(),
            Some(sid) => hub.get(sid).into_iter().collect(),
        };
        for c in targets.into_iter().filter(|c| wants(c)) {
            let _ = c.tx.send(Outbound::Binary(frame.clone()));
        }
    }

    /// `queue_updated()`: broadcast `status`. Called with the queue lock held so the numbers
    /// reach every socket in the order the queue changed.
    pub fn broadcast_status(&self, inner: &Inner) {
        self.send(None, &status_message(inner.queue_remaining() as u64, None));
    }

    /// Cut every WebSocket without a close frame.
    pub fn drop_all_ws(&self) {
        let mut hub = lock(&self.hub);
        for (_, c) in hub.drain() {
            c.kill.cancel();
        }
    }

    pub fn ws_count(&self) -> usize {
        lock(&self.hub).len()
    }

    // ---- faults --------------------------------------------------------------------------

    pub fn apply_fault(self: &Arc<Self>, fault: Fault) {
        let generation = self.fault_gen.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::warn!(?fault, "fault switched on");
        match fault {
            Fault::Clear => {
                self.faults.send_replace(ActiveFaults::default());
            }
            Fault::RefuseConnections { for_ms } => {
                self.faults.send_modify(|f| f.refuse_connections = true);
                self.clear_later(generation, for_ms, |f| f.refuse_connections = false);
            }
            Fault::PromptError => {
                self.faults.send_modify(|f| f.prompt_error = true);
            }
            Fault::DropWebsocket => {
                self.faults.send_modify(|f| f.drop_websocket = true);
            }
            Fault::Hang { for_ms } => {
                self.faults.send_modify(|f| f.hang = true);
                self.clear_later(generation, for_ms, |f| f.hang = false);
            }
            Fault::ForgetHistory => {
                self.forget();
            }
            Fault::ForgetNextHistory => {
                self.faults.send_modify(|f| f.forget_next_history = true);
            }
            Fault::SlowView { ms } => {
                self.faults.send_modify(|f| f.slow_view_ms = ms);
            }
            Fault::SlowWsRegister { ms } => {
                self.faults.send_modify(|f| f.slow_ws_register_ms = ms);
            }
            Fault::DieMidJob => {
                self.faults.send_modify(|f| f.die_mid_job = true);
            }
        }
    }

    fn clear_later(
        self: &Arc<Self>,
        generation: u64,
        for_ms: Option<u64>,
        clear: fn(&mut ActiveFaults),
    ) {
        let Some(ms) = for_ms else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if let Some(shared) = weak.upgrade()
                && shared.fault_gen.load(Ordering::SeqCst) == generation
            {
                shared.faults.send_modify(clear);
                tracing::info!("timed fault cleared");
            }
        });
    }

    /// A fresh replica: no history, no pending prompts, no cache, counter from 0. A job that is
    /// running keeps running (and lands in the new, otherwise empty history).
    fn forget(&self) {
        let mut inner = lock(&self.inner);
        inner.history.clear();
        inner.pending.clear();
        inner.cache.clear();
        inner.counter = 0;
        self.broadcast_status(&inner);
    }

    /// Wait while the `hang` fault is on (or forever once the server died).
    pub async fn wait_not_hung(&self) {
        let mut rx = self.faults.subscribe();
        loop {
            if !rx.borrow_and_update().hang {
                return;
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = self.root.cancelled() => std::future::pending::<()>().await,
            }
        }
    }

    /// Stop abruptly: listener closed, every connection cut, worker stopped.
    pub fn die(&self) {
        if self.died.load(Ordering::SeqCst) {
            return;
        }
        tracing::error!("simulated server dies abruptly");
        self.halt();
    }

    /// Stop everything at once, without the log line (also used when the handle is dropped).
    pub fn halt(&self) {
        if self.died.swap(true, Ordering::SeqCst) {
            return;
        }
        self.root.cancel();
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        self.drop_all_ws();
    }

    /// Cut current connections (refusing connections); later ones get a fresh parent token.
    pub fn cut_connections(&self) {
        let mut epoch = lock(&self.epoch);
        epoch.cancel();
        *epoch = self.root.child_token();
        drop(epoch);
        self.drop_all_ws();
    }

    pub fn connection_token(&self) -> CancellationToken {
        lock(&self.epoch).child_token()
    }

    pub fn state(&self) -> SimState {
        let (queue_pending, history_items) = {
            let inner = lock(&self.inner);
            (inner.pending.len(), inner.history.len())
        };
        let stats = lock(&self.stats);
        let running = stats
            .current
            .as_ref()
            .map(|c| c.started.elapsed())
            .unwrap_or_default();
        SimState {
            simulator: "comfyume-sim",
            node_set: self.catalog.source.clone(),
            step_ms: self.step_ms,
            faults: self.faults.borrow().clone(),
            prompts_received: stats.prompts_received,
            prompts_accepted: stats.prompts_accepted,
            prompts_rejected: stats.prompts_rejected,
            jobs_run: stats.jobs_run,
            jobs_succeeded: stats.jobs_succeeded,
            jobs_failed: stats.jobs_failed,
            jobs_interrupted: stats.jobs_interrupted,
            current_job: stats.current.as_ref().map(|c| CurrentJob {
                prompt_id: c.prompt_id.clone(),
                number: Value::Number(c.number.clone()),
                node: c.node.clone(),
                running_ms: c.started.elapsed().as_millis() as u64,
            }),
            queue_pending,
            busy_ms: (stats.busy + running).as_millis() as u64,
            ws_clients: self.ws_count(),
            history_items,
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}
