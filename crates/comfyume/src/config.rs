//! Configuration: command-line flags > environment > `.env` > optional TOML
//! file > defaults. The environment already includes `.env` (loaded without
//! overriding real variables) by the time clap reads it, so clap's `env`
//! fallbacks give flags > env > .env; TOML and defaults fill what is left.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use comfyume_dispatch::{DispatchConfig, QueueConfig};
use comfyume_scheduler::Policy;
use serde::Deserialize;

/// The example configuration, printed by `comfyume default-config`.
pub const EXAMPLE_TOML: &str = include_str!("../comfyume.example.toml");

/// Options shared by every subcommand that touches the data directory.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Data directory (database, participants' files, frontend).
    #[arg(long, env = "COMFYUME_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Optional TOML configuration file.
    #[arg(long, env = "COMFYUME_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:8188.
    #[arg(long, env = "COMFYUME_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address for /metrics (kept off the public listener).
    #[arg(long, env = "COMFYUME_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// The static ComfyUI frontend (default: DATA_DIR/frontend/1.37.11).
    #[arg(long, env = "COMFYUME_FRONTEND_DIR")]
    pub frontend_dir: Option<PathBuf>,
    /// The comfyui-workflow-templates static folder, if installed.
    #[arg(long, env = "COMFYUME_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// Largest upload in MB (ComfyUI's --max-upload-size).
    #[arg(long, env = "MAX_UPLOAD_SIZE")]
    pub max_upload_size: Option<u64>,
    /// Public domain name; cookies are marked Secure when set.
    #[arg(long, env = "DOMAIN")]
    pub domain: Option<String>,
    /// Log format: json (for Loki) or pretty.
    #[arg(long, env = "LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Scheduling policy: fifo, round_robin or priority.
    #[arg(long, env = "QUEUE_MODE")]
    pub queue_mode: Option<Policy>,
    /// Waiting jobs of the whole workshop.
    #[arg(long, env = "MAX_QUEUE_DEPTH")]
    pub max_queue_depth: Option<u32>,
    /// Waiting jobs of one participant.
    #[arg(long, env = "MAX_QUEUED_PER_USER")]
    pub max_queued_per_user: Option<u32>,
    /// Jobs of one participant on GPUs at once.
    #[arg(long, env = "MAX_RUNNING_PER_USER")]
    pub max_running_per_user: Option<u32>,
    /// Priority aging: a waiting job gains one level per this many seconds.
    #[arg(long, env = "PRIORITY_AGING_SECS")]
    pub priority_aging_secs: Option<u64>,
    /// Where jobs run: local (ComfyUI servers in COMFYUI_URLS), simulator, serverless,
    /// or none (jobs stay queued).
    #[arg(long, env = "INFERENCE_MODE")]
    pub inference_mode: Option<InferenceMode>,
    /// ComfyUI servers for INFERENCE_MODE=local, comma-separated.
    #[arg(long, env = "COMFYUI_URLS", value_delimiter = ',')]
    pub comfyui_urls: Option<Vec<String>>,
    /// Jobs a backend holds at once (one running plus those handed over in advance).
    #[arg(long, env = "BACKEND_SLOTS")]
    pub backend_slots: Option<usize>,
    /// Longest a job may run on a backend, in seconds, from its start there.
    #[arg(long, env = "JOB_TIMEOUT")]
    pub job_timeout: Option<u64>,
    /// Longest a job handed to a backend may wait there before it starts, in
    /// seconds (a hung or unreachable GPU); then it is retried elsewhere.
    #[arg(long, env = "JOB_START_TIMEOUT")]
    pub job_start_timeout: Option<u64>,
    /// Attempts per job when GPU servers fail.
    #[arg(long, env = "MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
}

/// `INFERENCE_MODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InferenceMode {
    /// ComfyUI servers reached directly (COMFYUI_URLS).
    Local,
    /// The built-in ComfyUI simulator, in-process (no GPU; outputs are placeholders).
    Simulator,
    /// Serverless GPU containers running comfyume-worker.
    Serverless,
    /// No backend at all: jobs are accepted, stored and stay queued (benchmarks of
    /// the submission path; taking submissions before the GPUs are up). Node
    /// definitions come from the stored snapshot (`comfyume object-info import`).
    #[serde(rename = "none")]
    #[value(name = "none")]
    NoBackend,
}

