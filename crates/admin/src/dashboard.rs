//! The dashboard's live model: one background task turns the workshop's changes (the
//! queue's, running jobs' progress, sockets opening and closing, the instructor's actions)
//! into sections of JSON, and pushes each section that changed to every open dashboard
//! over its WebSocket. Nothing polls: the queue, the hub and the actions signal changes;
//! only time-driven facts (disk use, the day's chart, a backend's "failing" expiring) are
//! sampled, on the server, every few seconds. Work is done only while a dashboard is open.
//!
//! Messages to the page: `{"type":"snapshot","sections":{...every section...}}` first (and
//! again after the page fell behind), then `{"type":"update","sections":{...changed...}}`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use comfyume_dispatch::Dispatcher;
use comfyume_dispatch::queue::now_ms;
use comfyume_gateway::AppState;
use comfyume_store::{JobState, Role, StoreError, SummaryOrder, SummaryQuery};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

use crate::{Admin, Instructor, settings, system};

/// The parts of the page, each sent whole when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    Queue,
    Progress,
    Results,
    Participants,
    Gpus,
    System,
    Audit,
    Broadcast,
    Room,
}

impl Section {
    pub const ALL: [Section; 9] = [
        Section::Queue,
        Section::Progress,
        Section::Results,
        Section::Participants,
        Section::Gpus,
        Section::System,
        Section::Audit,
        Section::Broadcast,
        Section::Room,
    ];
    pub fn key(self) -> &'static str {
        match self {
            Section::Queue => "queue",
            Section::Progress => "progress",
            Section::Results => "results",
            Section::Participants => "participants",
            Section::Gpus => "gpus",
            Section::System => "system",
            Section::Audit => "audit",
            Section::Broadcast => "broadcast",
            Section::Room => "room",
        }
    }
}

/// Waiting jobs listed in the queue section (the count says how many there are).
const MAX_WAITING_SHOWN: usize = 500;
/// Latest results shown (jobs).
const RESULTS: u64 = 24;
/// Audit entries shown.
const AUDIT_SHOWN: u32 = 50;
/// Changes arriving within this are sent together.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Progress is sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// The participants' list (a grouped count over the jobs table) at most this often.
const PARTICIPANTS_EVERY: Duration = Duration::from_millis(1000);
/// Disk use, storage per participant, node definitions' age.
const SYSTEM_EVERY: Duration = Duration::from_secs(30);
/// The day's chart.
const CHART_EVERY: Duration = Duration::from_secs(60);
/// Messages an open dashboard may be behind before it gets a fresh snapshot instead.
const UPDATE_BUFFER: usize = 64;

/// What the model keeps between rounds.
#[derive(Default)]
struct Cache {
    /// Succeeded jobs when the results were last read (a trigger-kept count: one row).
    succeeded: Option<u64>,
    /// Bytes per participant (outputs, inputs, user data).
    storage: HashMap<String, u64>,
    /// Disk use of the data directory's areas and its file system.
    disk: Value,
    chart: Value,
}

