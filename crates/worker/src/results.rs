//! Finished jobs kept for idempotent retries: the final event and the delivered files,
//! bounded by age and by bytes on disk; the oldest go first.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use comfyume_wire::worker::{Delivery, Event, FileRef, StoreRef};
use tokio::time::Instant;

/// A file a finished job delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptFile {
    pub file: FileRef,
    pub size: u64,
    pub sha256: String,
    pub delivery: Delivery,
    /// Where it is on this worker's disk (inline deliveries).
    pub path: Option<PathBuf>,
    pub store: Option<StoreRef>,
}

/// A finished job. Its directory is removed when the last holder lets go (a replay may
/// still be reading it after the job left the cache).
#[derive(Debug)]
pub struct Finished {
    pub job_id: String,
    pub files: Vec<KeptFile>,
    pub final_event: Event,
    /// Removed on drop.
    pub dir: Option<PathBuf>,
    /// Bytes kept on disk.
    pub bytes: u64,
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The cache. Pure apart from the clock passed in.
#[derive(Debug)]
pub struct Results {
    max_age: Duration,
    max_bytes: u64,
    bytes: u64,
    entries: VecDeque<(Instant, Arc<Finished>)>,
}

impl Results {
    pub fn new(max_age: Duration, max_bytes: u64) -> Self {
        Results {
            max_age,
            max_bytes,
            bytes: 0,
            entries: VecDeque::new(),
        }
    }

    pub fn get(&mut self, job_id: &str, now: Instant) -> Option<Arc<Finished>> {
        self.expire(now);
        self.entries
            .iter()
            .find(|(_, f)| f.job_id == job_id)
            .map(|(_, f)| f.clone())
    }

    /// Keeps `f`; drops what no longer fits (possibly `f` itself when it alone is larger
    /// than the byte budget).
    pub fn insert(&mut self, f: Finished, now: Instant) {
        self.entries.retain(|(_, old)| old.job_id != f.job_id);
        self.bytes = self.entries.iter().map(|(_, e)| e.bytes).sum();
        self.bytes += f.bytes;
        self.entries.push_back((now, Arc::new(f)));
        self.expire(now);
    }

    /// Drops what is too old (run periodically, so kept outputs leave the disk even
    /// when no request comes).
    pub fn sweep(&mut self, now: Instant) {
        self.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, f)) = self.entries.front() {
            let too_old = now.saturating_duration_since(*at) > self.max_age;
            if !too_old && self.bytes <= self.max_bytes {
                break;
            }
            self.bytes -= f.bytes;
            self.entries.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comfyume_wire::worker::Timing;

    fn finished(id: &str, bytes: u64, dir: Option<PathBuf>) -> Finished {
        Finished {
            job_id: id.into(),
            files: vec![],
            final_event: Event::Aborted {
                job_id: id.into(),
                reason: comfyume_wire::worker::AbortReason::Internal,
                message: String::new(),
                timing: Timing::default(),
            },
            dir,
            bytes,
        }
    }

    #[test]
    fn bounded_by_age_and_bytes_oldest_first() {
        let t0 = Instant::now();
        let mut r = Results::new(Duration::from_secs(10), 100);
        r.insert(finished("a", 40, None), t0);
        r.insert(finished("b", 40, None), t0 + Duration::from_secs(5));
        assert!(r.get("a", t0 + Duration::from_secs(6)).is_some());
        // Bytes: c pushes a out.
        r.insert(finished("c", 40, None), t0 + Duration::from_secs(6));
        assert!(r.get("a", t0 + Duration::from_secs(6)).is_none());
        assert!(r.get("b", t0 + Duration::from_secs(6)).is_some());
        // Age: b is older than 10 s at t0+16.
        assert!(r.get("b", t0 + Duration::from_secs(16)).is_none());
        assert!(r.get("c", t0 + Duration::from_secs(16)).is_some());
        r.sweep(t0 + Duration::from_secs(17));
        assert_eq!(r.len(), 0, "c is older than 10 s now");
        r.insert(finished("c", 40, None), t0 + Duration::from_secs(6));
        // Larger than the whole budget: not kept.
        r.insert(finished("huge", 101, None), t0 + Duration::from_secs(16));
        assert!(r.get("huge", t0 + Duration::from_secs(16)).is_none());
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn directory_goes_with_the_last_holder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("job");
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = Instant::now();
        let mut r = Results::new(Duration::from_secs(10), 100);
        r.insert(finished("a", 1, Some(dir.clone())), t0);
        let held = r.get("a", t0).unwrap();
        let later = t0 + Duration::from_secs(11);
        assert!(r.get("a", later).is_none());
        assert!(dir.exists(), "a replay still reads it");
        drop(held);
        assert!(!dir.exists());
    }
}
