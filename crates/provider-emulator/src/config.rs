//! Emulator settings: global defaults from flags, per-deployment overrides in the
//! `--deployment NAME[:key=value,...]` spec.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

/// What a caller sees when its request's TTL runs out (not documented by the provider).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlExpiry {
    /// The connection is cut: a stream ends without its final event; a request still in
    /// the queue gets response headers and then a cut body.
    Cut,
    /// An HTTP status (if no response has started yet; a started stream is cut).
    Status(u16),
}

impl FromStr for TtlExpiry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "cut" => Ok(TtlExpiry::Cut),
            other => other
                .strip_prefix("status:")
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (400..=599).contains(c))
                .map(TtlExpiry::Status)
                .ok_or_else(|| format!("expected cut or status:CODE (400-599), not {s:?}")),
        }
    }
}

/// Which replica a scale-down stops (not documented by the provider).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDownPick {
    /// Replicas not yet serving, then idle ones, then busy ones; newest first.
    IdleFirst,
    /// The newest replica, busy or not.
    Newest,
    /// The oldest replica, busy or not.
    Oldest,
}

impl FromStr for ScaleDownPick {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "idle-first" | "idle_first" => Ok(ScaleDownPick::IdleFirst),
            "newest" => Ok(ScaleDownPick::Newest),
            "oldest" => Ok(ScaleDownPick::Oldest),
            _ => Err(format!("expected idle-first, newest or oldest, not {s:?}")),
        }
    }
}

/// One deployment's settings (the provider's scaling options plus emulator knobs).
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentSettings {
    pub name: String,
    pub spot: bool,
    /// Price table key (`H200`, `B300`).
    pub gpu: String,
    pub min_replicas: usize,
    pub max_replicas: usize,
    /// Requests one replica is given at once (`concurrent_requests_per_replica`).
    pub concurrency: usize,
    /// Queue-load trigger: scale up when waiting requests per replica exceed it.
    pub threshold: f64,
    pub scale_up_delay: Duration,
    pub scale_down_delay: Duration,
    /// Delay before a new replica's process starts (image pull, boot); the worker's own
    /// start and warm-up come on top.
    pub cold_start: Duration,
    /// SIGTERM to SIGKILL on scale-down (the provider: 30 s).
    pub grace: Duration,
    /// Request TTL: queue wait plus the request itself.
    pub ttl: Duration,
    pub ttl_expiry: TtlExpiry,
    pub scale_down_pick: ScaleDownPick,
    /// The simulator's milliseconds per sampler step in this deployment's replicas.
    pub step_ms: u64,
}

impl DeploymentSettings {
    /// Applies `key=value,...` overrides.
    pub fn apply(&mut self, overrides: &str) -> Result<(), String> {
        for pair in overrides
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, not {pair:?}"))?;
            let bad = || format!("bad value {v:?} for {k}");
            let ms = |v: &str| {
                v.parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| bad())
            };
            match k.trim() {
                "spot" => self.spot = v.parse().map_err(|_| bad())?,
                "gpu" => self.gpu = v.to_uppercase(),
                "min_replicas" => self.min_replicas = v.parse().map_err(|_| bad())?,
                "max_replicas" => self.max_replicas = v.parse().map_err(|_| bad())?,
                "concurrency" => self.concurrency = v.parse().map_err(|_| bad())?,
                "threshold" => self.threshold = v.parse().map_err(|_| bad())?,
                "scale_up_delay_ms" => self.scale_up_delay = ms(v)?,
                "scale_down_delay_ms" => self.scale_down_delay = ms(v)?,
                "cold_start_ms" => self.cold_start = ms(v)?,
                "grace_ms" => self.grace = ms(v)?,
                "ttl_ms" => self.ttl = ms(v)?,
                "ttl_secs" => self.ttl = Duration::from_secs(v.parse().map_err(|_| bad())?),
                "ttl_expiry" => self.ttl_expiry = v.parse()?,
                "scale_down_pick" => self.scale_down_pick = v.parse()?,
                "step_ms" => self.step_ms = v.parse().map_err(|_| bad())?,
                other => return Err(format!("unknown deployment setting {other:?}")),
            }
        }
        self.check()
    }

    fn check(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "deployment name {:?} must match [a-z0-9]([-a-z0-9]*[a-z0-9])?, at most 63 characters",
                self.name
            ));
        }
        if self.max_replicas == 0 || self.min_replicas > self.max_replicas {
            return Err(format!(
                "{}: need 0 <= min_replicas <= max_replicas and max_replicas >= 1",
                self.name
            ));
        }
        if self.concurrency == 0 || self.threshold.is_nan() || self.threshold <= 0.0 {
            return Err(format!(
                "{}: concurrency and threshold must be positive",
                self.name
            ));
        }
        Ok(())
    }
}

