//! Simulator configuration and fault descriptions.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::str::FromStr;

use crate::SimError;

/// Default simulated time of one sampler step.
pub const DEFAULT_STEP_MS: u64 = 50;
/// ComfyUI's default `--max-upload-size` (100 MB).
pub const DEFAULT_MAX_UPLOAD: u64 = 100 * 1024 * 1024;

/// How to run a simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Serve this `object_info.json` instead of the built-in node set. Every prompt whose
    /// class_types exist is accepted and each output node writes a placeholder PNG.
    pub object_info: Option<PathBuf>,
    /// Simulated time per sampler step (and per unit of other slow nodes), in milliseconds.
    pub step_ms: u64,
    /// Where `input/`, `output/` and `temp/` live. `None`: a fresh directory under the system
    /// temp dir, removed again by [`crate::SimHandle::shutdown`].
    pub data_dir: Option<PathBuf>,
    /// Faults active from the start.
    pub faults: Vec<Fault>,
    /// ComfyUI's classic cache (a rerun of unchanged nodes is served from the previous prompt's
    /// results). `false` behaves like `--cache-none`.
    pub cache: bool,
    /// Request body limit (ComfyUI `--max-upload-size`), reported by `/features`.
    pub max_upload_size: u64,
    /// Serve the ComfyUI frontend from this folder, like ComfyUI's `--front-end-root`:
    /// `index.html` at `/` and its static files, so the simulator alone opens in a browser.
    pub front_end_root: Option<PathBuf>,
    /// A path prefix (`/token`) every route lives under; anything else answers 404. With a
    /// random token, only whoever started the simulator can reach it (it has no login, like
    /// ComfyUI itself). See [`normalize_base_path`].
    pub base_path: Option<String>,
}

/// A fresh `/<32 hex digits>` prefix (122 random bits): give it to [`SimConfig::base_path`] so
/// that only whoever started the simulator can reach it.
pub fn random_base_path() -> String {
    format!("/{}", uuid::Uuid::new_v4().simple())
}

/// `/a/b/` -> `Some("/a/b")`, `""` or `/` -> `None`. Segments are letters, digits, `-`, `_`,
/// `.` and `~` (no `.` or `..` segment).
pub fn normalize_base_path(raw: &str) -> Result<Option<String>, SimError> {
    let bad = || SimError::Config {
        key: "base path",
        value: raw.to_string(),
    };
    let trimmed = raw.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(None);
    }
    let rest = trimmed.strip_prefix('/').ok_or_else(bad)?;
    for seg in rest.split('/') {
        let ok_chars = seg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'));
        if seg.is_empty() || seg == "." || seg == ".." || !ok_chars {
            return Err(bad());
        }
    }
    Ok(Some(trimmed.to_string()))
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            object_info: None,
            step_ms: DEFAULT_STEP_MS,
            data_dir: None,
            faults: Vec::new(),
            cache: true,
            max_upload_size: DEFAULT_MAX_UPLOAD,
            front_end_root: None,
            base_path: None,
        }
    }
}