pub struct Dashboard {
    state: AppState,
    dispatcher: Option<Arc<Dispatcher>>,
    started_ms: i64,
    updates: broadcast::Sender<Arc<str>>,
    sections: RwLock<BTreeMap<&'static str, Value>>,
    kicked: Mutex<HashSet<Section>>,
    kick: Notify,
    viewers: AtomicUsize,
    broadcast: RwLock<Option<Value>>,
    room: RwLock<Option<Value>>,
    cache: tokio::sync::Mutex<Cache>,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write<T>(l: &RwLock<T>, v: T) {
    *l.write().unwrap_or_else(|p| p.into_inner()) = v;
}

impl Dashboard {
    /// Starts the model's task (supervised: restarted, logged, if it ever ends or panics).
    pub fn start(state: AppState, dispatcher: Option<Arc<Dispatcher>>) -> Arc<Self> {
        let (updates, _) = broadcast::channel(UPDATE_BUFFER);
        let d = Arc::new(Dashboard {
            state,
            dispatcher,
            started_ms: now_ms(),
            updates,
            sections: RwLock::new(BTreeMap::new()),
            kicked: Mutex::new(HashSet::new()),
            kick: Notify::new(),
            viewers: AtomicUsize::new(0),
            broadcast: RwLock::new(None),
            room: RwLock::new(None),
            cache: tokio::sync::Mutex::new(Cache::default()),
        });
        let me = d.clone();
        tokio::spawn(async move {
            // Saved at the last run: the broadcast stays until cleared, a restart included.
            let b: Option<Option<Value>> = settings::load(&me.state, settings::BROADCAST_KEY).await;
            write(&me.broadcast, b.flatten());
            let r: Option<Option<Value>> = settings::load(&me.state, settings::ROOM_KEY).await;
            write(&me.room, r.flatten());
            loop {
                let inner = me.clone();
                match tokio::spawn(async move { inner.run().await }).await {
                    Ok(()) => tracing::error!("the dashboard's model ended; restarting it"),
                    Err(e) => {
                        tracing::error!(error = %e, "the dashboard's model crashed; restarting it")
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        d
    }

    /// Asks for `s` to be recomputed and sent (after an action changed it).
    pub fn kick(&self, s: Section) {
        self.kicked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(s);
        self.kick.notify_one();
    }

    pub fn broadcast(&self) -> Option<Value> {
        read(&self.broadcast)
    }

    pub fn set_broadcast(&self, b: Option<Value>) {
        write(&self.broadcast, b);
        self.kick(Section::Broadcast);
    }

    pub fn room(&self) -> Option<Value> {
        read(&self.room)
    }

    pub fn set_room(&self, r: Option<Value>) {
        write(&self.room, r);
        self.kick(Section::Room);
    }

    /// Open dashboards.
    pub fn viewers(&self) -> usize {
        self.viewers.load(Ordering::SeqCst)
    }

    async fn run(self: Arc<Self>) {
        let mut changes = self.state.queue.subscribe_changes();
        let mut progress = self.state.queue.subscribe_progress();
        let mut sockets = self.state.hub.subscribe_changes();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_participants = tokio::time::Instant::now() - PARTICIPANTS_EVERY;
        let mut last_progress = tokio::time::Instant::now() - PROGRESS_EVERY;
        let mut last_system = tokio::time::Instant::now() - SYSTEM_EVERY;
        let mut last_chart = tokio::time::Instant::now() - CHART_EVERY;
        let mut dirty: HashSet<Section> = HashSet::new();
        let mut participants_due = false;
        loop {
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() { return; }
                    dirty.extend([Section::Queue, Section::Gpus, Section::Results]);
                    participants_due = true;
                }
                r = progress.changed() => {
                    if r.is_err() { return; }
                    dirty.insert(Section::Progress);
                }
                r = sockets.changed() => {
                    if r.is_err() { return; }
                    participants_due = true;
                }
                _ = self.kick.notified() => {
                    let k: Vec<Section> = self.kicked.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
                    dirty.extend(k);
                }
                _ = tick.tick() => {
                    // A backend's "failing" ends with time; wait and run times are drawn by the page.
                    dirty.insert(Section::Gpus);
                }
            }
            // Whatever else arrives meanwhile goes in the same round.
            tokio::time::sleep(DEBOUNCE).await;
            if changes.has_changed().unwrap_or(false) {
                changes.mark_unchanged();
                dirty.extend([Section::Queue, Section::Gpus, Section::Results]);
                participants_due = true;
            }
            if self.viewers() == 0 {
                // Nobody looks: nothing to compute. A new dashboard gets a fresh snapshot.
                dirty.clear();
                participants_due = false;
                continue;
            }
            let now = tokio::time::Instant::now();
            if participants_due && now - last_participants >= PARTICIPANTS_EVERY {
                dirty.insert(Section::Participants);
                participants_due = false;
            }
            if dirty.contains(&Section::Participants) {
                last_participants = now;
            }
            if dirty.contains(&Section::Progress) {
                if now - last_progress < PROGRESS_EVERY {
                    // Sent with the next round.
                    dirty.remove(&Section::Progress);
                    progress.mark_changed();
                } else {
                    last_progress = now;
                }
            }
            if now - last_system >= SYSTEM_EVERY {
                last_system = now;
                self.refresh_disk().await;
                dirty.extend([Section::System, Section::Participants]);
            }
            if now - last_chart >= CHART_EVERY {
                last_chart = now;
                self.refresh_chart().await;
                dirty.insert(Section::Gpus);
            }
            let mut todo: Vec<Section> = dirty.drain().collect();
            todo.sort();
            self.publish(&todo).await;
        }
    }

    /// Computes `sections` and sends those that changed.
    async fn publish(&self, sections: &[Section]) {
        let mut changed = serde_json::Map::new();
        for &s in sections {
            let v = match self.compute(s).await {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(section = s.key(), error = %e, "dashboard: could not read the store; trying again at the next change");
                    continue;
                }
            };
            let mut last = self.sections.write().unwrap_or_else(|p| p.into_inner());
            if last.get(s.key()) != Some(&v) {
                last.insert(s.key(), v.clone());
                changed.insert(s.key().to_string(), v);
            }
        }
        if changed.is_empty() {
            return;
        }
        let msg = json!({"type": "update", "now_ms": now_ms(), "sections": changed}).to_string();
        // No receiver is fine: nobody looks right now.
        let _ = self.updates.send(Arc::from(msg));
    }

    /// A section's current value; `None` when it is unchanged by definition (results with
    /// no new one).
    async fn compute(&self, s: Section) -> Result<Option<Value>, StoreError> {
        Ok(Some(match s {
            Section::Queue => self.queue_section().await?,
            Section::Progress => self.progress_section(),
            Section::Results => {
                let n = self
                    .state
                    .store
                    .count_jobs(None, &[JobState::Succeeded])
                    .await?;
                let mut c = self.cache.lock().await;
                if c.succeeded == Some(n) && self.has(Section::Results) {
                    return Ok(None);
                }
                c.succeeded = Some(n);
                drop(c);
                self.results_section().await?
            }
            Section::Participants => self.participants_section().await?,
            Section::Gpus => self.gpus_section_async().await,
            Section::System => self.system_section().await?,
            Section::Audit => json!(self.state.store.list_audit(None, AUDIT_SHOWN).await?),
            Section::Broadcast => json!(self.broadcast()),
            Section::Room => json!(self.room()),
        }))
    }

    fn has(&self, s: Section) -> bool {
        self.sections
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(s.key())
    }

    /// Every section, fresh.
    pub async fn snapshot_sections(&self) -> serde_json::Map<String, Value> {
        if self.cache.lock().await.chart.is_null() {
            self.refresh_chart().await;
        }
        if self.cache.lock().await.storage.is_empty() {
            self.refresh_disk().await;
        }
        let mut out = serde_json::Map::new();
        for s in Section::ALL {
            let v = match s {
                // Always whole here, whether or not a result came in since.
                Section::Results => self.results_section().await.map(Some),
                other => self.compute(other).await,
            };
            match v {
                Ok(Some(v)) => {
                    self.sections
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(s.key(), v.clone());
                    out.insert(s.key().to_string(), v);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(section = s.key(), error = %e, "dashboard: section unavailable");
                    out.insert(s.key().to_string(), json!({"error": e.to_string()}));
                }
            }
        }
        out
    }

    // ---- sections ----

    /// The queue in the scheduler's real order (the policy's), and what runs.
    pub async fn queue_section(&self) -> Result<Value, StoreError> {
        let q = &self.state.queue;
        let order = q.projected_jobs();
        let front: HashSet<String> = q.settings().front.into_iter().collect();
        let unfinished = self
            .state
            .store
            .job_summaries(&SummaryQuery {
                states: JobState::UNFINISHED.to_vec(),
                ..Default::default()
            })
            .await?;
        let by_id: HashMap<&str, &comfyume_store::JobSummary> =
            unfinished.iter().map(|j| (j.id.as_str(), j)).collect();
        let waiting: Vec<Value> = order
            .iter()
            .take(MAX_WAITING_SHOWN)
            .enumerate()
            .map(|(i, j)| {
                let attempts = by_id.get(j.id.as_str()).map_or(0, |s| s.attempts);
                json!({
                    "id": j.id,
                    "user": j.user,
                    "position": i,
                    "priority": j.priority,
                    "attempts": attempts,
                    "created_at_ms": j.enqueued_at_ms,
                    "front": front.contains(&j.id),
                })
            })
            .collect();
        let running: Vec<Value> = unfinished
            .iter()
            .filter(|j| matches!(j.state, JobState::Dispatched | JobState::Running))
            .map(|j| {
                json!({
                    "id": j.id,
                    "user": j.user,
                    "state": j.state,
                    "backend": j.backend,
                    "attempts": j.attempts,
                    "created_at_ms": j.created_at_ms,
                    "started_at_ms": j.started_at_ms,
                })
            })
            .collect();
        let s = q.settings();
        Ok(json!({
            "policy": s.policy.as_str(),
            "paused": s.paused,
            "limits": {
                "max_running_per_user": s.max_running_per_user,
                "max_queued_per_user": s.max_queued_per_user,
                "max_queue_depth": s.max_queue_depth,
            },
            "user_priorities": s.user_priorities,
            "waiting_total": order.len(),
            "waiting": waiting,
            "running": running,
        }))
    }

    fn progress_section(&self) -> Value {
        json!(self.state.queue.live_progress())
    }

    async fn results_section(&self) -> Result<Value, StoreError> {
        let jobs = self
            .state
            .store
            .job_summaries(&SummaryQuery {
                states: vec![JobState::Succeeded],
                order: SummaryOrder::FinishedDesc,
                limit: Some(RESULTS),
                ..Default::default()
            })
            .await?;
        Ok(Value::Array(
            jobs.iter()
                .map(|j| {
                    json!({
                        "id": j.id,
                        "user": j.user,
                        "finished_at_ms": j.finished_at_ms,
                        "files": output_files(&j.user, &j.outputs),
                    })
                })
                .filter(|v| v["files"].as_array().is_some_and(|a| !a.is_empty()))
                .collect(),
        ))
    }

    /// Every account: role, sockets open now, jobs by state, GPU time, last activity,
    /// storage used, level.
    pub async fn participants_section(&self) -> Result<Value, StoreError> {
        let users = self.state.store.list_users().await?;
        let stats: HashMap<String, comfyume_store::UserJobStats> = self
            .state
            .store
            .user_job_stats()
            .await?
            .into_iter()
            .map(|s| (s.user.clone(), s))
            .collect();
        let online = self.state.hub.sockets_by_user();
        let levels = self.state.queue.settings().user_priorities;
        let storage = self.cache.lock().await.storage.clone();
        let n = |s: Option<&comfyume_store::UserJobStats>, states: &[JobState]| -> u64 {
            s.map_or(0, |s| {
                states
                    .iter()
                    .map(|st| s.counts.get(st).copied().unwrap_or(0))
                    .sum()
            })
        };
        Ok(Value::Array(
            users
                .iter()
                .map(|u| {
                    let s = stats.get(&u.name);
                    json!({
                        "name": u.name,
                        "admin": u.role == Role::Admin,
                        "disabled": u.disabled,
                        "online": online.get(&u.name).copied().unwrap_or(0),
                        "queued": n(s, &[JobState::Queued]),
                        "running": n(s, &[JobState::Dispatched, JobState::Running]),
                        "done": n(s, &[JobState::Succeeded]),
                        "failed": n(s, &[JobState::Failed, JobState::Interrupted]),
                        "cancelled": n(s, &[JobState::Cancelled]),
                        "gpu_ms": s.map_or(0, |s| s.gpu_ms),
                        "last_activity_ms": s.map(|s| s.last_activity_ms).filter(|t| *t > 0).max(u.last_login_ms),
                        "last_login_ms": u.last_login_ms,
                        "storage_bytes": storage.get(&u.name).copied(),
                        "level": levels.get(&u.name),
                        "ui": format!("/{}/", u.name),
                    })
                })
                .collect(),
        ))
    }

    /// Every backend (and its endpoints), with the day's chart.
    pub fn gpus_section(&self) -> Value {
        let backends = self
            .dispatcher
            .as_ref()
            .map(|d| d.backends())
            .unwrap_or_default();
        json!({
            "label": self.state.settings.backend_label,
            "backends": backends,
            "waiting": self.state.queue.queued_len(),
        })
    }

    async fn gpus_section_async(&self) -> Value {
        let mut v = self.gpus_section();
        v["chart"] = self.cache.lock().await.chart.clone();
        v
    }

    /// Version, uptime, disk use per area, database size, node definitions' age.
    pub async fn system_section(&self) -> Result<Value, StoreError> {
        let mut sys = json!({"disk": self.cache.lock().await.disk.clone()});
        let defs = self
            .state
            .store
            .get_meta(comfyume_gateway::OBJECT_INFO_KEY)
            .await?;
        sys["version"] = json!(env!("CARGO_PKG_VERSION"));
        sys["started_at_ms"] = json!(self.started_ms);
        sys["backend"] = json!(self.state.settings.backend_label);
        sys["sockets"] = json!(self.state.hub.open_sockets());
        sys["dashboards"] = json!(self.viewers());
        sys["node_definitions"] = json!({
            "count": self.state.object_info().info.len(),
            "updated_at_ms": defs.as_ref().map(|d| d.updated_at_ms),
            "source": defs.as_ref().map(|d| d.source.clone()),
        });
        Ok(sys)
    }

    /// Disk use (per area and per participant), off the runtime's threads.
    async fn refresh_disk(&self) {
        let dir = self.state.settings.data_dir.clone();
        let frontend = self.state.settings.frontend_dir.clone();
        match tokio::task::spawn_blocking(move || system::scan(&dir, &frontend)).await {
            Ok(scan) => {
                let mut c = self.cache.lock().await;
                c.disk = json!(scan.areas);
                c.storage = scan.per_user;
            }
            Err(e) => tracing::warn!(error = %e, "dashboard: the disk scan failed"),
        }
    }

    /// Queue depth and jobs finished per minute over the last hours.
    async fn refresh_chart(&self) {
        let now = now_ms();
        let since = now - CHART_SPAN_MS;
        let jobs = match self
            .state
            .store
            .job_summaries(&SummaryQuery {
                created_since_ms: Some(since),
                ..Default::default()
            })
            .await
        {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "dashboard: could not read the day's jobs for the chart");
                return;
            }
        };
        let times: Vec<JobTimes> = jobs
            .iter()
            .map(|j| JobTimes {
                created: j.created_at_ms,
                started: j.started_at_ms,
                finished: j.finished_at_ms,
            })
            .collect();
        let start = times
            .iter()
            .map(|t| t.created)
            .min()
            .unwrap_or(now)
            .max(since);
        self.cache.lock().await.chart = json!(timeline(&times, start, now, 60_000));
    }
}

/// How far back the chart reaches.
const CHART_SPAN_MS: i64 = 12 * 3600 * 1000;

/// When a job entered the queue, started, ended (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobTimes {
    pub created: i64,
    pub started: Option<i64>,
    pub finished: Option<i64>,
}

