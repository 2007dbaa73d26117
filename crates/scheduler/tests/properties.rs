//! Property tests: random interleavings of enqueue / pick / finished / remove / requeue /
//! runtime changes, checked against a small model kept by the test itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use comfyume_scheduler::{Limits, MAX_LEVEL, Policy, QueuedJob, Scheduler};
use proptest::prelude::*;

const USERS: u8 = 6;

#[derive(Debug, Clone)]
enum Op {
    Enqueue {
        user: u8,
        front: bool,
        priority: Option<u8>,
    },
    Pick {
        advance_ms: i64,
    },
    /// Ends the `n`-th running job (modulo how many run); with `retry` it goes back to the queue.
    Finish {
        n: usize,
        retry: bool,
    },
    /// Cancels the `n`-th queued job (modulo how many wait).
    Remove {
        n: usize,
    },
    SetPolicy(Policy),
    SetUserPriority {
        user: u8,
        level: Option<u8>,
    },
    /// The instructor moves the `n`-th queued job (modulo how many wait) to the front.
    MoveToFront {
        n: usize,
    },
}

fn op(allow_policy_changes: bool) -> impl Strategy<Value = Op> {
    let policy = if allow_policy_changes { 1 } else { 0 };
    prop_oneof![
        6 => (0..USERS, prop::bool::weighted(0.2), prop::option::weighted(0.3, 0..=MAX_LEVEL))
            .prop_map(|(user, front, priority)| Op::Enqueue { user, front, priority }),
        5 => (0i64..3_000).prop_map(|advance_ms| Op::Pick { advance_ms }),
        4 => (any::<usize>(), prop::bool::weighted(0.15)).prop_map(|(n, retry)| Op::Finish { n, retry }),
        1 => any::<usize>().prop_map(|n| Op::Remove { n }),
        policy => prop::sample::select(Policy::ALL.to_vec()).prop_map(Op::SetPolicy),
        policy => (0..USERS, prop::option::of(0..=MAX_LEVEL))
            .prop_map(|(user, level)| Op::SetUserPriority { user, level }),
        policy => any::<usize>().prop_map(|n| Op::MoveToFront { n }),
    ]
}

/// What the test knows independently of the scheduler.
struct Model {
    sched: Scheduler,
    max_running: u32,
    now: i64,
    next_seq: u64,
    queued: BTreeMap<String, QueuedJob>,
    running: Vec<QueuedJob>,
    /// Index in the serve log of each participant's latest pick.
    last_serve: HashMap<String, usize>,
    serves: usize,
    /// Every id ever enqueued and not removed: must all be picked eventually.
    owed: BTreeSet<String>,
    done: BTreeSet<String>,
    /// Jobs moved to the front, front-most first.
    front: Vec<String>,
}

impl Model {
    fn new(policy: Policy, max_running: u32) -> Self {
        Model {
            sched: Scheduler::new(
                policy,
                Limits {
                    max_running_per_user: max_running,
                    max_queued_per_user: None,
                    aging_ms: 2_000,
                },
            ),
            max_running,
            now: 0,
            next_seq: 1,
            queued: BTreeMap::new(),
            running: Vec::new(),
            last_serve: HashMap::new(),
            serves: 0,
            owed: BTreeSet::new(),
            front: Vec::new(),
            done: BTreeSet::new(),
        }
    }

    fn running_of(&self, user: &str) -> u32 {
        self.running.iter().filter(|j| j.user == user).count() as u32
    }

    /// Participants with waiting jobs below their cap.
    fn eligible(&self) -> BTreeSet<String> {
        self.queued
            .values()
            .map(|j| j.user.clone())
            .filter(|u| self.running_of(u) < self.max_running)
            .collect()
    }

