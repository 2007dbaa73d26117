//! Settings: command-line flags, else environment variables (`docs/serverless.md` lists
//! them), else defaults. Secrets can also come from `NAME_FILE` (container secrets).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// A secret value: never printed (`Debug` and `Display` show `***`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// The worker agent beside one ComfyUI in a serverless GPU container.
///
/// It answers `POST /run` (one job per request, Server-Sent Events), `GET /health` and
/// `GET /object_info`; see docs/worker-protocol.md. Flags win over the environment.
#[derive(Debug, Clone, Parser)]
#[command(name = "comfyume-worker", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "WORKER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// ComfyUI's address. May contain `{port}` (the port chosen for --comfyui-cmd).
    /// Default: http://127.0.0.1:8188, or http://127.0.0.1:{port} with a command.
    #[arg(long, env = "COMFYUI_URL")]
    pub comfyui_url: Option<String>,
    /// Start and supervise ComfyUI with this shell command (restarted if it dies). A
    /// `{port}` in it is replaced by a free local port.
    #[arg(long, env = "COMFYUI_CMD")]
    pub comfyui_cmd: Option<String>,
    /// Token required on /run and /object_info (X-Worker-Token or Authorization: Bearer);
    /// also from WORKER_TOKEN_FILE.
    #[arg(long, env = "WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// An API-format workflow run once before the worker reports ready (again after a
    /// ComfyUI restart).
    #[arg(long, env = "WARMUP_WORKFLOW")]
    pub warmup_workflow: Option<PathBuf>,
    /// Longest warm-up run, in seconds (models load during it).
    #[arg(long, env = "WARMUP_TIMEOUT_SECS", default_value_t = 900)]
    pub warmup_timeout_secs: u64,
    /// The worker's own directory (job inputs and outputs). Default: a fresh directory
    /// under the system temp dir, removed at exit.
    #[arg(long, env = "WORKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Name in events and logs (default: the host name).
    #[arg(long, env = "WORKER_ID")]
    pub id: Option<String>,
    /// After SIGTERM, a running job may go on this long before it is aborted.
    #[arg(long, env = "WORKER_ABORT_AFTER_SECS", default_value_t = 20)]
    pub abort_after_secs: u64,
    /// Keep-alive on an idle stream (1..=15 s).
    #[arg(long, env = "WORKER_KEEPALIVE_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=15))]
    pub keepalive_secs: u64,
    /// Raw bytes per output_chunk event (196608 = 256 KiB of base64).
    #[arg(long, env = "WORKER_CHUNK_BYTES", default_value_t = 196_608,
          value_parser = clap::value_parser!(u64).range(1024..=4_194_304))]
    pub chunk_bytes: u64,
    /// Output bytes one job may send inline; beyond, files go to the store.
    #[arg(long, env = "WORKER_INLINE_MAX_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub inline_max_bytes: u64,
    /// Largest POST /run body.
    #[arg(long, env = "WORKER_MAX_REQUEST_BYTES", default_value_t = 48 * 1024 * 1024)]
    pub max_request_bytes: u64,
    /// Inline input bytes (decoded) one request may carry.
    #[arg(long, env = "WORKER_MAX_INPUT_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_input_bytes: u64,
    /// At most one image preview per this many ms; 0 sends none.
    #[arg(long, env = "WORKER_PREVIEW_INTERVAL_MS", default_value_t = 500)]
    pub preview_interval_ms: u64,
    /// How long a finished job's result is kept for a retried request.
    #[arg(long, env = "WORKER_KEEP_RESULTS_SECS", default_value_t = 3600)]
    pub keep_results_secs: u64,
    /// How many bytes of finished jobs' outputs are kept for retried requests.
    #[arg(long, env = "WORKER_KEEP_RESULTS_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub keep_results_bytes: u64,
    /// Retry-After of 429 and 503 answers, in seconds.
    #[arg(long, env = "WORKER_RETRY_AFTER_SECS", default_value_t = 5)]
    pub retry_after_secs: u64,
    /// ComfyUI calls: connect and small requests.
    #[arg(long, env = "COMFYUI_REQUEST_TIMEOUT_SECS", default_value_t = 10)]
    pub comfyui_request_timeout_secs: u64,
    /// ComfyUI calls: uploads and output downloads.
    #[arg(long, env = "COMFYUI_TRANSFER_TIMEOUT_SECS", default_value_t = 300)]
    pub comfyui_transfer_timeout_secs: u64,
    /// No WebSocket news for this long while a job runs: ComfyUI is asked where the job is.
    #[arg(long, env = "COMFYUI_SILENCE_TIMEOUT_SECS", default_value_t = 120)]
    pub comfyui_silence_timeout_secs: u64,
    /// S3-compatible store for large outputs and stored inputs: endpoint URL.
    #[arg(long, env = "OUTPUT_STORE_ENDPOINT")]
    pub store_endpoint: Option<String>,
    /// The store's bucket.
    #[arg(long, env = "OUTPUT_STORE_BUCKET")]
    pub store_bucket: Option<String>,
    /// The store's region (`auto` for Cloudflare R2).
    #[arg(long, env = "OUTPUT_STORE_REGION", default_value = "auto")]
    pub store_region: String,
    /// Access key id (also from OUTPUT_STORE_ACCESS_KEY_ID_FILE).
    #[arg(long, env = "OUTPUT_STORE_ACCESS_KEY_ID", hide_env_values = true)]
    pub store_access_key_id: Option<Secret>,
    /// Secret access key (also from OUTPUT_STORE_SECRET_ACCESS_KEY_FILE).
    #[arg(long, env = "OUTPUT_STORE_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub store_secret_access_key: Option<Secret>,
    /// Key prefix of uploaded outputs (`<prefix><job id>/<file>`).
    #[arg(long, env = "OUTPUT_STORE_PREFIX", default_value = "outputs/")]
    pub store_prefix: String,
    /// Longest store transfer of one file, in seconds.
    #[arg(long, env = "OUTPUT_STORE_TIMEOUT_SECS", default_value_t = 600)]
    pub store_timeout_secs: u64,
    /// Log format: pretty or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty")]
    pub log_format: String,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {name}_FILE ({path}): {reason}")]
    SecretFile {
        name: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The object store settings, all present.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub prefix: String,
    pub timeout: Duration,
}

