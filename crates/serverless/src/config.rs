//! Settings of the serverless backend, read from environment variables (pure: the
//! caller hands in the variables and a way to read `*_FILE` secrets).
//!
//! Endpoints are `SERVERLESS_ENDPOINT_<NAME>`; everywhere else (SERVERLESS_ACTIVE,
//! SERVERLESS_FAILOVER, the admin API) an endpoint is named in the seed's spelling:
//! `h200-on-demand` <-> `SERVERLESS_ENDPOINT_H200_ON_DEMAND`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Every fixed variable this backend reads (the endpoint-named ones are listed for the
/// four seeded endpoints), for `.env.example`'s completeness test.
pub const ENV_VARS: &[&str] = &[
    "SERVERLESS_ENDPOINT_H200_SPOT",
    "SERVERLESS_ENDPOINT_H200_ON_DEMAND",
    "SERVERLESS_ENDPOINT_B300_SPOT",
    "SERVERLESS_ENDPOINT_B300_ON_DEMAND",
    "SERVERLESS_ACTIVE",
    "SERVERLESS_FAILOVER",
    "SERVERLESS_API_KEY",
    "SERVERLESS_API_KEY_FILE",
    "SERVERLESS_WORKER_TOKEN",
    "SERVERLESS_WORKER_TOKEN_FILE",
    "SERVERLESS_MAX_IN_FLIGHT",
    "SERVERLESS_ASYNC",
    "SERVERLESS_COLD_START_AFTER_SECS",
    "SERVERLESS_COLD_START_ESTIMATE_SECS",
    "SERVERLESS_SILENCE_SECS",
    "SERVERLESS_POLL_SECS",
    "SERVERLESS_FAIL_THRESHOLD",
    "SERVERLESS_MAX_INLINE_INPUT_MB",
    "VERDA_API_URL",
    "VERDA_CLIENT_ID",
    "VERDA_CLIENT_SECRET",
    "VERDA_CLIENT_SECRET_FILE",
    "WARMUP_AT",
    "OUTPUT_STORE_ENDPOINT",
    "OUTPUT_STORE_BUCKET",
    "OUTPUT_STORE_REGION",
    "OUTPUT_STORE_PREFIX",
    "OUTPUT_STORE_ACCESS_KEY_ID",
    "OUTPUT_STORE_ACCESS_KEY_ID_FILE",
    "OUTPUT_STORE_SECRET_ACCESS_KEY",
    "OUTPUT_STORE_SECRET_ACCESS_KEY_FILE",
    "OUTPUT_STORE_TIMEOUT_SECS",
];

/// Per-endpoint variable families: `<PREFIX><NAME>`.
pub const PER_ENDPOINT: &[&str] = &[
    "SERVERLESS_ENDPOINT_",
    "SERVERLESS_MAX_IN_FLIGHT_",
    "SERVERLESS_PRICE_",
    "SERVERLESS_DEPLOYMENT_",
];

/// Every variable `.env.example` must list: [`ENV_VARS`], and each per-endpoint
/// family for the four seeded endpoints.
pub fn documented_vars() -> Vec<String> {
    let mut out: Vec<String> = ENV_VARS.iter().map(|s| s.to_string()).collect();
    for family in PER_ENDPOINT {
        for (name, _) in DEFAULT_PRICES {
            let v = format!("{family}{}", env_suffix(name));
            if !out.contains(&v) {
                out.push(v);
            }
        }
    }
    out
}

/// Default prices, EUR per replica-hour (what a third party paid in Feb 2026).
pub const DEFAULT_PRICES: &[(&str, f64)] = &[
    ("h200-spot", 0.97),
    ("h200-on-demand", 2.80),
    ("b300-spot", 1.61),
    ("b300-on-demand", 4.63),
];