/// The optional TOML file: the same settings, snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub frontend_dir: Option<PathBuf>,
    pub templates_dir: Option<PathBuf>,
    pub max_upload_size: Option<u64>,
    pub domain: Option<String>,
    pub log_format: Option<String>,
    pub session_ttl_hours: Option<u64>,
    pub queue_mode: Option<Policy>,
    pub max_queue_depth: Option<u32>,
    pub max_queued_per_user: Option<u32>,
    pub max_running_per_user: Option<u32>,
    pub priority_aging_secs: Option<u64>,
    pub inference_mode: Option<InferenceMode>,
    pub comfyui_urls: Option<Vec<String>>,
    pub backend_slots: Option<usize>,
    pub job_timeout: Option<u64>,
    pub job_start_timeout: Option<u64>,
    pub max_attempts: Option<u32>,
}

pub fn load_file(path: Option<&Path>) -> Result<FileConfig> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing configuration file {}", path.display()))
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub frontend_dir: PathBuf,
    pub templates_dir: Option<PathBuf>,
    pub max_upload_bytes: u64,
    pub domain: Option<String>,
    pub log_format: String,
    pub session_ttl_hours: u64,
    pub queue: QueueConfig,
    pub inference_mode: InferenceMode,
    pub comfyui_urls: Vec<String>,
    pub backend_slots: usize,
    pub dispatch: DispatchConfig,
    /// INFERENCE_MODE=serverless: endpoints and the rest (environment only).
    pub serverless: Option<comfyume_serverless::ServerlessConfig>,
}

pub const DEFAULT_DATA_DIR: &str = "data";
pub const FRONTEND_VERSION: &str = "1.37.11";