impl Args {
    /// Fills secrets from `NAME_FILE` where the value itself is not set, and checks
    /// combinations.
    pub fn resolve(mut self) -> Result<Self, ConfigError> {
        self.resolve_with(|k| std::env::var(k).ok())?;
        Ok(self)
    }

    pub(crate) fn resolve_with(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let file = |name: &'static str| -> Result<Option<Secret>, ConfigError> {
            let Some(path) = env(&format!("{name}_FILE")).filter(|p| !p.is_empty()) else {
                return Ok(None);
            };
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::SecretFile {
                name,
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Ok(Some(Secret(text.trim_end_matches(['\n', '\r']).to_owned())))
        };
        if self.token.is_none() {
            self.token = file("WORKER_TOKEN")?;
        }
        if self.store_access_key_id.is_none() {
            self.store_access_key_id = file("OUTPUT_STORE_ACCESS_KEY_ID")?;
        }
        if self.store_secret_access_key.is_none() {
            self.store_secret_access_key = file("OUTPUT_STORE_SECRET_ACCESS_KEY")?;
        }
        // An empty token would let everybody in while looking configured.
        if self.token.as_ref().is_some_and(|t| t.0.is_empty()) {
            self.token = None;
        }
        if !matches!(self.log_format.as_str(), "pretty" | "json") {
            return Err(ConfigError::Invalid(format!(
                "LOG_FORMAT must be pretty or json, not {:?}",
                self.log_format
            )));
        }
        self.store()?;
        Ok(())
    }