impl SimConfig {
    /// Defaults overridden by `SIMULATOR_OBJECT_INFO`, `SIMULATOR_STEP_MS`, `SIMULATOR_DATA_DIR`,
    /// `SIMULATOR_FAULTS` (comma-separated fault specs, see [`Fault::from_str`]),
    /// `SIMULATOR_CACHE` (`classic` or `none`), `SIMULATOR_FRONT_END_ROOT` and
    /// `SIMULATOR_BASE_PATH`.
    pub fn from_env() -> Result<Self, SimError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, SimError> {
        let mut cfg = Self::default();
        if let Some(p) = get("SIMULATOR_OBJECT_INFO").filter(|s| !s.is_empty()) {
            cfg.object_info = Some(PathBuf::from(p));
        }
        if let Some(v) = get("SIMULATOR_STEP_MS").filter(|s| !s.is_empty()) {
            cfg.step_ms = v.trim().parse().map_err(|_| SimError::Config {
                key: "SIMULATOR_STEP_MS",
                value: v.clone(),
            })?;
        }
        if let Some(p) = get("SIMULATOR_DATA_DIR").filter(|s| !s.is_empty()) {
            cfg.data_dir = Some(PathBuf::from(p));
        }
        if let Some(v) = get("SIMULATOR_FAULTS") {
            for spec in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                cfg.faults.push(spec.parse()?);
            }
        }
        if let Some(p) = get("SIMULATOR_FRONT_END_ROOT").filter(|s| !s.is_empty()) {
            cfg.front_end_root = Some(PathBuf::from(p));
        }
        if let Some(v) = get("SIMULATOR_BASE_PATH") {
            cfg.base_path = normalize_base_path(&v)?;
        }
        if let Some(v) = get("SIMULATOR_CACHE").filter(|s| !s.is_empty()) {
            cfg.cache = match v.trim() {
                "classic" | "1" | "true" => true,
                "none" | "0" | "false" => false,
                _ => {
                    return Err(SimError::Config {
                        key: "SIMULATOR_CACHE",
                        value: v,
                    });
                }
            };
        }
        Ok(cfg)
    }
}

/// A fault to switch on. JSON form (for `POST /sim/fault`): `{"fault": "slow_view", "ms": 300}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum Fault {
    /// Switch every fault off.
    Clear,
    /// Close the listener (connects are refused) and cut every open connection. With `for_ms`
    /// the listener comes back by itself on the same address.
    RefuseConnections {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_ms: Option<u64>,
    },
    /// `POST /prompt` answers 500 (ComfyUI's text/plain "Server got itself in trouble").
    PromptError,
    /// One-shot: at the next point inside a running job, every WebSocket is dropped without a
    /// close frame. The job itself goes on and lands in history.
    DropWebsocket,
    /// Connections are accepted but no HTTP request is answered (except `/sim/*`) and the
    /// running job stops progressing, until cleared (or `for_ms` passes).
    Hang {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_ms: Option<u64>,
    },
    /// Act like a fresh replica: history and pending queue are dropped at once.
    ForgetHistory,
    /// One-shot: the next job to end runs and reports as usual on the socket, but is not
    /// kept in the history (as if the server restarted right after it, outputs kept on disk).
    ForgetNextHistory,
    /// Delay every `/view` answer by `ms` (0 switches it off).
    SlowView { ms: u64 },
    /// Register each new WebSocket `ms` after its upgrade was answered (0 switches it off).
    /// ComfyUI registers a socket only after it sent the 101, and a message for a client id
    /// that has no socket yet is lost; under load that gap widens. The `status` greeting
    /// comes once the socket is registered.
    SlowWsRegister { ms: u64 },
    /// One-shot: at the next point inside a running job the server stops abruptly (listener and
    /// every socket closed; the binary exits with status 137).
    DieMidJob,
}

impl FromStr for Fault {
    type Err = SimError;

    /// CLI/env spelling: `clear`, `refuse-connections[:MS]`, `prompt-error`, `drop-websocket`,
    /// `hang[:MS]`, `forget-history`, `slow-view:MS`, `slow-ws-register:MS`, `die-mid-job` (`_` works as well as `-`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SimError::FaultSpec(s.to_string());
        let norm = s.trim().replace('_', "-");
        let (name, arg) = match norm.split_once(':') {
            Some((n, a)) => (n.to_string(), Some(a.to_string())),
            None => (norm.clone(), None),
        };
        let ms = |a: Option<String>| -> Result<Option<u64>, SimError> {
            a.map(|v| v.trim().parse::<u64>().map_err(|_| bad()))
                .transpose()
        };
        Ok(match name.as_str() {
            "clear" | "none" if arg.is_none() => Fault::Clear,
            "refuse-connections" | "refuse" => Fault::RefuseConnections { for_ms: ms(arg)? },
            "prompt-error" | "prompt-500" if arg.is_none() => Fault::PromptError,
            "drop-websocket" | "drop-ws" if arg.is_none() => Fault::DropWebsocket,
            "hang" => Fault::Hang { for_ms: ms(arg)? },
            "forget-history" if arg.is_none() => Fault::ForgetHistory,
            "forget-next-history" if arg.is_none() => Fault::ForgetNextHistory,
            "slow-view" => Fault::SlowView {
                ms: ms(arg)?.ok_or_else(bad)?,
            },
            "slow-ws-register" => Fault::SlowWsRegister {
                ms: ms(arg)?.ok_or_else(bad)?,
            },
            "die-mid-job" | "die" if arg.is_none() => Fault::DieMidJob,
            _ => return Err(bad()),
        })
    }
}