/// The provider's rule for deployment names.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A stand-in for the serverless provider's gateway in front of N `comfyume-worker`
/// replicas (each with its own `comfyume-sim`), which it starts and stops as processes.
/// Test support and demo only; it reproduces what the provider documents
/// (docs/serverless.md) and makes every undocumented behaviour a knob.
#[derive(Debug, Clone, Parser)]
#[command(name = "comfyume-provider", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "PROVIDER_LISTEN", default_value = "127.0.0.1:8900")]
    pub listen: SocketAddr,
    /// A deployment: NAME or NAME:key=value,... (keys: spot, gpu, min_replicas,
    /// max_replicas, concurrency, threshold, scale_up_delay_ms, scale_down_delay_ms,
    /// cold_start_ms, grace_ms, ttl_secs, ttl_ms, ttl_expiry, scale_down_pick, step_ms).
    /// Repeatable. Default: h200-spot:spot=true and h200-on-demand.
    #[arg(long = "deployment", value_name = "SPEC")]
    pub deployments: Vec<String>,
    /// The worker binary (default: comfyume-worker beside this executable).
    #[arg(long, env = "PROVIDER_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// The simulator binary (default: comfyume-sim beside this executable).
    #[arg(long, env = "PROVIDER_SIM_BIN")]
    pub sim_bin: Option<PathBuf>,
    /// Replicas' working directories (default: a fresh temporary directory).
    #[arg(long, env = "PROVIDER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub min_replicas: usize,
    #[arg(long, default_value_t = 3)]
    pub max_replicas: usize,
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Queue load (waiting requests per replica) above which a replica is added.
    #[arg(long, default_value_t = 1.0)]
    pub threshold: f64,
    #[arg(long, default_value_t = 0)]
    pub scale_up_delay_ms: u64,
    /// Queue load below the threshold for this long: one replica is stopped.
    #[arg(long, default_value_t = 300_000)]
    pub scale_down_delay_ms: u64,
    /// Delay before a new replica's process is started.
    #[arg(long, default_value_t = 2_000)]
    pub cold_start_ms: u64,
    /// SIGTERM to SIGKILL on scale-down.
    #[arg(long, default_value_t = 30_000)]
    pub grace_ms: u64,
    /// Request TTL (queue wait + run).
    #[arg(long, default_value_t = 300)]
    pub ttl_secs: u64,
    /// What the caller sees on TTL expiry: cut, or status:CODE.
    #[arg(long, default_value = "cut")]
    pub ttl_expiry: TtlExpiry,
    /// Which replica a scale-down stops: idle-first, newest or oldest.
    #[arg(long, default_value = "idle-first")]
    pub scale_down_pick: ScaleDownPick,
    /// Simulated milliseconds per sampler step (the replicas' comfyume-sim --step-ms).
    #[arg(long, default_value_t = 50)]
    pub step_ms: u64,
    /// How often each replica's /health is probed (also right after each request ends).
    #[arg(long, default_value_t = 1_000)]
    pub health_interval_ms: u64,
    /// Inference API key required as `Authorization: Bearer` (none: no check).
    #[arg(long, env = "PROVIDER_INFERENCE_KEY", hide_env_values = true)]
    pub inference_key: Option<String>,
    /// Management API client credentials.
    #[arg(long, env = "PROVIDER_CLIENT_ID", default_value = "emulator-client")]
    pub client_id: String,
    #[arg(
        long,
        env = "PROVIDER_CLIENT_SECRET",
        default_value = "emulator-secret",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// Environment for every replica's worker, KEY=VALUE (repeatable), e.g.
    /// WORKER_TOKEN=..., WORKER_ABORT_AFTER_SECS=20, WARMUP_WORKFLOW=/path.
    #[arg(long = "replica-env", value_name = "KEY=VALUE")]
    pub replica_env: Vec<String>,
    /// Extra arguments for every replica's simulator (e.g. --fault=slow-view:100).
    #[arg(long = "sim-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sim_args: Vec<String>,
    /// Largest request body accepted.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest async-mode result stored.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub max_result_bytes: usize,
    /// How long async-mode statuses and results are kept.
    #[arg(long, default_value_t = 3_600)]
    pub async_keep_secs: u64,
    /// Prices (EUR/hour) as GPU:spot:on-demand, repeatable (default H200 and B300).
    #[arg(long = "price", value_name = "GPU:SPOT:ON_DEMAND")]
    pub prices: Vec<String>,
}

/// A GPU's prices per hour.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub gpu: String,
    pub spot: f64,
    pub on_demand: f64,
}