    /// The object store, when configured; an error when only part of it is.
    pub fn store(&self) -> Result<Option<StoreSettings>, ConfigError> {
        let endpoint = self.store_endpoint.clone().filter(|s| !s.is_empty());
        let bucket = self.store_bucket.clone().filter(|s| !s.is_empty());
        match (
            endpoint,
            bucket,
            &self.store_access_key_id,
            &self.store_secret_access_key,
        ) {
            (None, None, None, None) => Ok(None),
            (Some(endpoint), Some(bucket), Some(id), Some(secret)) => Ok(Some(StoreSettings {
                endpoint,
                bucket,
                region: self.store_region.clone(),
                access_key_id: id.clone(),
                secret_access_key: secret.clone(),
                prefix: self.store_prefix.clone(),
                timeout: Duration::from_secs(self.store_timeout_secs.max(1)),
            })),
            _ => Err(ConfigError::Invalid(
                "the output store needs all of OUTPUT_STORE_ENDPOINT, OUTPUT_STORE_BUCKET, \
                 OUTPUT_STORE_ACCESS_KEY_ID and OUTPUT_STORE_SECRET_ACCESS_KEY"
                    .into(),
            )),
        }
    }

    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_secs.clamp(1, 15))
    }

    pub fn abort_after(&self) -> Duration {
        Duration::from_secs(self.abort_after_secs)
    }

    pub fn timeouts(&self) -> comfyume_comfyui::Timeouts {
        comfyume_comfyui::Timeouts {
            request: Duration::from_secs(self.comfyui_request_timeout_secs.max(1)),
            transfer: Duration::from_secs(self.comfyui_transfer_timeout_secs.max(1)),
            silence: Duration::from_secs(self.comfyui_silence_timeout_secs.max(1)),
        }
    }

    pub fn worker_id(&self) -> String {
        self.id
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "comfyume-worker".into())
    }

    /// Settings for tests and embedding: every default, this ComfyUI.
    pub fn for_comfyui(url: impl Into<String>) -> Self {
        let mut a = Args::parse_from(["comfyume-worker", "--listen", "127.0.0.1:0"]);
        a.comfyui_url = Some(url.into());
        a
    }
}

/// `cmd` with `{port}` replaced; `url` likewise, or the local default.
pub fn comfyui_target(url: Option<&str>, cmd: Option<&str>, port: u16) -> (String, Option<String>) {
    let p = port.to_string();
    let cmd = cmd.map(|c| c.replace("{port}", &p));
    let url = match url {
        Some(u) => u.replace("{port}", &p),
        None if cmd.is_some() => format!("http://127.0.0.1:{p}"),
        None => "http://127.0.0.1:8188".to_owned(),
    };
    (url, cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["comfyume-worker"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let mut a = args(&[]);
        let path = token.to_string_lossy().into_owned();
        a.resolve_with(|k| (k == "WORKER_TOKEN_FILE").then(|| path.clone()))
            .unwrap();
        assert_eq!(a.token.as_ref().unwrap().expose(), "s3cret");
        assert!(!format!("{a:?}").contains("s3cret"));

        let mut a = args(&[]);
        let err = a
            .resolve_with(|k| (k == "WORKER_TOKEN_FILE").then(|| "/nonexistent/x".into()))
            .unwrap_err();
        assert!(err.to_string().contains("WORKER_TOKEN_FILE"));

        let mut a = args(&["--token", ""]);
        a.resolve_with(|_| None).unwrap();
        assert!(a.token.is_none());
    }

    #[test]
    fn a_partial_store_is_an_error() {
        let mut a = args(&["--store-bucket", "b"]);
        assert!(a.resolve_with(|_| None).is_err());
        let mut a = args(&[
            "--store-endpoint",
            "http://127.0.0.1:9000",
            "--store-bucket",
            "b",
            "--store-access-key-id",
            "id",
            "--store-secret-access-key",
            "key",
        ]);
        a.resolve_with(|_| None).unwrap();
        let s = a.store().unwrap().unwrap();
        assert_eq!(s.bucket, "b");
        assert!(!format!("{s:?}").contains("key\""));
        let mut a = args(&["--log-format", "xml"]);
        assert!(a.resolve_with(|_| None).is_err());
        assert!(Args::try_parse_from(["w", "--keepalive-secs", "16"]).is_err());
    }

    #[test]
    fn port_placeholders() {
        assert_eq!(
            comfyui_target(None, Some("python main.py --port {port}"), 9),
            (
                "http://127.0.0.1:9".into(),
                Some("python main.py --port 9".into())
            )
        );
        assert_eq!(
            comfyui_target(Some("http://h:{port}/x"), None, 7).0,
            "http://h:7/x"
        );
        assert_eq!(comfyui_target(None, None, 7).0, "http://127.0.0.1:8188");
    }
}