pub fn data_dir(common: &CommonArgs, file: &FileConfig) -> PathBuf {
    common
        .data_dir
        .clone()
        .or_else(|| file.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

/// The static frontend: flag/env, then the file, then DATA_DIR/frontend/VERSION.
pub fn frontend_dir(flag: Option<&PathBuf>, file: &FileConfig, data_dir: &Path) -> PathBuf {
    flag.cloned()
        .or(file.frontend_dir.clone())
        .unwrap_or_else(|| data_dir.join("frontend").join(FRONTEND_VERSION))
}

pub fn resolve_serve(common: &CommonArgs, args: &ServeArgs) -> Result<ServeConfig> {
    let file = load_file(common.config.as_deref())?;
    let data_dir = data_dir(common, &file);
    let frontend_dir = frontend_dir(args.frontend_dir.as_ref(), &file, &data_dir);
    let comfyui_urls: Vec<String> = args
        .comfyui_urls
        .clone()
        .or(file.comfyui_urls.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    // Without a configured GPU backend, the demo runs on the simulator.
    let inference_mode =
        args.inference_mode
            .or(file.inference_mode)
            .unwrap_or(if comfyui_urls.is_empty() {
                InferenceMode::Simulator
            } else {
                InferenceMode::Local
            });
    if inference_mode == InferenceMode::Local && comfyui_urls.is_empty() {
        anyhow::bail!("INFERENCE_MODE=local needs COMFYUI_URLS (e.g. http://127.0.0.1:8188)");
    }
    let serverless = if inference_mode == InferenceMode::Serverless {
        // Endpoint variables are named after the endpoint, so they are read from the
        // environment (which includes .env) rather than through flags.
        let vars: std::collections::BTreeMap<String, String> = std::env::vars().collect();
        Some(
            comfyume_serverless::config::from_vars(&vars, &|p| std::fs::read_to_string(p))
                .context("INFERENCE_MODE=serverless settings")?,
        )
    } else {
        None
    };
    Ok(ServeConfig {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or(([127, 0, 0, 1], 8188).into()),
        metrics_listen: args
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or(([127, 0, 0, 1], 9188).into()),
        templates_dir: args.templates_dir.clone().or(file.templates_dir.clone()),
        max_upload_bytes: args.max_upload_size.or(file.max_upload_size).unwrap_or(100)
            * 1024
            * 1024,
        domain: args
            .domain
            .clone()
            .or(file.domain.clone())
            .filter(|d| !d.is_empty()),
        log_format: args
            .log_format
            .clone()
            .or(file.log_format.clone())
            .unwrap_or_else(|| "pretty".into()),
        session_ttl_hours: file.session_ttl_hours.unwrap_or(24 * 7),
        queue: QueueConfig {
            policy: args
                .queue_mode
                .or(file.queue_mode)
                .unwrap_or(Policy::RoundRobin),
            max_running_per_user: args
                .max_running_per_user
                .or(file.max_running_per_user)
                .unwrap_or(1),
            max_queued_per_user: args
                .max_queued_per_user
                .or(file.max_queued_per_user)
                .unwrap_or(20),
            max_queue_depth: args.max_queue_depth.or(file.max_queue_depth).unwrap_or(100),
            aging_ms: args
                .priority_aging_secs
                .or(file.priority_aging_secs)
                .unwrap_or(60)
                * 1000,
        },
        inference_mode,
        comfyui_urls,
        backend_slots: args
            .backend_slots
            .or(file.backend_slots)
            .unwrap_or(2)
            .max(1),
        dispatch: DispatchConfig {
            max_attempts: args.max_attempts.or(file.max_attempts).unwrap_or(3).max(1),
            job_timeout: std::time::Duration::from_secs(
                args.job_timeout.or(file.job_timeout).unwrap_or(600).max(1),
            ),
            start_timeout: std::time::Duration::from_secs(
                args.job_start_timeout
                    .or(file.job_start_timeout)
                    .unwrap_or(600)
                    .max(1),
            ),
            ..Default::default()
        },
        serverless,
        frontend_dir,
        data_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_flags_win() {
        let parsed: FileConfig = toml::from_str(EXAMPLE_TOML).unwrap();
        assert!(parsed.listen.is_some());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:7000\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        let common = CommonArgs {
            data_dir: None,
            config: Some(f.clone()),
        };
        let from_file = resolve_serve(&common, &ServeArgs::default()).unwrap();
        assert_eq!(from_file.listen.port(), 7000);
        assert_eq!(from_file.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(
            from_file.frontend_dir,
            PathBuf::from("/tmp/x/frontend/1.37.11")
        );
        let flags = ServeArgs {
            listen: Some("127.0.0.1:7001".parse().unwrap()),
            ..Default::default()
        };
        let common = CommonArgs {
            data_dir: Some("/tmp/y".into()),
            config: Some(f),
        };
        let r = resolve_serve(&common, &flags).unwrap();
        assert_eq!(r.listen.port(), 7001);
        assert_eq!(r.data_dir, PathBuf::from("/tmp/y"));
    }

    #[test]
    fn inference_mode_none_means_no_backend() {
        use clap::ValueEnum;
        let parsed: FileConfig = toml::from_str("inference_mode = \"none\"").unwrap();
        assert_eq!(parsed.inference_mode, Some(InferenceMode::NoBackend));
        assert_eq!(
            InferenceMode::from_str("none", false).unwrap(),
            InferenceMode::NoBackend
        );
    }

    /// `.env.example` must list every variable the server reads.
    #[test]
    fn env_example_lists_every_variable() {
        use clap::Args;
        let example = include_str!("../../../.env.example");
        let listed: Vec<&str> = example
            .lines()
            .map(|l| l.trim_start_matches("# ").trim())
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        let cmd = ServeArgs::augment_args(CommonArgs::augment_args(clap::Command::new("t")));
        let mut missing = Vec::new();
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy().into_owned();
                if !listed.contains(&env.as_str()) {
                    missing.push(env);
                }
            }
        }
        for sim in [
            "SIMULATOR_STEP_MS",
            "SIMULATOR_OBJECT_INFO",
            "SIMULATOR_FAULTS",
            "SIMULATOR_DATA_DIR",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(comfyume_serverless::config::documented_vars())
        {
            if !listed.contains(&sim.as_str()) {
                missing.push(sim);
            }
        }
        assert!(missing.is_empty(), ".env.example lacks {missing:?}");
    }

    #[test]
    fn unknown_toml_keys_are_an_error() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
    }
}