impl Args {
    /// Every deployment's settings: the flags' defaults with each spec's overrides.
    pub fn deployments(&self) -> Result<Vec<DeploymentSettings>, String> {
        let specs: Vec<String> = if self.deployments.is_empty() {
            vec!["h200-spot:spot=true".into(), "h200-on-demand".into()]
        } else {
            self.deployments.clone()
        };
        let mut out: Vec<DeploymentSettings> = Vec::new();
        for spec in specs {
            let (name, overrides) = spec.split_once(':').unwrap_or((&spec, ""));
            let mut d = DeploymentSettings {
                name: name.trim().to_owned(),
                spot: false,
                gpu: if name.contains("b300") {
                    "B300"
                } else {
                    "H200"
                }
                .into(),
                min_replicas: self.min_replicas,
                max_replicas: self.max_replicas,
                concurrency: self.concurrency,
                threshold: self.threshold,
                scale_up_delay: Duration::from_millis(self.scale_up_delay_ms),
                scale_down_delay: Duration::from_millis(self.scale_down_delay_ms),
                cold_start: Duration::from_millis(self.cold_start_ms),
                grace: Duration::from_millis(self.grace_ms),
                ttl: Duration::from_secs(self.ttl_secs),
                ttl_expiry: self.ttl_expiry,
                scale_down_pick: self.scale_down_pick,
                step_ms: self.step_ms,
            };
            d.apply(overrides)?;
            if out.iter().any(|o| o.name == d.name) {
                return Err(format!("deployment {} is given twice", d.name));
            }
            out.push(d);
        }
        Ok(out)
    }

    pub fn price_table(&self) -> Result<Vec<Price>, String> {
        if self.prices.is_empty() {
            // A third party's observed EUR prices (docs/serverless.md).
            return Ok(vec![
                Price {
                    gpu: "H200".into(),
                    spot: 0.97,
                    on_demand: 2.80,
                },
                Price {
                    gpu: "B300".into(),
                    spot: 1.61,
                    on_demand: 4.63,
                },
            ]);
        }
        self.prices
            .iter()
            .map(|p| {
                let parts: Vec<&str> = p.split(':').collect();
                match parts.as_slice() {
                    [gpu, spot, od] => Ok(Price {
                        gpu: gpu.to_uppercase(),
                        spot: spot.parse().map_err(|_| format!("bad price {p:?}"))?,
                        on_demand: od.parse().map_err(|_| format!("bad price {p:?}"))?,
                    }),
                    _ => Err(format!("expected GPU:SPOT:ON_DEMAND, not {p:?}")),
                }
            })
            .collect()
    }

    /// `--replica-env` pairs.
    pub fn replica_env(&self) -> Result<Vec<(String, String)>, String> {
        self.replica_env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("expected KEY=VALUE, not {kv:?}"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["comfyume-provider"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn deployment_specs_override_the_defaults() {
        let a = args(&[
            "--max-replicas",
            "4",
            "--deployment",
            "h200-spot:spot=true,cold_start_ms=1500,ttl_secs=9",
            "--deployment",
            "b300-on-demand:max_replicas=1,ttl_expiry=status:504,scale_down_pick=newest",
        ]);
        let d = a.deployments().unwrap();
        assert_eq!(d.len(), 2);
        assert!(d[0].spot);
        assert_eq!(d[0].max_replicas, 4);
        assert_eq!(d[0].cold_start, Duration::from_millis(1500));
        assert_eq!(d[0].ttl, Duration::from_secs(9));
        assert_eq!(d[1].gpu, "B300");
        assert_eq!(d[1].max_replicas, 1);
        assert_eq!(d[1].ttl_expiry, TtlExpiry::Status(504));
        assert_eq!(d[1].scale_down_pick, ScaleDownPick::Newest);
        assert_eq!(args(&[]).deployments().unwrap().len(), 2);
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in [
            "Bad_Name",
            "x-",
            "x:nope=1",
            "x:max_replicas=0",
            "x:min_replicas=5",
            "x:ttl_expiry=status:200",
            "x:threshold=0",
            "x:spot",
        ] {
            assert!(args(&["--deployment", bad]).deployments().is_err(), "{bad}");
        }
        assert!(
            args(&["--deployment", "a", "--deployment", "a"])
                .deployments()
                .is_err()
        );
        assert!(args(&["--price", "H200:1"]).price_table().is_err());
        assert_eq!(
            args(&["--price", "h200:1:2"]).price_table().unwrap()[0].gpu,
            "H200"
        );
        assert!(args(&["--replica-env", "NOEQ"]).replica_env().is_err());
    }
}
