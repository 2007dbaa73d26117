//! Storage quotas (`USER_QUOTA_BYTES`, off by default): a participant's inputs and outputs
//! together. An upload that would take them past it, or a job submitted once they are at
//! it, is refused before anything is written or queued (so such a job never reaches a
//! GPU); a job accepted below the quota keeps all its results even if they pass it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::state::AppState;

/// What a participant's files take, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub inputs: u64,
    pub outputs: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.inputs.saturating_add(self.outputs)
    }
}

/// The sizes of every file in `user`'s input and output folders (links not followed).
pub async fn usage(state: &AppState, user: &str) -> Usage {
    let dirs = state.user_dirs(user);
    let sum = |entries: Vec<crate::fsx::Entry>| {
        entries
            .iter()
            .filter(|e| !e.is_dir)
            .map(|e| e.size)
            .fold(0u64, u64::saturating_add)
    };
    Usage {
        inputs: sum(crate::fsx::walk(&dirs.inputs, &dirs.inputs, true).await),
        outputs: sum(crate::fsx::walk(&dirs.outputs, &dirs.outputs, true).await),
    }
}

/// A refusal: `used` bytes of `quota`, and `adding` more asked for (0 for a job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Exceeded {
    pub used: u64,
    pub quota: u64,
    pub adding: u64,
}

impl Exceeded {
    /// What the participant reads (in the frontend's toast or error dialog).
    pub fn message(&self) -> String {
        let what = if self.adding > 0 {
            format!("This upload ({}) does not fit", human(self.adding))
        } else {
            "No new job can start".to_string()
        };
        format!(
            "{what}: your files take {} of the {} this workshop allows you. Download your work (menu: Download my work), then delete old files, or ask the instructor.",
            human(self.used),
            human(self.quota)
        )
    }
}

/// Whether `adding` more bytes (an upload), or a new job (`adding` 0: it needs room left),
/// fit in `quota` (`None` or 0: no quota) with `used` taken.
pub fn check(quota: Option<u64>, used: u64, adding: u64) -> Result<(), Exceeded> {
    let Some(quota) = quota.filter(|q| *q > 0) else {
        return Ok(());
    };
    let over = if adding > 0 {
        used.saturating_add(adding) > quota
    } else {
        used >= quota
    };
    if over {
        Err(Exceeded {
            used,
            quota,
            adding,
        })
    } else {
        Ok(())
    }
}

/// Bytes for people: `512 B`, `1.5 KB`, `12.3 MB`, `2.0 GB` (powers of 1024).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One lock per participant, held from a quota check to the write it allows, so two
/// uploads at once cannot both fit in the room left for one.
pub fn lock_for(user: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut map = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // Forget the locks nobody holds now and then: accounts come and go.
    if map.len() > 4096 {
        map.retain(|_, l| Arc::strong_count(l) > 1);
    }
    map.entry(user.to_string()).or_default().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_must_fit_and_jobs_need_room_left() {
        assert!(check(None, u64::MAX, 1).is_ok());
        assert!(check(Some(0), 10, 10).is_ok(), "0 means no quota");
        assert!(check(Some(100), 60, 40).is_ok());
        assert_eq!(
            check(Some(100), 60, 41),
            Err(Exceeded {
                used: 60,
                quota: 100,
                adding: 41
            })
        );
        assert!(check(Some(100), 99, 0).is_ok(), "a job with room left");
        assert!(check(Some(100), 100, 0).is_err(), "a job at the quota");
        assert!(check(Some(100), 150, 0).is_err());
        assert!(check(Some(100), u64::MAX, u64::MAX).is_err(), "no overflow");
    }

    #[test]
    fn messages_say_how_much() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KB");
        assert_eq!(human(3 * 1024 * 1024 * 1024), "3.0 GB");
        let m = Exceeded {
            used: 2 * 1024 * 1024,
            quota: 1024 * 1024,
            adding: 0,
        }
        .message();
        assert!(m.contains("2.0 MB of the 1.0 MB"), "{m}");
        assert!(m.starts_with("No new job can start"), "{m}");
    }
}
