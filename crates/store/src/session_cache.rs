//! Remembers recent session lookups so an authenticated request does not cost a database
//! read: a page load makes ~60 requests, and each submission one more.
//!
//! Changes made through the same store (logout, disabling or removing an account, a new
//! password, a sign-in) clear it at once. Changes made by another process on the same
//! database (`comfyume users disable` while the server runs) clear it as soon as the server's
//! poll of the account changes sees them (every second), and are seen within [`RECHECK`]
//! in any case.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::User;

/// How long a looked-up session is trusted without asking the database again.
pub const RECHECK: Duration = Duration::from_secs(2);
/// Bounds the memory a spray of tokens could take.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Default)]
pub struct SessionCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bumped by every invalidation: a lookup that started before it is not kept.
    generation: u64,
    /// Token hash -> (user, session expiry in ms since the epoch, when it was read).
    entries: HashMap<Vec<u8>, (User, i64, Instant)>,
}

impl SessionCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached user for `token_hash`, if read within [`RECHECK`] and not expired.
    pub fn get(&self, token_hash: &[u8], now_ms: i64) -> Option<User> {
        let g = self.lock();
        g.entries
            .get(token_hash)
            .filter(|(_, expires, read)| *expires > now_ms && read.elapsed() < RECHECK)
            .map(|(u, _, _)| u.clone())
    }

    /// Call before reading the database; pass the value to [`SessionCache::put`].
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps a lookup unless something changed since `generation` was taken.
    pub fn put(&self, generation: u64, token_hash: Vec<u8>, user: User, expires_ms: i64) {
        let mut g = self.lock();
        if g.generation != generation {
            return;
        }
        if g.entries.len() >= MAX_ENTRIES {
            g.entries.retain(|_, (_, _, read)| read.elapsed() < RECHECK);
            if g.entries.len() >= MAX_ENTRIES {
                g.entries.clear();
            }
        }
        g.entries
            .insert(token_hash, (user, expires_ms, Instant::now()));
    }

    /// Forgets everything (after any change to accounts or sessions).
    pub fn invalidate(&self) {
        let mut g = self.lock();
        g.generation += 1;
        g.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    fn user(name: &str) -> User {
        User {
            name: name.into(),
            role: Role::Participant,
            disabled: false,
            created_at_ms: 0,
            last_login_ms: None,
        }
    }

    #[test]
    fn hits_until_expiry_or_invalidation() {
        let c = SessionCache::default();
        let g = c.generation();
        c.put(g, b"t".to_vec(), user("a"), 1_000);
        assert_eq!(c.get(b"t", 999).map(|u| u.name), Some("a".into()));
        assert!(
            c.get(b"t", 1_000).is_none(),
            "expired sessions are not served"
        );
        assert!(c.get(b"other", 0).is_none());
        c.invalidate();
        assert!(c.get(b"t", 0).is_none());
    }

    #[test]
    fn a_lookup_that_raced_a_change_is_not_kept() {
        let c = SessionCache::default();
        let g = c.generation();
        c.invalidate(); // e.g. logout committed while the lookup was reading
        c.put(g, b"t".to_vec(), user("a"), i64::MAX);
        assert!(c.get(b"t", 0).is_none());
    }

    #[test]
    fn memory_stays_bounded() {
        let c = SessionCache::default();
        for i in 0..(MAX_ENTRIES + 10) {
            let g = c.generation();
            c.put(g, i.to_le_bytes().to_vec(), user("a"), i64::MAX);
        }
        assert!(c.lock().entries.len() <= MAX_ENTRIES);
    }
}
