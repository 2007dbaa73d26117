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
    /// Record metrics: on, or off (no recorder, no metrics listener; for measuring what
    /// the instrumentation costs).
    #[arg(long, env = "COMFYUME_METRICS")]
    pub metrics: Option<Switch>,
    /// The static ComfyUI frontend (default: DATA_DIR/frontend/1.37.11).
    #[arg(long, env = "COMFYUME_FRONTEND_DIR")]
    pub frontend_dir: Option<PathBuf>,
    /// The comfyui-workflow-templates static folder, if installed.
    #[arg(long, env = "COMFYUME_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// Largest upload in MB (ComfyUI's --max-upload-size).
    #[arg(long, env = "MAX_UPLOAD_SIZE")]
    pub max_upload_size: Option<u64>,
    /// A participant's inputs + outputs, in bytes (0: no quota).
    #[arg(long, env = "USER_QUOTA_BYTES")]
    pub user_quota_bytes: Option<u64>,
    /// Largest JSON request body in MB (settings, saved workflows, a prompt).
    #[arg(long, env = "MAX_JSON_BODY_MB")]
    pub max_json_body_mb: Option<u64>,
    /// Most nodes in one prompt.
    #[arg(long, env = "MAX_PROMPT_NODES")]
    pub max_prompt_nodes: Option<usize>,
    /// Largest extra_data (the UI workflow) kept with a job, in MB.
    #[arg(long, env = "MAX_EXTRA_DATA_MB")]
    pub max_extra_data_mb: Option<u64>,
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
    /// Reverse proxies (CIDRs, comma-separated) whose X-Forwarded-For / Forwarded /
    /// X-Forwarded-Host / X-Forwarded-Proto headers are believed.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Seconds a client has to send a request's headers (and the next request on a
    /// kept-alive connection).
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds without a byte moving before a connection is closed (a WebSocket: without
    /// an answer to the server's pings).
    #[arg(long, env = "IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// WebSockets open at once on one participant's workspace.
    #[arg(long, env = "MAX_SOCKETS_PER_USER")]
    pub max_sockets_per_user: Option<u32>,
    /// Open connections of the whole server (WebSockets included).
    #[arg(long, env = "MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
}

/// A setting that is on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
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
    pub metrics: Option<Switch>,
    pub frontend_dir: Option<PathBuf>,
    pub templates_dir: Option<PathBuf>,
    pub max_upload_size: Option<u64>,
    pub user_quota_bytes: Option<u64>,
    pub max_json_body_mb: Option<u64>,
    pub max_prompt_nodes: Option<usize>,
    pub max_extra_data_mb: Option<u64>,
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
    pub trusted_proxies: Option<Vec<String>>,
    pub header_read_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub max_sockets_per_user: Option<u32>,
    pub max_connections: Option<u32>,
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
    /// `COMFYUME_METRICS`: whether metrics are recorded and served.
    pub metrics: bool,
    pub frontend_dir: PathBuf,
    pub templates_dir: Option<PathBuf>,
    pub max_upload_bytes: u64,
    /// `USER_QUOTA_BYTES` (`None`: no quota).
    pub user_quota_bytes: Option<u64>,
    /// JSON body, prompt node and extra_data caps.
    pub limits: comfyume_gateway::limits::Limits,
    pub domain: Option<String>,
    pub log_format: String,
    pub session_ttl_hours: u64,
    pub queue: QueueConfig,
    pub inference_mode: InferenceMode,
    pub comfyui_urls: Vec<String>,
    pub backend_slots: usize,
    pub dispatch: DispatchConfig,
    pub net: NetConfig,
    /// INFERENCE_MODE=serverless: endpoints and the rest (environment only).
    pub serverless: Option<comfyume_serverless::ServerlessConfig>,
}

/// Who is believed behind a proxy, and how long and how many connections may stay open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub trusted_proxies: Vec<comfyume_gateway::proxy::Cidr>,
    pub header_read_timeout: std::time::Duration,
    pub idle_timeout: std::time::Duration,
    pub max_sockets_per_user: usize,
    pub max_connections: usize,
}