/// Per-bucket queue depth and finished jobs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Timeline {
    pub start_ms: i64,
    pub bucket_ms: i64,
    /// Jobs waiting (created, not yet started or ended) at the end of each bucket.
    pub queue_depth: Vec<u32>,
    /// Jobs that ran and ended within each bucket.
    pub finished: Vec<u32>,
}

/// Buckets of `bucket_ms` from `start` to `end` (the last one partial). Pure; O(jobs +
/// buckets).
pub fn timeline(jobs: &[JobTimes], start: i64, end: i64, bucket_ms: i64) -> Timeline {
    let bucket_ms = bucket_ms.max(1);
    let n = (((end - start).max(0) / bucket_ms) + 1).min(100_000) as usize;
    // The bucket of a time at or after `start`; `None` past the end.
    let index = |t: i64| -> Option<usize> {
        let i = ((t - start).max(0) / bucket_ms) as usize;
        (i < n).then_some(i)
    };
    // +1 where a job starts waiting, -1 in the bucket after it stops (depth is read at
    // each bucket's end).
    let mut delta = vec![0i64; n + 1];
    let mut finished = vec![0u32; n];
    for j in jobs {
        let stop = j.started.or(j.finished);
        let from = if j.created < start {
            Some(0)
        } else {
            index(j.created)
        };
        let Some(from) = from else { continue };
        match stop {
            Some(s) if s < start => {}
            Some(s) => {
                // Stopped within the bucket it started waiting in: never seen at a bucket end.
                let to = index(s).unwrap_or(n);
                if to > from {
                    delta[from] += 1;
                    delta[to] -= 1;
                }
            }
            None => {
                delta[from] += 1;
            }
        }
        if let (Some(_), Some(f)) = (j.started, j.finished)
            && let Some(i) = index(f)
        {
            finished[i] += 1;
        }
    }
    let mut depth = Vec::with_capacity(n);
    let mut acc = 0i64;
    for d in delta.iter().take(n) {
        acc += d;
        depth.push(acc.max(0) as u32);
    }
    Timeline {
        start_ms: start,
        bucket_ms,
        queue_depth: depth,
        finished,
    }
}