/// A secret: never printed by `Debug`.
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
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "INFERENCE_MODE=serverless needs at least one SERVERLESS_ENDPOINT_<NAME> (e.g. SERVERLESS_ENDPOINT_H200_SPOT=https://<gateway>/<deployment>)"
    )]
    NoEndpoint,
    #[error("{var}: {why}")]
    Bad { var: String, why: String },
    #[error("{var} names {name:?}, which is not a configured endpoint (known: {known})")]
    UnknownEndpoint {
        var: String,
        name: String,
        known: String,
    },
    #[error("{var}_FILE: cannot read {path}: {why}")]
    SecretFile {
        var: String,
        path: String,
        why: String,
    },
}

fn bad(var: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Bad {
        var: var.to_owned(),
        why: why.into(),
    }
}

/// One endpoint (a provider deployment, or one worker reached directly).
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    /// The seed's spelling: `h200-spot`.
    pub name: String,
    /// Base URL without a trailing slash; jobs go to `<url>/run`.
    pub url: String,
    /// Requests in flight at once (the deployment's replica limit).
    pub max_in_flight: usize,
    /// Deployment name for the management API, if any.
    pub deployment: Option<String>,
    /// EUR per replica-hour.
    pub price_eur_per_hour: f64,
}

/// The provider's management API.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagementConfig {
    /// e.g. `https://api.verda.com/v1`, no trailing slash.
    pub api_url: String,
    pub client_id: String,
    pub client_secret: Secret,
}

/// The S3-compatible store the workers put large outputs in.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerlessConfig {
    pub endpoints: Vec<EndpointConfig>,
    pub active: String,
    pub failover: Vec<String>,
    /// The provider's inference key (`Authorization: Bearer`).
    pub api_key: Option<Secret>,
    /// The workers' token (`X-Worker-Token`).
    pub worker_token: Option<Secret>,
    pub management: Option<ManagementConfig>,
    /// Always the provider's async mode instead of streaming.
    pub async_mode: bool,
    /// Local time of day (hour, minute) to warm the active endpoint.
    pub warmup_at: Option<(u8, u8)>,
    pub store: Option<StoreConfig>,
    /// No first event this long after sending: the GPU is presumed cold.
    pub cold_start_after: Duration,
    /// Cold-start estimate before any was measured.
    pub cold_start_estimate: Duration,
    /// No byte (keep-alives included) this long on an open stream: broken.
    pub silence: Duration,
    /// Management API polling period.
    pub poll_every: Duration,
    /// Consecutive failed attempts after which an endpoint is passed over.
    pub fail_threshold: u32,
    /// Largest total of a job's inputs sent inline in the request.
    pub max_inline_input_bytes: u64,
}

/// `H200_ON_DEMAND` -> `h200-on-demand`.
pub fn seed_name(env_suffix: &str) -> String {
    env_suffix.to_ascii_lowercase().replace('_', "-")
}

/// `h200-on-demand` -> `H200_ON_DEMAND`.
pub fn env_suffix(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// The last path segment of a URL (the provider's deployment name), if any.
pub fn deployment_from_url(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// `HH:MM`, 24 h.
pub fn parse_time_of_day(s: &str) -> Option<(u8, u8)> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u8, u8) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && !s.trim().is_empty()).then_some((h, m))
}

/// The URL as it may be shown and logged: no user info, no query.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = match rest.split_once('@') {
        Some((userinfo, host)) if !userinfo.contains('/') => host,
        _ => rest,
    };
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    if scheme.is_empty() {
        rest.to_owned()
    } else {
        format!("{scheme}://{rest}")
    }
}

