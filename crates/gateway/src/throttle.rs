//! Sign-in throttling, per (client address, account) and per client address, with delays
//! that grow with each failure past a free allowance. Nothing here is keyed by the account
//! alone, so nobody's failures can keep anybody else out: a wrong password typed a hundred
//! times from one address slows down only that address.
//!
//! Pure logic: the caller passes the time. An attempt is counted when it begins (in the same
//! lock as the check), so a burst of parallel guesses cannot all pass the check before the
//! first failure is recorded; a success gives the attempt back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How much failing is free, and how the delays grow after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures from one address for one account before delays start.
    pub free_per_account: u32,
    /// Failures from one address over all accounts before delays start (a room behind one
    /// NAT shares an address).
    pub free_per_client: u32,
    /// The first delay; each further failure doubles it.
    pub base_delay: Duration,
    /// Delays never grow past this.
    pub max_delay: Duration,
    /// Failures are forgotten this long after the last one.
    pub forget_after: Duration,
}

impl ThrottleConfig {
    /// `free` failures per (address, account), ten times that per address.
    pub fn new(free: u32, base_delay: Duration, forget_after: Duration) -> Self {
        ThrottleConfig {
            free_per_account: free,
            free_per_client: free.saturating_mul(10),
            base_delay,
            max_delay: Duration::from_secs(60),
            forget_after,
        }
    }

    /// How long after the latest of `failures` failures the next attempt may begin.
    pub fn delay(&self, failures: u32, free: u32) -> Duration {
        if failures < free {
            return Duration::ZERO;
        }
        let doublings = (failures - free).min(30);
        self.base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }
}

/// The address a client is known by: an IPv6 host usually has a whole /64 to pick
/// addresses from, so that is one client.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(net.into())
        }
        v4 => v4,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Client(IpAddr),
    /// The account name in lower case, so varying its case buys no fresh allowance.
    Account(IpAddr, String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
}

/// An attempt that has begun: counted as a failure unless [`Throttle::succeeded`] or
/// [`Throttle::abandoned`] gives it back. Dropping it (a wrong password, or a client that
/// hung up mid-check) keeps it counted.
#[derive(Debug)]
#[must_use = "an attempt counts as a failure until it is settled"]
pub struct Attempt {
    client: IpAddr,
    account: String,
}

/// Bounds the memory a spray of addresses could take.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug)]
pub struct Throttle {
    cfg: ThrottleConfig,
    entries: Mutex<HashMap<Key, Entry>>,
}

impl Throttle {
    pub fn new(cfg: ThrottleConfig) -> Self {
        Throttle {
            cfg,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> ThrottleConfig {
        self.cfg
    }

    fn keys(client: IpAddr, account: &str) -> [(Key, bool); 2] {
        let client = client_key(client);
        [
            (Key::Account(client, account.to_lowercase()), true),
            (Key::Client(client), false),
        ]
    }

    /// Begins a sign-in attempt by `client` for `account` at `now`, or says how long to wait.
    pub fn begin(&self, client: IpAddr, account: &str, now: Instant) -> Result<Attempt, Duration> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let keys = Self::keys(client, account);
        let mut wait = Duration::ZERO;
        for (key, per_account) in &keys {
            if let Some(e) = map.get(key) {
                if now.saturating_duration_since(e.last) >= self.cfg.forget_after {
                    continue;
                }
                let free = self.free(*per_account);
                let allowed_at = e.last + self.cfg.delay(e.failures, free);
                wait = wait.max(allowed_at.saturating_duration_since(now));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if map.len() >= MAX_ENTRIES {
            let forget = self.cfg.forget_after;
            map.retain(|_, e| now.saturating_duration_since(e.last) < forget);
        }
        for (key, _) in keys {
            let e = map.entry(key).or_insert(Entry {
                failures: 0,
                last: now,
            });
            if now.saturating_duration_since(e.last) >= self.cfg.forget_after {
                e.failures = 0;
            }
            e.failures = e.failures.saturating_add(1);
            e.last = e.last.max(now);
        }
        Ok(Attempt {
            client: client_key(client),
            account: account.to_lowercase(),
        })
    }

    fn free(&self, per_account: bool) -> u32 {
        if per_account {
            self.cfg.free_per_account
        } else {
            self.cfg.free_per_client
        }
    }

    /// The right password: the account's failures from this address are forgiven, and the
    /// attempt does not count against the address.
    pub fn succeeded(&self, attempt: Attempt) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&Key::Account(attempt.client, attempt.account));
        Self::give_back(&mut map, Key::Client(attempt.client));
    }

    /// Neither right nor wrong (the store could not answer): the attempt does not count.
    pub fn abandoned(&self, attempt: Attempt) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        Self::give_back(&mut map, Key::Account(attempt.client, attempt.account));
        Self::give_back(&mut map, Key::Client(attempt.client));
    }