/// A job's output files as the dashboard shows them: name, kind (image, video, audio), the
/// URL of the file in the participant's workspace, and a thumbnail URL for images.
pub fn output_files(user: &str, outputs: &Value) -> Vec<Value> {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
    let mut out = Vec::new();
    let Some(nodes) = outputs.as_object() else {
        return out;
    };
    for ui in nodes.values() {
        let Some(ui) = ui.as_object() else { continue };
        for (key, list) in ui {
            if !matches!(
                key.as_str(),
                "images" | "gifs" | "videos" | "video" | "audio"
            ) {
                continue;
            }
            let Some(list) = list.as_array() else {
                continue;
            };
            for f in list {
                let Some(name) = f["filename"].as_str() else {
                    continue;
                };
                let sub = f["subfolder"].as_str().unwrap_or("");
                let kind_dir = f["type"].as_str().unwrap_or("output");
                if kind_dir != "output" {
                    // Previews in temp/ are not results.
                    continue;
                }
                let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
                let kind = match ext.as_str() {
                    "mp4" | "webm" | "mov" | "mkv" | "m4v" => "video",
                    "wav" | "mp3" | "flac" | "ogg" | "opus" | "m4a" => "audio",
                    _ => "image",
                };
                let q = format!("filename={}&subfolder={}&type=output", enc(name), enc(sub));
                out.push(json!({
                    "filename": name,
                    "subfolder": sub,
                    "kind": kind,
                    "url": format!("/{}/api/view?{q}", enc(user)),
                    "thumb": (kind == "image").then(|| format!("/admin/api/thumb?user={}&{q}", enc(user))),
                }));
            }
        }
    }
    out
}