/// Which faults are switched on right now (part of `GET /sim/state`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveFaults {
    pub refuse_connections: bool,
    pub prompt_error: bool,
    /// Armed and not yet fired.
    pub drop_websocket: bool,
    pub hang: bool,
    pub slow_view_ms: u64,
    pub slow_ws_register_ms: u64,
    /// Armed and not yet fired.
    pub die_mid_job: bool,
    /// Armed and not yet fired.
    pub forget_next_history: bool,
}

impl ActiveFaults {
    pub fn any(&self) -> bool {
        *self != Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fault_specs() {
        assert_eq!(
            "slow-view:250".parse::<Fault>().unwrap(),
            Fault::SlowView { ms: 250 }
        );
        assert_eq!(
            "refuse_connections".parse::<Fault>().unwrap(),
            Fault::RefuseConnections { for_ms: None }
        );
        assert_eq!(
            "hang:10".parse::<Fault>().unwrap(),
            Fault::Hang { for_ms: Some(10) }
        );
        assert!("slow-view".parse::<Fault>().is_err());
        assert_eq!(
            "slow-ws-register:40".parse::<Fault>().unwrap(),
            Fault::SlowWsRegister { ms: 40 }
        );
        assert!("explode".parse::<Fault>().is_err());
        let f: Fault = serde_json::from_str(r#"{"fault":"slow_view","ms":5}"#).unwrap();
        assert_eq!(f, Fault::SlowView { ms: 5 });
        let f: Fault = serde_json::from_str(r#"{"fault":"hang"}"#).unwrap();
        assert_eq!(f, Fault::Hang { for_ms: None });
    }

    #[test]
    fn env_lookup() {
        let cfg = SimConfig::from_lookup(|k| match k {
            "SIMULATOR_OBJECT_INFO" => Some("/x/object_info.json".into()),
            "SIMULATOR_STEP_MS" => Some("7".into()),
            "SIMULATOR_FAULTS" => Some("prompt-error, slow-view:3".into()),
            "SIMULATOR_CACHE" => Some("none".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(cfg.object_info, Some(PathBuf::from("/x/object_info.json")));
        assert_eq!(cfg.step_ms, 7);
        assert_eq!(
            cfg.faults,
            vec![Fault::PromptError, Fault::SlowView { ms: 3 }]
        );
        assert!(!cfg.cache);
        assert!(
            SimConfig::from_lookup(|k| (k == "SIMULATOR_STEP_MS").then(|| "x".into())).is_err()
        );
        let cfg = SimConfig::from_lookup(|k| (k == "SIMULATOR_BASE_PATH").then(|| "/abc/".into()))
            .unwrap();
        assert_eq!(cfg.base_path.as_deref(), Some("/abc"));
    }

    #[test]
    fn base_paths() {
        let a = random_base_path();
        assert_eq!(
            normalize_base_path(&a).unwrap().as_deref(),
            Some(a.as_str())
        );
        assert_eq!(a.len(), 33);
        assert_ne!(a, random_base_path());
        assert_eq!(normalize_base_path("").unwrap(), None);
        assert_eq!(normalize_base_path("/").unwrap(), None);
        assert_eq!(
            normalize_base_path("/a1_b-c.d~/e/").unwrap().as_deref(),
            Some("/a1_b-c.d~/e")
        );
        for bad in [
            "abc", "/a//b", "/../x", "/a/./b", "/a b", "/a?b", "/a%2Fb", "/ä",
        ] {
            assert!(normalize_base_path(bad).is_err(), "{bad}");
        }
    }
}