    fn give_back(map: &mut HashMap<Key, Entry>, key: Key) {
        if let Some(e) = map.get_mut(&key) {
            e.failures = e.failures.saturating_sub(1);
            if e.failures == 0 {
                map.remove(&key);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn cfg() -> ThrottleConfig {
        ThrottleConfig::new(3, Duration::from_secs(1), Duration::from_secs(300))
    }

    fn fail(t: &Throttle, client: IpAddr, account: &str, now: Instant) -> Result<(), Duration> {
        t.begin(client, account, now).map(drop)
    }

    #[test]
    fn nobody_else_is_locked_out_by_someone_elses_failures() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        // The attacker: ten wrong passwords for user002, then refused with a delay.
        let mut refused = 0;
        for i in 0..10 {
            if fail(&t, A, "user002", now + Duration::from_millis(i)).is_err() {
                refused += 1;
            }
        }
        assert!(refused > 0, "the attacker is slowed down");
        // The participant, from their own address, gets in at once.
        let ok = t
            .begin(B, "user002", now + Duration::from_millis(20))
            .unwrap();
        t.succeeded(ok);
        // Also in another case spelling (the key ignores case, the budget stays the attacker's).
        assert!(
            t.begin(A, "USER002", now + Duration::from_millis(21))
                .is_err()
        );
        assert!(
            t.begin(B, "USER002", now + Duration::from_millis(21))
                .is_ok()
        );
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let c = cfg();
        let t = Throttle::new(c);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..12 {
            loop {
                match t.begin(A, "u", now) {
                    Ok(a) => {
                        drop(a); // a wrong password
                        break;
                    }
                    Err(w) => {
                        waits.push(w);
                        now += w;
                    }
                }
            }
        }
        let secs: Vec<u64> = waits.iter().map(|w| w.as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(c.delay(1000, 3), c.max_delay);
    }

    #[test]
    fn a_success_forgives_the_accounts_failures() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        for _ in 0..2 {
            fail(&t, A, "u", now).unwrap();
        }
        t.succeeded(t.begin(A, "u", now).unwrap());
        // Three more free failures, not one.
        for _ in 0..3 {
            fail(&t, A, "u", now).unwrap();
        }
        assert!(t.begin(A, "u", now).is_err());
    }

    #[test]
    fn an_abandoned_attempt_does_not_count() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        for _ in 0..10 {
            let a = t.begin(A, "u", now).unwrap();
            t.abandoned(a);
        }
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn attempts_in_flight_count_before_they_fail() {
        // Parallel guesses: every begin counts at once, so only the free allowance passes.
        let t = Throttle::new(cfg());
        let now = Instant::now();
        let held: Vec<Result<Attempt, Duration>> = (0..20).map(|_| t.begin(A, "u", now)).collect();
        assert_eq!(held.iter().filter(|r| r.is_ok()).count(), 3);
    }

    #[test]
    fn one_address_trying_many_accounts_is_slowed_down() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        // 30 free per address: ten accounts, three each.
        for i in 0..30 {
            fail(&t, A, &format!("user{:03}", i / 3), now).unwrap();
        }
        assert!(t.begin(A, "user999", now).is_err(), "a fresh account name");
        assert!(t.begin(B, "user999", now).is_ok(), "another address");
    }

    #[test]
    fn an_ipv6_client_is_its_64_bit_prefix() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        for i in 0..3u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i]);
            fail(&t, ip, "u", now).unwrap();
        }
        let same_net = IpAddr::from([0x2001, 0xdb8, 0, 1, 0xffff, 1, 2, 3]);
        assert!(
            t.begin(same_net, "u", now).is_err(),
            "a new address in the same /64"
        );
        let other_net = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert!(t.begin(other_net, "u", now).is_ok());
    }

    #[test]
    fn failures_are_forgotten_after_the_window() {
        let t = Throttle::new(cfg());
        let now = Instant::now();
        for _ in 0..3 {
            fail(&t, A, "u", now).unwrap();
        }
        assert!(t.begin(A, "u", now).is_err());
        let later = now + Duration::from_secs(300);
        for _ in 0..3 {
            fail(&t, A, "u", later).unwrap();
        }
    }

    proptest! {
        /// Whatever any other addresses did, an address with no failures of its own is never
        /// refused, for any account.
        #[test]
        fn a_clean_address_is_never_refused(
            ops in proptest::collection::vec((0u8..5, 0u8..4, any::<bool>(), 0u64..5_000), 0..200),
            account in 0u8..4,
        ) {
            let t = Throttle::new(cfg());
            let start = Instant::now();
            let mut now = start;
            for (client, acct, success, step) in ops {
                now += Duration::from_millis(step);
                let ip = IpAddr::from([10, 0, 1, client]);
                if let Ok(a) = t.begin(ip, &format!("u{acct}"), now) {
                    if success { t.succeeded(a) } else { drop(a) }
                }
            }
            let clean = IpAddr::from([10, 0, 2, 1]);
            let name = format!("u{account}");
            prop_assert!(t.begin(clean, &name, now).is_ok());
        }

        /// The delay never shrinks as failures grow, and never passes the cap.
        #[test]
        fn delays_are_monotone(n in 0u32..200) {
            let c = cfg();
            prop_assert!(c.delay(n, 3) <= c.delay(n + 1, 3));
            prop_assert!(c.delay(n, 3) <= c.max_delay);
        }
    }
}