fn resolve_net(args: &ServeArgs, file: &FileConfig) -> Result<NetConfig> {
    use comfyume_gateway::state as d;
    let proxies = args
        .trusted_proxies
        .clone()
        .or(file.trusted_proxies.clone())
        .unwrap_or_default();
    let trusted_proxies =
        comfyume_gateway::proxy::parse_list(&proxies.join(",")).context("TRUSTED_PROXIES")?;
    let secs = |v: Option<u64>, default: std::time::Duration| {
        v.map(|s| std::time::Duration::from_secs(s.max(1)))
            .unwrap_or(default)
    };
    Ok(NetConfig {
        trusted_proxies,
        header_read_timeout: secs(
            args.header_read_timeout_secs
                .or(file.header_read_timeout_secs),
            d::DEFAULT_HEADER_READ_TIMEOUT,
        ),
        idle_timeout: secs(
            args.idle_timeout_secs.or(file.idle_timeout_secs),
            d::DEFAULT_IDLE_TIMEOUT,
        ),
        max_sockets_per_user: args
            .max_sockets_per_user
            .or(file.max_sockets_per_user)
            .map(|n| n.max(1) as usize)
            .unwrap_or(d::DEFAULT_MAX_SOCKETS_PER_USER),
        max_connections: args
            .max_connections
            .or(file.max_connections)
            .map(|n| n.max(1) as usize)
            .unwrap_or(d::DEFAULT_MAX_CONNECTIONS),
    })
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
    let net = resolve_net(args, &file)?;
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
        net,
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or(([127, 0, 0, 1], 8188).into()),
        metrics_listen: args
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or(([127, 0, 0, 1], 9188).into()),
        metrics: args.metrics.or(file.metrics).unwrap_or(Switch::On) == Switch::On,
        templates_dir: args.templates_dir.clone().or(file.templates_dir.clone()),
        max_upload_bytes: args.max_upload_size.or(file.max_upload_size).unwrap_or(100)
            * 1024
            * 1024,
        user_quota_bytes: args
            .user_quota_bytes
            .or(file.user_quota_bytes)
            .filter(|q| *q > 0),
        limits: {
            let mb = |v: u64| {
                usize::try_from(v.max(1).saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
            };
            comfyume_gateway::limits::Limits {
                max_json_body: mb(args.max_json_body_mb.or(file.max_json_body_mb).unwrap_or(8)),
                prompt: comfyume_wire::PromptLimits {
                    max_nodes: args
                        .max_prompt_nodes
                        .or(file.max_prompt_nodes)
                        .unwrap_or(2000)
                        .max(1),
                    max_extra_data_bytes: mb(args
                        .max_extra_data_mb
                        .or(file.max_extra_data_mb)
                        .unwrap_or(4)),
                },
            }
        },
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
    fn request_limits_come_from_env_file_and_defaults() {
        let defaults = resolve_serve(&CommonArgs::default(), &ServeArgs::default()).unwrap();
        assert_eq!(defaults.limits, comfyume_gateway::limits::Limits::default());
        assert_eq!(defaults.limits.max_json_body, 8 * 1024 * 1024);
        assert_eq!(defaults.limits.prompt.max_nodes, 2000);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "max_json_body_mb = 2\nmax_prompt_nodes = 50\n").unwrap();
        let common = CommonArgs {
            data_dir: None,
            config: Some(f),
        };
        let flags = ServeArgs {
            max_prompt_nodes: Some(7),
            max_extra_data_mb: Some(1),
            ..Default::default()
        };
        let r = resolve_serve(&common, &flags).unwrap();
        assert_eq!(r.limits.max_json_body, 2 * 1024 * 1024);
        assert_eq!(r.limits.prompt.max_nodes, 7);
        assert_eq!(r.limits.prompt.max_extra_data_bytes, 1024 * 1024);
    }

    #[test]
    fn connection_settings_have_generous_defaults_and_can_be_set() {
        use std::time::Duration;
        let d = resolve_serve(&CommonArgs::default(), &ServeArgs::default()).unwrap();
        assert!(
            d.net.trusted_proxies.is_empty(),
            "no proxy is trusted unless named"
        );
        assert_eq!(d.net.header_read_timeout, Duration::from_secs(30));
        assert_eq!(d.net.idle_timeout, Duration::from_secs(120));
        assert_eq!(d.net.max_sockets_per_user, 20);
        assert_eq!(d.net.max_connections, 2048);

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "trusted_proxies = [\"10.0.0.0/8\"]\nidle_timeout_secs = 60\nmax_connections = 500\n",
        )
        .unwrap();
        let common = CommonArgs {
            data_dir: None,
            config: Some(f),
        };
        let flags = ServeArgs {
            trusted_proxies: Some(vec!["127.0.0.1".into(), "::1/128".into()]),
            header_read_timeout_secs: Some(10),
            max_sockets_per_user: Some(5),
            ..Default::default()
        };
        let r = resolve_serve(&common, &flags).unwrap();
        assert_eq!(r.net.trusted_proxies.len(), 2, "flags win over the file");
        assert_eq!(r.net.header_read_timeout, Duration::from_secs(10));
        assert_eq!(r.net.idle_timeout, Duration::from_secs(60));
        assert_eq!(r.net.max_sockets_per_user, 5);
        assert_eq!(r.net.max_connections, 500);

        let bad = ServeArgs {
            trusted_proxies: Some(vec!["10.0.0.0/99".into()]),
            ..Default::default()
        };
        let e = resolve_serve(&CommonArgs::default(), &bad).unwrap_err();
        assert!(format!("{e:#}").contains("TRUSTED_PROXIES"), "{e:#}");
    }

    #[test]
    fn metrics_are_on_unless_switched_off() {
        let d = resolve_serve(&CommonArgs::default(), &ServeArgs::default()).unwrap();
        assert!(d.metrics);
        let parsed: FileConfig = toml::from_str("metrics = \"off\"").unwrap();
        assert_eq!(parsed.metrics, Some(Switch::Off));
        let off = ServeArgs {
            metrics: Some(Switch::Off),
            ..Default::default()
        };
        assert!(!resolve_serve(&CommonArgs::default(), &off).unwrap().metrics);
    }

    #[test]
    fn unknown_toml_keys_are_an_error() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
    }
}