    /// Applies one op, checking what can be checked at that moment. `check_rr` asserts the
    /// round-robin fairness property on every pick.
    fn apply(&mut self, op: Op, check_rr: bool) -> Result<(), TestCaseError> {
        match op {
            Op::Enqueue {
                user,
                front,
                priority,
            } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let job = QueuedJob {
                    id: format!("job{seq}"),
                    user: format!("user{user}"),
                    seq,
                    number: if front { -(seq as f64) } else { seq as f64 },
                    priority,
                    enqueued_at_ms: self.now,
                };
                self.sched.enqueue(job.clone()).unwrap();
                self.owed.insert(job.id.clone());
                self.queued.insert(job.id.clone(), job);
            }
            Op::Pick { advance_ms } => {
                self.now += advance_ms;
                let eligible = self.eligible();
                match self.sched.pick(self.now) {
                    None => prop_assert!(
                        eligible.is_empty(),
                        "nothing picked while {eligible:?} could be served"
                    ),
                    Some(job) => {
                        // A job moved to the front goes first once its participant has room.
                        let pinned = self.front.iter().find(|id| {
                            self.queued
                                .get(*id)
                                .is_some_and(|j| eligible.contains(&j.user))
                        });
                        if let Some(p) = pinned {
                            prop_assert_eq!(p, &job.id, "a job moved to the front was passed over");
                        }
                        self.front.retain(|f| *f != job.id);
                        prop_assert!(
                            self.queued.remove(&job.id).is_some(),
                            "{} picked but not waiting (picked twice?)",
                            job.id
                        );
                        prop_assert!(eligible.contains(&job.user), "{} was capped", job.user);
                        if check_rr && let Some(&prev) = self.last_serve.get(&job.user) {
                            for other in eligible.iter().filter(|u| **u != job.user) {
                                let since = self.last_serve.get(other).is_some_and(|&t| t > prev);
                                prop_assert!(
                                    since,
                                    "{} served again while {other} waited unserved since its last turn",
                                    job.user
                                );
                            }
                        }
                        self.last_serve.insert(job.user.clone(), self.serves);
                        self.serves += 1;
                        self.running.push(job);
                    }
                }
            }
            Op::Finish { n, retry } => {
                if !self.running.is_empty() {
                    let job = self.running.remove(n % self.running.len());
                    prop_assert!(self.sched.finished(&job.user));
                    if retry {
                        self.sched.requeue(job.clone()).unwrap();
                        self.queued.insert(job.id.clone(), job);
                    } else {
                        self.done.insert(job.id);
                    }
                }
            }
            Op::Remove { n } => {
                if !self.queued.is_empty() {
                    let id = self
                        .queued
                        .keys()
                        .nth(n % self.queued.len())
                        .unwrap()
                        .clone();
                    let job = self.sched.remove(&id);
                    prop_assert_eq!(job.map(|j| j.id), Some(id.clone()));
                    self.queued.remove(&id);
                    self.owed.remove(&id);
                    self.front.retain(|f| *f != id);
                }
            }
            Op::MoveToFront { n } => {
                if !self.queued.is_empty() {
                    let id = self
                        .queued
                        .keys()
                        .nth(n % self.queued.len())
                        .unwrap()
                        .clone();
                    prop_assert!(self.sched.move_to_front(&id));
                    self.front.retain(|f| *f != id);
                    self.front.insert(0, id);
                }
                prop_assert_eq!(self.sched.front(), self.front.as_slice());
            }
            Op::SetPolicy(p) => self.sched.set_policy(p),
            Op::SetUserPriority { user, level } => self
                .sched
                .set_user_priority(&format!("user{user}"), level)
                .unwrap(),
        }
        self.check_counts()
    }

    fn check_counts(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.sched.len(), self.queued.len());
        for u in 0..USERS {
            let user = format!("user{u}");
            let running = self.sched.running_for(&user);
            prop_assert!(running <= self.max_running, "{user} runs {running}");
            prop_assert_eq!(running, self.running_of(&user));
            let queued = self.queued.values().filter(|j| j.user == user).count();
            prop_assert_eq!(self.sched.queued_for(&user), queued);
        }
        Ok(())
    }

    /// Repeats "pick all that can be picked, then finish everything"; every owed job must come out.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        let mut rounds = 0;
        while !self.queued.is_empty() || !self.running.is_empty() {
            rounds += 1;
            prop_assert!(rounds <= 10_000, "queue does not drain");
            while !self.queued.is_empty() {
                let before = self.queued.len();
                self.apply(Op::Pick { advance_ms: 100 }, false)?;
                if self.queued.len() == before {
                    break;
                }
            }
            while !self.running.is_empty() {
                self.apply(Op::Finish { n: 0, retry: false }, false)?;
            }
        }
        prop_assert_eq!(&self.done, &self.owed, "jobs lost or invented");
        prop_assert!(self.sched.is_empty());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Round robin never serves a participant twice while another participant with waiting,
    /// uncapped jobs has not been served since that participant's previous turn.
    #[test]
    fn round_robin_is_fair(
        max_running in 1u32..=3,
        ops in prop::collection::vec(op(false), 0..250),
    ) {
        let mut m = Model::new(Policy::RoundRobin, max_running);
        for o in ops {
            m.apply(o, true)?;
        }
        m.drain()?;
    }

    /// Under any policy, switched at any time: caps hold, nothing is picked twice or while a
    /// serveable participant is skipped, and every job is eventually picked.
    #[test]
    fn caps_hold_and_nothing_is_lost(
        policy in prop::sample::select(Policy::ALL.to_vec()),
        max_running in 1u32..=3,
        ops in prop::collection::vec(op(true), 0..250),
    ) {
        let mut m = Model::new(policy, max_running);
        for o in ops {
            m.apply(o, false)?;
        }
        m.drain()?;
    }

    /// `projected_order` (and so `position`) is what picks would return with no caps, no
    /// arrivals and the clock frozen.
    #[test]
    fn projected_order_matches_uncapped_picks(
        policy in prop::sample::select(Policy::ALL.to_vec()),
        ops in prop::collection::vec(op(true), 0..150),
    ) {
        let mut m = Model::new(policy, 2);
        for o in ops {
            m.apply(o, false)?;
        }
        let projected: Vec<String> =
            m.sched.projected_order(m.now).iter().map(|j| j.id.clone()).collect();
        for (i, id) in projected.iter().enumerate().step_by(7) {
            prop_assert_eq!(m.sched.position(id, m.now), Some(i));
        }
        let mut uncapped = m.sched.clone();
        uncapped.set_limits(Limits { max_running_per_user: u32::MAX, ..uncapped.limits() });
        let picked: Vec<String> =
            std::iter::from_fn(|| uncapped.pick(m.now)).map(|j| j.id).collect();
        prop_assert_eq!(picked, projected);
    }
}
