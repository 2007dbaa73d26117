//! What happens when, decided before the run (pure): the scripted faults laid
//! out over the run, and each participant's day (think, then a burst of Runs,
//! some of them from a tab that is closed right after the click).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The scripted faults, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// A backend's WebSocket cut mid-job (the simulator's `drop-websocket`).
    DropWebsocket,
    /// A backend process SIGKILLed mid-job, restarted after the fault's length.
    KillBackend,
    /// A backend that accepts connections and never answers or progresses
    /// (the simulator's `hang`), for the fault's length.
    HangBackend,
    /// A backend replaced by a server that answers garbage, then restored.
    GarbageBackend,
    /// `comfyume.db` held by another process's exclusive transaction.
    DbLock,
    /// The data directory's file system full.
    DiskFull,
    /// `comfyume serve` SIGKILLed, restarted on the same port and data directory.
    KillServe,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::DropWebsocket,
        FaultKind::KillBackend,
        FaultKind::HangBackend,
        FaultKind::GarbageBackend,
        FaultKind::DbLock,
        FaultKind::DiskFull,
        FaultKind::KillServe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::DropWebsocket => "backend WebSocket cut",
            FaultKind::KillBackend => "backend SIGKILLed mid-job",
            FaultKind::HangBackend => "backend hangs",
            FaultKind::GarbageBackend => "backend answers garbage",
            FaultKind::DbLock => "database locked by another process",
            FaultKind::DiskFull => "data disk full",
            FaultKind::KillServe => "serve SIGKILLed and restarted",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            FaultKind::DropWebsocket => "drop_websocket",
            FaultKind::KillBackend => "kill_backend",
            FaultKind::HangBackend => "hang_backend",
            FaultKind::GarbageBackend => "garbage_backend",
            FaultKind::DbLock => "db_lock",
            FaultKind::DiskFull => "disk_full",
            FaultKind::KillServe => "kill_serve",
        }
    }
}

/// One fault of the schedule: it starts `at` after the run's start and lasts `length`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub kind: FaultKind,
    pub at: Duration,
    pub length: Duration,
}

/// Lays the faults out one after another with equal quiet gaps between them
/// (the queue drains and each fault's effects can be told apart), from 5 % of
/// the run to at most 85 %, so the last one still has time to show its
/// effects while participants submit. An error if they do not fit.
pub fn schedule(run: Duration, faults: &[(FaultKind, Duration)]) -> Result<Vec<Step>, String> {
    if faults.is_empty() {
        return Ok(Vec::new());
    }
    let first = run.mul_f64(0.05);
    let usable = run.mul_f64(0.85).saturating_sub(first);
    let busy: Duration = faults.iter().map(|(_, l)| *l).sum();
    if busy > usable {
        return Err(format!(
            "the faults take {} s but a {} s run has room for {} s of them (5-85 % of the run): give a longer --duration",
            busy.as_secs(),
            run.as_secs(),
            usable.as_secs()
        ));
    }
    let gap = (usable - busy) / faults.len() as u32;
    let mut at = first;
    let mut out = Vec::new();
    for &(kind, length) in faults {
        out.push(Step { kind, at, length });
        at += length + gap;
    }
    Ok(out)
}

/// What a participant does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Reads, tweaks the workflow: no request.
    Think(Duration),
    /// Clicks Run a few times in a row.
    Burst(Vec<Click>),
}

/// One click of Run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Click {
    /// Sampler steps of the Flux.2 graph; 0: the no-model graph.
    pub steps: u32,
    pub seed: u64,
    /// The tab is closed right after the request went out.
    pub closes_tab: bool,
    /// Pause before this click.
    pub pause: Duration,
}

/// How participants behave (all drawn from a seeded generator: a run can be repeated).
#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    pub think_min: Duration,
    pub think_max: Duration,
    pub burst_max: u32,
    pub steps_min: u32,
    pub steps_max: u32,
    /// Share of clicks after which the tab is closed (0..1).
    pub close_tab_share: f64,
    /// Share of clicks on the no-model graph (0..1).
    pub nomodel_share: f64,
}

/// A participant's endless day: think, burst, think, burst, ...
pub struct Day {
    rng: StdRng,
    b: Behaviour,
    next_seed: u64,
    thinking: bool,
}

