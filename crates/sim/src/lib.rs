//! `comfyume-sim`: a ComfyUI v0.11.0 server double for a machine without a GPU.
//!
//! It speaks ComfyUI's HTTP and WebSocket protocol with the quirks of the captures in
//! `tests/fixtures/comfyui/` (status codes, empty bodies, message order, routing of execution
//! messages, binary preview frames), runs one prompt at a time, and writes real files:
//! real pixels for image nodes and placeholders stamped "SIMULATED" where a model would
//! have generated something. Faults can be switched on at start or at run time.
//!
//! ```no_run
//! # async fn demo() {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let sim = comfyume_sim::spawn(comfyume_sim::SimConfig::default(), listener).await;
//! println!("ComfyUI double at {}", sim.url());
//! sim.set_fault(comfyume_sim::Fault::SlowView { ms: 200 });
//! sim.shutdown().await;
//! # }
//! ```

mod catalog;
mod config;
mod exec;
mod font;
mod frontend;
mod graph;
mod h264;
mod http;
mod imaging;
mod mp4;
mod nodes;
mod server;
mod state;
mod ws;

use std::path::PathBuf;

pub use config::{
    ActiveFaults, DEFAULT_MAX_UPLOAD, DEFAULT_STEP_MS, Fault, SimConfig, normalize_base_path,
    random_base_path,
};
pub use imaging::title_card_png;
pub use server::{SimHandle, spawn, try_spawn};
pub use state::{CurrentJob, SimState};

/// Why the simulator cannot start (or a configuration value is wrong).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid value {value:?} for {key}")]
    Config { key: &'static str, value: String },
    #[error(
        "unknown fault {0:?} (expected clear, refuse-connections[:MS], prompt-error, drop-websocket, hang[:MS], forget-history, forget-next-history, slow-view:MS, slow-ws-register:MS or die-mid-job)"
    )]
    FaultSpec(String),
    #[error("cannot use object_info file {path}: {reason}")]
    ObjectInfo { path: PathBuf, reason: String },
    #[error("cannot serve the frontend from {path}: {reason}")]
    FrontEndRoot { path: PathBuf, reason: String },
    #[error("cannot create data directory {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
