//! The queue policy name, as configured (`QUEUE_MODE`) and switched at runtime.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How the next job is chosen among participants. Serialized as `"fifo"`, `"round_robin"`,
/// `"priority"`; see the crate documentation for the exact rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum Policy {
    /// Global submission order of each participant's next job.
    Fifo,
    /// Least-recently-served participant first.
    #[default]
    RoundRobin,
    /// Higher instructor-set level first, round robin within a level, with aging.
    Priority,
}

impl Policy {
    /// Every policy, in the order they are documented.
    pub const ALL: [Policy; 3] = [Policy::Fifo, Policy::RoundRobin, Policy::Priority];

    /// The canonical name, as accepted by `QUEUE_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::RoundRobin => "round_robin",
            Policy::Priority => "priority",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is none of `fifo`, `round_robin`, `priority`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown queue policy {0:?}: expected one of fifo, round_robin, priority")]
pub struct ParsePolicyError(pub String);

impl FromStr for Policy {
    type Err = ParsePolicyError;

    /// Accepts the canonical names, ignoring surrounding whitespace and ASCII case
    /// (env files and admin forms are typed by hand).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| ParsePolicyError(s.to_owned()))
    }
}

impl TryFrom<String> for Policy {
    type Error = ParsePolicyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Policy> for &'static str {
    fn from(p: Policy) -> Self {
        p.as_str()
    }
}
