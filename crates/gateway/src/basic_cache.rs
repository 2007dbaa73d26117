//! Verified HTTP Basic credentials. Argon2id costs tens of milliseconds by design and a
//! script sends Basic Auth on every request, so a verified credential is remembered with the
//! account's credential revision ([`comfyume_store::UserStore::user_revision`]). Every use
//! reads the revision again: a new password, a disable or a removal, by this process or by
//! the CLI, ends the cached credential at once. Concurrent first uses of one credential wait
//! for a single check instead of hashing (and counting against the throttle) in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// A cached credential is checked again with the password after this long anyway.
const TTL: Duration = Duration::from_secs(60);
/// Bounds the memory a spray of credentials could take.
const MAX_ENTRIES: usize = 10_000;

/// SHA-256 of `name NUL password`: what the cache is keyed by (never the password).
pub type CredentialKey = [u8; 32];

pub fn credential_key(name: &str, password: &str) -> CredentialKey {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(password.as_bytes());
    h.finalize().into()
}

#[derive(Debug, Clone)]
struct Entry {
    user: String,
    revision: i64,
    at: Instant,
}

#[derive(Default)]
pub struct BasicCache {
    entries: Mutex<HashMap<CredentialKey, Entry>>,
    checking: Mutex<HashMap<CredentialKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while one credential is being checked; others with the same credential wait.
pub struct CheckGuard<'a> {
    cache: &'a BasicCache,
    key: CredentialKey,
    lock: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for CheckGuard<'_> {
    fn drop(&mut self) {
        let held = self.lock.take();
        let mut map = self
            .cache
            .checking
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        drop(held);
        // Nobody else waits on it: the entry goes (the map holds one reference).
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

impl BasicCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The account name and the revision it was verified at, if fresh.
    pub fn get(&self, key: &CredentialKey) -> Option<(String, i64)> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|e| e.at.elapsed() < TTL)
            .map(|e| (e.user.clone(), e.revision))
    }

    /// Remembers a credential verified for `user` while its revision was `revision` (read
    /// before the password was checked, so a change racing the check is never hidden).
    pub fn put(&self, key: CredentialKey, user: &str, revision: i64) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, e| e.at.elapsed() < TTL);
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
        }
        map.insert(
            key,
            Entry {
                user: user.to_string(),
                revision,
                at: Instant::now(),
            },
        );
    }

    pub fn forget(&self, key: &CredentialKey) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Drops every cached credential of `user` (its password, or whether it may sign in,
    /// changed).
    pub fn forget_user(&self, user: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, e| e.user != user);
    }

    /// Waits until no other request is checking `key`, then holds it until the guard drops.
    pub async fn check(&self, key: CredentialKey) -> CheckGuard<'_> {
        let lock = {
            let mut map = self.checking.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key).or_default().clone()
        };
        let held = lock.lock_owned().await;
        CheckGuard {
            cache: self,
            key,
            lock: Some(held),
        }
    }

    #[cfg(test)]
    fn checking_len(&self) -> usize {
        self.checking.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_name_and_password() {
        assert_ne!(credential_key("ab", "c"), credential_key("a", "bc"));
        assert_eq!(credential_key("a", "b"), credential_key("a", "b"));
    }

    #[test]
    fn entries_carry_their_revision_and_go_per_user() {
        let c = BasicCache::new();
        let (k1, k2, k3) = (
            credential_key("u1", "p"),
            credential_key("u1", "q"),
            credential_key("u2", "p"),
        );
        c.put(k1, "u1", 7);
        c.put(k2, "u1", 7);
        c.put(k3, "u2", 3);
        assert_eq!(c.get(&k1), Some(("u1".into(), 7)));
        c.forget_user("u1");
        assert_eq!((c.get(&k1), c.get(&k2)), (None, None));
        assert_eq!(c.get(&k3), Some(("u2".into(), 3)));
        c.forget(&k3);
        assert_eq!(c.get(&k3), None);
    }

    #[tokio::test]
    async fn one_check_per_credential_at_a_time() {
        let c = Arc::new(BasicCache::new());
        let k = credential_key("u", "p");
        let first = c.check(k).await;
        let c2 = c.clone();
        let waiter = tokio::spawn(async move {
            let _g = c2.check(k).await;
            c2.get(&k)
        });
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the second check waits for the first"
        );
        c.put(k, "u", 1);
        drop(first);
        assert_eq!(waiter.await.unwrap(), Some(("u".into(), 1)));
        assert_eq!(c.checking_len(), 0, "nothing left behind");
    }
}