fn names_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Reads the settings. `None` when no endpoint is configured at all (the caller
/// decides whether that is an error). `read_file` reads a `*_FILE` secret.
pub fn from_vars(
    vars: &BTreeMap<String, String>,
    read_file: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<ServerlessConfig, ConfigError> {
    let get = |k: &str| vars.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let secret = |k: &str| -> Result<Option<Secret>, ConfigError> {
        if let Some(v) = get(k) {
            return Ok(Some(Secret::new(v)));
        }
        let fk = format!("{k}_FILE");
        match get(&fk) {
            Some(path) => read_file(Path::new(path))
                .map(|s| Some(Secret::new(s.trim())))
                .map_err(|e| ConfigError::SecretFile {
                    var: k.to_owned(),
                    path: path.to_owned(),
                    why: e.to_string(),
                }),
            None => Ok(None),
        }
    };
    let num = |k: &str, default: u64| -> Result<u64, ConfigError> {
        match get(k) {
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| bad(k, format!("expected a whole number, not {v:?}"))),
            None => Ok(default),
        }
    };
    let default_in_flight = num("SERVERLESS_MAX_IN_FLIGHT", 10)?.max(1) as usize;

    let mut endpoints = Vec::new();
    for (k, v) in vars {
        let Some(suffix) = k.strip_prefix("SERVERLESS_ENDPOINT_") else {
            continue;
        };
        let v = v.trim();
        if suffix.is_empty() || v.is_empty() {
            continue;
        }
        if !suffix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(bad(
                k,
                "the name after SERVERLESS_ENDPOINT_ may hold only A-Z, 0-9 and _",
            ));
        }
        if !(v.starts_with("http://") || v.starts_with("https://")) {
            return Err(bad(k, "expected an http:// or https:// base URL"));
        }
        let suffix = suffix.to_ascii_uppercase();
        let name = seed_name(&suffix);
        let in_flight_var = format!("SERVERLESS_MAX_IN_FLIGHT_{suffix}");
        let max_in_flight = match get(&in_flight_var) {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| bad(&in_flight_var, "expected a number of at least 1"))?,
            None => default_in_flight,
        };
        let price_var = format!("SERVERLESS_PRICE_{suffix}");
        let price_eur_per_hour = match get(&price_var) {
            Some(p) => p
                .parse::<f64>()
                .ok()
                .filter(|p| p.is_finite() && *p >= 0.0)
                .ok_or_else(|| bad(&price_var, "expected EUR per hour, e.g. 0.97"))?,
            None => DEFAULT_PRICES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| *p)
                .unwrap_or(0.0),
        };
        let deployment = get(&format!("SERVERLESS_DEPLOYMENT_{suffix}"))
            .map(str::to_owned)
            .or_else(|| deployment_from_url(v));
        endpoints.push(EndpointConfig {
            name,
            url: v.trim_end_matches('/').to_owned(),
            max_in_flight,
            deployment,
            price_eur_per_hour,
        });
    }
    if endpoints.is_empty() {
        return Err(ConfigError::NoEndpoint);
    }
    let known = endpoints
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let check = |var: &str, name: &str| -> Result<(), ConfigError> {
        if endpoints.iter().any(|e| e.name == name) {
            Ok(())
        } else {
            Err(ConfigError::UnknownEndpoint {
                var: var.to_owned(),
                name: name.to_owned(),
                known: known.clone(),
            })
        }
    };
    let active = match get("SERVERLESS_ACTIVE") {
        Some(a) => {
            let a = a.to_ascii_lowercase();
            check("SERVERLESS_ACTIVE", &a)?;
            a
        }
        None => endpoints[0].name.clone(),
    };
    let failover = names_list(get("SERVERLESS_FAILOVER").unwrap_or(""));
    for f in &failover {
        check("SERVERLESS_FAILOVER", f)?;
    }

    let management = match (get("VERDA_CLIENT_ID"), secret("VERDA_CLIENT_SECRET")?) {
        (Some(id), Some(secret)) => Some(ManagementConfig {
            api_url: get("VERDA_API_URL")
                .unwrap_or("https://api.verda.com/v1")
                .trim_end_matches('/')
                .to_owned(),
            client_id: id.to_owned(),
            client_secret: secret,
        }),
        (None, None) => None,
        _ => {
            return Err(bad(
                "VERDA_CLIENT_ID",
                "the management API needs both VERDA_CLIENT_ID and VERDA_CLIENT_SECRET",
            ));
        }
    };

    let store = match get("OUTPUT_STORE_ENDPOINT") {
        None => None,
        Some(endpoint) => {
            let need = |k: &str, v: Option<Secret>| {
                v.ok_or_else(|| {
                    bad(
                        k,
                        "the output store needs OUTPUT_STORE_ENDPOINT, OUTPUT_STORE_BUCKET, \
                         OUTPUT_STORE_ACCESS_KEY_ID and OUTPUT_STORE_SECRET_ACCESS_KEY",
                    )
                })
            };
            Some(StoreConfig {
                endpoint: endpoint.trim_end_matches('/').to_owned(),
                bucket: need(
                    "OUTPUT_STORE_BUCKET",
                    get("OUTPUT_STORE_BUCKET").map(Secret::new),
                )?
                .expose()
                .to_owned(),
                region: get("OUTPUT_STORE_REGION").unwrap_or("auto").to_owned(),
                prefix: get("OUTPUT_STORE_PREFIX").unwrap_or("outputs/").to_owned(),
                access_key_id: need(
                    "OUTPUT_STORE_ACCESS_KEY_ID",
                    secret("OUTPUT_STORE_ACCESS_KEY_ID")?,
                )?,
                secret_access_key: need(
                    "OUTPUT_STORE_SECRET_ACCESS_KEY",
                    secret("OUTPUT_STORE_SECRET_ACCESS_KEY")?,
                )?,
                timeout: Duration::from_secs(num("OUTPUT_STORE_TIMEOUT_SECS", 600)?.max(1)),
            })
        }
    };

    let warmup_at = match get("WARMUP_AT") {
        Some(v) => Some(
            parse_time_of_day(v)
                .ok_or_else(|| bad("WARMUP_AT", "expected HH:MM (24 h, local time)"))?,
        ),
        None => None,
    };
    let async_mode = match get("SERVERLESS_ASYNC") {
        None | Some("0") | Some("false") | Some("no") => false,
        Some("1") | Some("true") | Some("yes") => true,
        Some(v) => {
            return Err(bad(
                "SERVERLESS_ASYNC",
                format!("expected 1 or 0, not {v:?}"),
            ));
        }
    };

    Ok(ServerlessConfig {
        endpoints,
        active,
        failover,
        api_key: secret("SERVERLESS_API_KEY")?,
        worker_token: secret("SERVERLESS_WORKER_TOKEN")?,
        management,
        async_mode,
        warmup_at,
        store,
        cold_start_after: Duration::from_secs(num("SERVERLESS_COLD_START_AFTER_SECS", 5)?.max(1)),
        cold_start_estimate: Duration::from_secs(
            num("SERVERLESS_COLD_START_ESTIMATE_SECS", 180)?.max(1),
        ),
        silence: Duration::from_secs(num("SERVERLESS_SILENCE_SECS", 45)?.max(2)),
        poll_every: Duration::from_secs(num("SERVERLESS_POLL_SECS", 30)?.max(1)),
        fail_threshold: num("SERVERLESS_FAIL_THRESHOLD", 3)?.clamp(1, 1000) as u32,
        max_inline_input_bytes: num("SERVERLESS_MAX_INLINE_INPUT_MB", 32)? * 1024 * 1024,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn no_files(_: &Path) -> std::io::Result<String> {
        Err(std::io::Error::new(std::io::ErrorKind::NotFound, "none"))
    }

    #[test]
    fn names_map_between_env_and_seed_spelling() {
        assert_eq!(seed_name("H200_ON_DEMAND"), "h200-on-demand");
        assert_eq!(env_suffix("b300-spot"), "B300_SPOT");
        assert_eq!(
            deployment_from_url("https://containers.example/comfy-h200/"),
            Some("comfy-h200".into())
        );
        assert_eq!(deployment_from_url("http://127.0.0.1:9000"), None);
        assert_eq!(parse_time_of_day("08:45"), Some((8, 45)));
        for bad in ["24:00", "8", "x:y", "12:60", ""] {
            assert_eq!(parse_time_of_day(bad), None, "{bad}");
        }
        assert_eq!(
            redact_url("https://user:pw@gw.example/dep?key=1"),
            "https://gw.example/dep"
        );
    }

    #[test]
    fn endpoints_failover_prices_and_secrets() {
        let v = vars(&[
            (
                "SERVERLESS_ENDPOINT_H200_SPOT",
                "https://gw.example/h200-spot/",
            ),
            (
                "SERVERLESS_ENDPOINT_H200_ON_DEMAND",
                "https://gw.example/h200-od",
            ),
            ("SERVERLESS_ENDPOINT_LAB_BOX", "http://10.0.0.5:8288"),
            ("SERVERLESS_ACTIVE", "H200-spot"),
            ("SERVERLESS_FAILOVER", "h200-on-demand, lab-box"),
            ("SERVERLESS_MAX_IN_FLIGHT", "4"),
            ("SERVERLESS_MAX_IN_FLIGHT_LAB_BOX", "1"),
            ("SERVERLESS_PRICE_LAB_BOX", "0.5"),
            ("SERVERLESS_DEPLOYMENT_H200_ON_DEMAND", "named-dep"),
            ("SERVERLESS_API_KEY_FILE", "/run/secrets/key"),
            ("VERDA_CLIENT_ID", "cid"),
            ("VERDA_CLIENT_SECRET", "csecret"),
            ("WARMUP_AT", "07:30"),
        ]);
        let read = |p: &Path| {
            assert_eq!(p, Path::new("/run/secrets/key"));
            Ok("k3y\n".to_string())
        };
        let c = from_vars(&v, &read).unwrap();
        assert_eq!(c.active, "h200-spot");
        assert_eq!(c.failover, ["h200-on-demand", "lab-box"]);
        let by = |n: &str| c.endpoints.iter().find(|e| e.name == n).unwrap().clone();
        assert_eq!(by("h200-spot").url, "https://gw.example/h200-spot");
        assert_eq!(by("h200-spot").deployment.as_deref(), Some("h200-spot"));
        assert_eq!(by("h200-spot").max_in_flight, 4);
        assert_eq!(by("h200-spot").price_eur_per_hour, 0.97);
        assert_eq!(
            by("h200-on-demand").deployment.as_deref(),
            Some("named-dep")
        );
        assert_eq!(by("h200-on-demand").price_eur_per_hour, 2.80);
        assert_eq!(by("lab-box").max_in_flight, 1);
        assert_eq!(by("lab-box").deployment, None);
        assert_eq!(by("lab-box").price_eur_per_hour, 0.5);
        assert_eq!(c.api_key.as_ref().unwrap().expose(), "k3y");
        assert_eq!(
            c.management.as_ref().unwrap().api_url,
            "https://api.verda.com/v1"
        );
        assert_eq!(c.warmup_at, Some((7, 30)));
        // Secrets never show in Debug output.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("k3y") && !dbg.contains("csecret"), "{dbg}");
    }

    #[test]
    fn bad_settings_get_clear_errors() {
        assert_eq!(
            from_vars(&vars(&[]), &no_files),
            Err(ConfigError::NoEndpoint)
        );
        let base = [("SERVERLESS_ENDPOINT_H200_SPOT", "https://gw/h")];
        let with = |extra: (&str, &str)| {
            let mut v = vars(&base);
            v.insert(extra.0.into(), extra.1.into());
            from_vars(&v, &no_files).unwrap_err().to_string()
        };
        assert!(with(("SERVERLESS_ACTIVE", "b300-spot")).contains("not a configured endpoint"));
        assert!(with(("SERVERLESS_FAILOVER", "h200-spot,nope")).contains("\"nope\""));
        assert!(with(("SERVERLESS_ENDPOINT_X", "ftp://x")).contains("http"));
        assert!(with(("SERVERLESS_MAX_IN_FLIGHT_H200_SPOT", "0")).contains("at least 1"));
        assert!(with(("SERVERLESS_PRICE_H200_SPOT", "-1")).contains("EUR"));
        assert!(with(("VERDA_CLIENT_ID", "x")).contains("VERDA_CLIENT_SECRET"));
        assert!(with(("WARMUP_AT", "25:00")).contains("HH:MM"));
        assert!(with(("SERVERLESS_API_KEY_FILE", "/nope")).contains("/nope"));
        assert!(with(("OUTPUT_STORE_ENDPOINT", "http://s3")).contains("OUTPUT_STORE_BUCKET"));
        assert!(with(("SERVERLESS_ASYNC", "maybe")).contains("SERVERLESS_ASYNC"));
    }
}