// ---- the page's stream ----

/// `GET /admin/api/dashboard`: every section, as the page's first message has them.
pub async fn snapshot(Extension(admin): Extension<Admin>, _: Instructor) -> Response {
    let d = &admin.dashboard;
    let sections = d.snapshot_sections().await;
    Json(json!({"now_ms": now_ms(), "sections": sections})).into_response()
}

/// Counts an open dashboard while it lives.
struct Viewer(Arc<Dashboard>);

impl Viewer {
    fn new(d: Arc<Dashboard>) -> Self {
        d.viewers.fetch_add(1, Ordering::SeqCst);
        Viewer(d)
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `GET /admin/ws`: the dashboard's live stream.
pub async fn ws_handler(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    who: Instructor,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let csrf = crate::csrf::token_of(&headers);
    let session =
        comfyume_gateway::auth::cookie_value(&headers, comfyume_gateway::auth::SESSION_COOKIE)
            .map(str::to_string);
    upgrade
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| serve(state, admin.dashboard, who.0, csrf, session, socket))
}

/// How often the stream pings (and re-checks that the instructor may still look).
const PING_EVERY: Duration = Duration::from_secs(20);

async fn serve(
    state: AppState,
    d: Arc<Dashboard>,
    me: String,
    csrf: Option<String>,
    session: Option<String>,
    socket: WebSocket,
) {
    let _viewer = Viewer::new(d.clone());
    let (mut sink, mut stream) = socket.split();
    let idle = state.settings.idle_timeout.max(PING_EVERY * 2);
    let mut rx = d.updates.subscribe();
    // Subscribed first, so nothing that changes while the snapshot is made is missed.
    let hello = |sections| {
        json!({"type": "snapshot", "now_ms": now_ms(), "me": me, "csrf": csrf, "sections": sections})
            .to_string()
    };
    let first = hello(d.snapshot_sections().await);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut heard = tokio::time::Instant::now();
    let mut close: Option<(u16, &'static str)> = None;
    // Every write waits at most the idle timeout: a page that stops reading ends the stream.
    // (The label is passed in: labels in macros are hygienic.)
    macro_rules! send {
        ($label:lifetime, $msg:expr) => {
            match tokio::time::timeout(idle, sink.send($msg)).await {
                Ok(Ok(())) => {}
                _ => break $label,
            }
        };
    }
    'outer: {
        send!('outer, Message::Text(first.into()));
        loop {
            tokio::select! {
                biased;
                incoming = stream.next() => {
                    heard = tokio::time::Instant::now();
                    match incoming {
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 'outer,
                        Some(Ok(_)) => {}
                    }
                }
                update = rx.recv() => match update {
                    Ok(text) => send!('outer, Message::Text(text.as_ref().into())),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: a whole picture instead of the missed pieces.
                        let again = hello(d.snapshot_sections().await);
                        send!('outer, Message::Text(again.into()));
                    }
                    Err(broadcast::error::RecvError::Closed) => break 'outer,
                },
                _ = ping.tick() => {
                    if heard.elapsed() >= idle {
                        close = Some((1001, "idle"));
                        break 'outer;
                    }
                    if !still_instructor(&state, &me, session.as_deref()).await {
                        close = Some((1008, "signed out"));
                        break 'outer;
                    }
                    send!('outer, Message::Ping(Default::default()));
                }
            }
        }
    }
    if let Some((code, reason)) = close {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(frame)).await;
    }
}

/// The stream ends with the session (signed out, disabled, no longer an instructor).
async fn still_instructor(state: &AppState, me: &str, session: Option<&str>) -> bool {
    let user = match session {
        Some(token) => state.store.session_user(token).await,
        None => state.store.get_user(me).await,
    };
    match user {
        Ok(Some(u)) => u.name == me && u.role == Role::Admin && !u.disabled,
        Ok(None) => false,
        // The store is unavailable: keep the stream; the next ping asks again.
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(created: i64, started: Option<i64>, finished: Option<i64>) -> JobTimes {
        JobTimes {
            created,
            started,
            finished,
        }
    }

    #[test]
    fn timeline_counts_waiting_jobs_at_each_minute_and_finished_ones_within_it() {
        let m = 60_000;
        let jobs = [
            // Waits from 0:10 to 2:30, runs until 3:00.
            t(10_000, Some(2 * m + 30_000), Some(3 * m)),
            // Waits from 1:05, still waiting.
            t(m + 5_000, None, None),
            // Came at 1:10, cancelled at 1:20 before it started: never waiting at a minute's end.
            t(m + 10_000, None, Some(m + 20_000)),
            // From before the window, started inside it.
            t(-5 * m, Some(30_000), Some(50_000)),
        ];
        let tl = timeline(&jobs, 0, 4 * m - 1, m);
        assert_eq!(tl.queue_depth.len(), 4);
        // End of minute 0: job 1 waits (job 4 started at 0:30).
        // Minute 1: jobs 1 and 2. Minute 2: job 1 started at 2:30 -> only job 2. Minute 3: job 2.
        assert_eq!(tl.queue_depth, [1, 2, 1, 1]);
        // Job 4 finished in minute 0, job 1 at 3:00 (minute 3); the cancelled one never ran.
        assert_eq!(tl.finished, [1, 0, 0, 1]);
        assert_eq!(timeline(&[], 0, 0, m).queue_depth, [0]);
    }

    #[test]
    fn output_files_are_results_with_urls_and_videos_have_no_thumbnail() {
        let outputs = json!({
            "9": {"images": [
                {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"},
                {"filename": "preview.png", "subfolder": "", "type": "temp"}
            ]},
            "12": {"images": [{"filename": "clip <1>.mp4", "subfolder": "video", "type": "output"}],
                   "animated": [true]}
        });
        let files = output_files("user001", &outputs);
        assert_eq!(files.len(), 2, "{files:?}");
        let img = files.iter().find(|f| f["kind"] == "image").unwrap();
        assert_eq!(
            img["url"],
            "/user001/api/view?filename=ComfyUI%5F00001%5F%2Epng&subfolder=&type=output"
        );
        assert!(
            img["thumb"]
                .as_str()
                .unwrap()
                .starts_with("/admin/api/thumb?user=user001&")
        );
        let vid = files.iter().find(|f| f["kind"] == "video").unwrap();
        assert!(vid["thumb"].is_null());
        assert!(
            vid["url"]
                .as_str()
                .unwrap()
                .contains("clip%20%3C1%3E%2Emp4")
        );
        assert!(output_files("u", &json!(null)).is_empty());
    }
}