impl Day {
    pub fn new(seed: u64, participant: usize, b: Behaviour) -> Day {
        let mixed = seed ^ (participant as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Day {
            rng: StdRng::seed_from_u64(mixed),
            b,
            // Distinct seeds per participant, so the simulator's cache never answers a Run.
            next_seed: (participant as u64 + 1) * 1_000_000,
            // Participants open the UI and look at it before their first Run.
            thinking: true,
        }
    }

    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            return lo;
        }
        let ms = self
            .rng
            .random_range(lo.as_millis() as u64..=hi.as_millis() as u64);
        Duration::from_millis(ms)
    }
}

impl Iterator for Day {
    type Item = Action;

    fn next(&mut self) -> Option<Action> {
        let b = self.b;
        let action = if self.thinking {
            Action::Think(self.between(b.think_min, b.think_max))
        } else {
            let n = self.rng.random_range(1..=b.burst_max.max(1));
            let clicks = (0..n)
                .map(|i| {
                    self.next_seed += 1;
                    let nomodel = self.rng.random_bool(b.nomodel_share.clamp(0.0, 1.0));
                    let steps = if nomodel {
                        0
                    } else {
                        self.rng
                            .random_range(b.steps_min.max(1)..=b.steps_max.max(1))
                    };
                    Click {
                        steps,
                        seed: self.next_seed,
                        closes_tab: self.rng.random_bool(b.close_tab_share.clamp(0.0, 1.0)),
                        pause: if i == 0 {
                            Duration::ZERO
                        } else {
                            self.between(Duration::from_millis(150), Duration::from_millis(900))
                        },
                    }
                })
                .collect();
            Action::Burst(clicks)
        };
        self.thinking = !self.thinking;
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn faults_are_spread_in_order_without_overlap() {
        let faults: Vec<(FaultKind, Duration)> =
            FaultKind::ALL.iter().map(|&k| (k, s(5))).collect();
        let plan = schedule(s(100), &faults).unwrap();
        assert_eq!(plan.len(), 7);
        assert_eq!(plan[0].at, s(5));
        for w in plan.windows(2) {
            assert!(w[0].at + w[0].length < w[1].at, "{w:?}");
        }
        let last = plan.last().unwrap();
        assert!(last.at + last.length <= s(85));
        assert_eq!(
            plan.iter().map(|p| p.kind).collect::<Vec<_>>(),
            FaultKind::ALL
        );
    }

    #[test]
    fn a_run_too_short_for_its_faults_is_refused() {
        let e = schedule(s(30), &[(FaultKind::HangBackend, s(40))]).unwrap_err();
        assert!(e.contains("--duration"), "{e}");
        assert!(schedule(s(30), &[]).unwrap().is_empty());
    }

    fn behaviour() -> Behaviour {
        Behaviour {
            think_min: s(2),
            think_max: s(6),
            burst_max: 3,
            steps_min: 4,
            steps_max: 8,
            close_tab_share: 0.2,
            nomodel_share: 0.25,
        }
    }

    #[test]
    fn a_day_alternates_thinking_and_bursts_and_repeats_with_its_seed() {
        let a: Vec<Action> = Day::new(7, 3, behaviour()).take(200).collect();
        let b: Vec<Action> = Day::new(7, 3, behaviour()).take(200).collect();
        assert_eq!(a, b);
        let other: Vec<Action> = Day::new(7, 4, behaviour()).take(200).collect();
        assert_ne!(a, other);
        let mut seeds = std::collections::HashSet::new();
        let (mut closes, mut nomodel, mut clicks) = (0, 0, 0);
        for (i, act) in a.iter().enumerate() {
            match act {
                Action::Think(d) => {
                    assert_eq!(i % 2, 0);
                    assert!(*d >= s(2) && *d <= s(6));
                }
                Action::Burst(c) => {
                    assert_eq!(i % 2, 1);
                    assert!((1..=3).contains(&c.len()));
                    assert_eq!(c[0].pause, Duration::ZERO);
                    for k in c {
                        clicks += 1;
                        assert!(seeds.insert(k.seed), "seed repeated");
                        closes += usize::from(k.closes_tab);
                        if k.steps == 0 {
                            nomodel += 1;
                        } else {
                            assert!((4..=8).contains(&k.steps));
                        }
                    }
                }
            }
        }
        // Both kinds of click happen in a long day.
        assert!(closes > 0 && closes < clicks);
        assert!(nomodel > 0 && nomodel < clicks);
    }
}
