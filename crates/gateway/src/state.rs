//! Settings the gateway runs with, and the state its handlers share.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use comfyume_dispatch::Queue;
use comfyume_store::Store;
use comfyume_wire::{ObjectInfo, ViewTemplate};
use serde_json::Value;

/// The node definitions, parsed once, with the per-participant view pre-rendered.
pub struct NodeDefs {
    pub info: ObjectInfo,
    pub view: ViewTemplate,
    /// Classes with an input that names one of the participant's files (LoadImage, ...).
    pub file_classes: std::collections::HashSet<String>,
    /// The model files the backends have, by ComfyUI model folder (the loaders' choices).
    pub models: std::collections::BTreeMap<String, Vec<String>>,
}

impl NodeDefs {
    /// Parses a ComfyUI `/object_info` document (anything but an object is empty).
    pub fn new(v: Value) -> Self {
        let info = ObjectInfo::from_value(v).unwrap_or_else(|e| {
            tracing::error!(error = %e, "node definitions are not an object; serving none");
            ObjectInfo::from_map(Default::default())
        });
        let view = ViewTemplate::new(&info);
        let file_classes = view.patched_classes().map(str::to_owned).collect();
        let models = comfyume_wire::models::model_files(&info);
        NodeDefs {
            info,
            view,
            file_classes,
            models,
        }
    }
}

use crate::basic_cache::BasicCache;
use crate::hub::Hub;
use crate::proxy::Cidr;
use crate::throttle::Throttle;

/// Resolved settings (the binary merges flags, environment, `.env` and TOML).
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// The static ComfyUI frontend (folder holding `index.html`).
    pub frontend_dir: PathBuf,
    /// The comfyui-workflow-templates static folder, when installed.
    pub templates_dir: Option<PathBuf>,
    pub max_upload_bytes: u64,
    pub session_ttl: Duration,
    /// Mark cookies `Secure` (behind HTTPS).
    pub secure_cookies: bool,
    /// Failed sign-ins from one client address for one account before delays start (ten
    /// times as many over all accounts); failures are forgotten `login_window` after the last.
    pub login_max_failures: u32,
    pub login_window: Duration,
    /// The first delay past the free failures; each further failure doubles it (up to 60 s).
    pub login_delay: Duration,
    /// Shown on the console and in the participant banner, e.g. "simulator".
    pub backend_label: String,
    /// `DOMAIN`: the public host (or origin) the pages are served at, accepted as `Origin`.
    pub domain: Option<String>,
    /// `TRUSTED_PROXIES`: peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<Cidr>,
    /// `HEADER_READ_TIMEOUT_SECS`: a request's headers (and, on a kept-alive connection, the
    /// next request) must arrive within this.
    pub header_read_timeout: Duration,
    /// `IDLE_TIMEOUT_SECS`: a connection on which nothing moves for this long is closed; a
    /// WebSocket whose client answers no ping for this long too.
    pub idle_timeout: Duration,
    /// `MAX_SOCKETS_PER_USER`: WebSockets open at once on one participant's workspace.
    pub max_sockets_per_user: usize,
    /// `MAX_CONNECTIONS`: open connections (WebSockets included) of the whole server.
    pub max_connections: usize,
    /// `USER_QUOTA_BYTES`: a participant's inputs and outputs together (`None`: no quota).
    pub user_quota_bytes: Option<u64>,
}

/// The connection defaults (`serve` and tests share them).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_MAX_SOCKETS_PER_USER: usize = 20;
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;

impl Settings {
    pub fn with_data_dir(data_dir: impl Into<PathBuf>, frontend_dir: impl Into<PathBuf>) -> Self {
        Settings {
            data_dir: data_dir.into(),
            frontend_dir: frontend_dir.into(),
            templates_dir: None,
            max_upload_bytes: 100 * 1024 * 1024,
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            secure_cookies: false,
            login_max_failures: 10,
            login_window: Duration::from_secs(300),
            login_delay: Duration::from_secs(1),
            backend_label: "none".into(),
            domain: None,
            trusted_proxies: Vec::new(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_sockets_per_user: DEFAULT_MAX_SOCKETS_PER_USER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            user_quota_bytes: None,
        }
    }
}

/// The per-participant folders under the data directory.
#[derive(Debug, Clone)]
pub struct UserDirs {
    pub user_data: PathBuf,
    pub inputs: PathBuf,
    pub outputs: PathBuf,
    pub temp: PathBuf,
}

impl UserDirs {
    pub fn new(data_dir: &Path, user: &str) -> Self {
        UserDirs {
            user_data: data_dir.join("user_data").join(user),
            inputs: data_dir.join("inputs").join(user),
            outputs: data_dir.join("outputs").join(user),
            temp: data_dir.join("temp").join(user),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    /// Slows down repeated failed sign-ins.
    pub throttle: Arc<Throttle>,
    /// Verified Basic Auth credentials.
    pub basic_cache: Arc<BasicCache>,
    /// The node definitions snapshot (ComfyUI's `/object_info` document).
    pub object_info: Arc<RwLock<Arc<NodeDefs>>>,
    /// The workshop queue (shared with dispatch).
    pub queue: Arc<Queue>,
    /// `/api/extensions`: the frontend's core scripts plus ours.
    pub extensions: Arc<Vec<String>>,
    /// First path segments that are never a participant prefix.
    pub reserved: Arc<HashSet<String>>,
    /// Participants whose folders this process has already prepared.
    pub known_users: Arc<Mutex<HashSet<String>>>,
    /// Serialises writes to one participant's settings file.
    pub settings_locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl AppState {
    pub fn user_dirs(&self, user: &str) -> UserDirs {
        UserDirs::new(&self.settings.data_dir, user)
    }

    pub fn auth_known(&self, user: &str) -> bool {
        self.known_users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(user)
    }

    pub fn mark_known(&self, user: &str) {
        self.known_users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.to_string());
    }

    pub fn settings_lock(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.settings_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user.to_string())
            .or_default()
            .clone()
    }

    /// ComfyUI's `queue_remaining` for one participant: their pending plus running jobs.
    pub async fn queue_remaining(&self, user: &str) -> u64 {
        self.store
            .count_jobs(Some(user), &comfyume_store::JobState::UNFINISHED)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not count jobs");
                0
            })
    }

    pub fn object_info(&self) -> Arc<NodeDefs> {
        self.object_info
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_object_info(&self, v: Value) {
        let defs = Arc::new(NodeDefs::new(v));
        let mut g = self.object_info.write().unwrap_or_else(|p| p.into_inner());
        *g = defs;
    }
}
