//! The provider's queue-load autoscaling, as documented: `queue_load = waiting requests
//! / replicas` (a request a replica picked up no longer counts); above the threshold for
//! the scale-up delay, one replica is added (up to the maximum); below it for the
//! scale-down delay, one is stopped (down to the minimum), busy or not. Pure.

use tokio::time::Instant;

use crate::config::{DeploymentSettings, ScaleDownPick};

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting out the cold start; no process yet.
    Provisioning,
    /// Process started, not reported healthy yet.
    Starting,
    /// Healthy (ready or busy).
    Running,
    /// SIGTERM sent (or about to be).
    Terminating,
}

/// What the policy needs to know about a replica.
#[derive(Debug, Clone)]
pub struct ReplicaView {
    pub id: String,
    pub phase: Phase,
    pub busy: bool,
    pub created: Instant,
}

/// Since when the load has been above / below the threshold.
#[derive(Debug, Clone, Default)]
pub struct Timers {
    pub above_since: Option<Instant>,
    pub below_since: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop(String),
}

/// One step of the autoscaler.
pub fn decide(
    s: &DeploymentSettings,
    now: Instant,
    queue_len: usize,
    replicas: &[ReplicaView],
    t: &mut Timers,
) -> Vec<Action> {
    let active: Vec<&ReplicaView> = replicas
        .iter()
        .filter(|r| r.phase != Phase::Terminating)
        .collect();
    let n = active.len();
    if n < s.min_replicas {
        t.above_since = None;
        t.below_since = None;
        return vec![Action::Start; s.min_replicas - n];
    }
    // With no replica, any waiting request is infinite load.
    let load = if n == 0 {
        if queue_len > 0 { f64::INFINITY } else { 0.0 }
    } else {
        queue_len as f64 / n as f64
    };
    if load > s.threshold {
        t.below_since = None;
        let since = *t.above_since.get_or_insert(now);
        if n < s.max_replicas && now.saturating_duration_since(since) >= s.scale_up_delay {
            t.above_since = Some(now);
            return vec![Action::Start];
        }
        return vec![];
    }
    t.above_since = None;
    if load < s.threshold && n > s.min_replicas {
        let since = *t.below_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= s.scale_down_delay {
            t.below_since = Some(now);
            if let Some(victim) = pick(s.scale_down_pick, &active) {
                return vec![Action::Stop(victim)];
            }
        }
        return vec![];
    }
    t.below_since = None;
    vec![]
}

fn pick(how: ScaleDownPick, active: &[&ReplicaView]) -> Option<String> {
    let mut v: Vec<&&ReplicaView> = active.iter().collect();
    match how {
        ScaleDownPick::Newest => v.sort_by_key(|r| std::cmp::Reverse(r.created)),
        ScaleDownPick::Oldest => v.sort_by_key(|r| r.created),
        ScaleDownPick::IdleFirst => v.sort_by_key(|r| {
            let rank = match (r.phase, r.busy) {
                (Phase::Provisioning | Phase::Starting, _) => 0,
                (_, false) => 1,
                (_, true) => 2,
            };
            (rank, std::cmp::Reverse(r.created))
        }),
    }
    v.first().map(|r| r.id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TtlExpiry;
    use std::time::Duration;

    fn settings() -> DeploymentSettings {
        DeploymentSettings {
            name: "d".into(),
            spot: false,
            gpu: "H200".into(),
            min_replicas: 0,
            max_replicas: 3,
            concurrency: 1,
            threshold: 1.0,
            scale_up_delay: Duration::ZERO,
            scale_down_delay: Duration::from_secs(60),
            cold_start: Duration::ZERO,
            grace: Duration::from_secs(30),
            ttl: Duration::from_secs(300),
            ttl_expiry: TtlExpiry::Cut,
            scale_down_pick: ScaleDownPick::IdleFirst,
            step_ms: 50,
        }
    }

    fn r(id: &str, phase: Phase, busy: bool, created: Instant) -> ReplicaView {
        ReplicaView {
            id: id.into(),
            phase,
            busy,
            created,
        }
    }

    #[test]
    fn scales_from_zero_and_up_to_the_maximum() {
        let s = settings();
        let t0 = Instant::now();
        let mut t = Timers::default();
        assert_eq!(decide(&s, t0, 0, &[], &mut t), vec![]);
        assert_eq!(decide(&s, t0, 1, &[], &mut t), vec![Action::Start]);
        // 1 waiting on 1 replica: load 1, not above the threshold.
        let one = [r("a", Phase::Provisioning, false, t0)];
        assert_eq!(decide(&s, t0, 1, &one, &mut t), vec![]);
        // 3 waiting on 1: add one per step.
        assert_eq!(decide(&s, t0, 3, &one, &mut t), vec![Action::Start]);
        let three = [
            r("a", Phase::Running, true, t0),
            r("b", Phase::Running, true, t0),
            r("c", Phase::Starting, false, t0),
        ];
        assert_eq!(decide(&s, t0, 9, &three, &mut t), vec![], "at the maximum");
    }

    #[test]
    fn the_scale_up_delay_applies() {
        let mut s = settings();
        s.scale_up_delay = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut t = Timers::default();
        let one = [r("a", Phase::Running, true, t0)];
        assert_eq!(decide(&s, t0, 4, &one, &mut t), vec![]);
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(4), 4, &one, &mut t),
            vec![]
        );
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(5), 4, &one, &mut t),
            vec![Action::Start]
        );
        // The load fell meanwhile: the timer starts afresh.
        let mut t = Timers::default();
        decide(&s, t0, 4, &one, &mut t);
        decide(&s, t0 + Duration::from_secs(3), 0, &one, &mut t);
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(6), 4, &one, &mut t),
            vec![]
        );
    }

    #[test]
    fn scale_down_counts_only_the_queue_so_a_busy_replica_can_be_stopped() {
        let s = settings();
        let t0 = Instant::now();
        let mut t = Timers::default();
        let busy = [r("a", Phase::Running, true, t0)];
        assert_eq!(decide(&s, t0, 0, &busy, &mut t), vec![]);
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(59), 0, &busy, &mut t),
            vec![]
        );
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(60), 0, &busy, &mut t),
            vec![Action::Stop("a".into())],
            "the documented hazard: in-flight requests do not count"
        );
        // One per delay.
        let two = [
            r("a", Phase::Running, true, t0),
            r("b", Phase::Running, false, t0 + Duration::from_secs(1)),
        ];
        let mut t = Timers::default();
        decide(&s, t0, 0, &two, &mut t);
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(60), 0, &two, &mut t),
            vec![Action::Stop("b".into())],
            "idle first"
        );
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(61), 0, &two, &mut t),
            vec![]
        );
    }

    #[test]
    fn minimum_replicas_are_kept_and_picks_follow_the_setting() {
        let mut s = settings();
        s.min_replicas = 2;
        let t0 = Instant::now();
        let mut t = Timers::default();
        assert_eq!(
            decide(&s, t0, 0, &[], &mut t),
            vec![Action::Start, Action::Start]
        );
        let two = [
            r("old", Phase::Running, false, t0),
            r("new", Phase::Running, true, t0 + Duration::from_secs(1)),
        ];
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(999), 0, &two, &mut t),
            vec![]
        );
        s.min_replicas = 0;
        s.scale_down_pick = ScaleDownPick::Newest;
        let mut t = Timers::default();
        decide(&s, t0, 0, &two, &mut t);
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(60), 0, &two, &mut t),
            vec![Action::Stop("new".into())]
        );
        s.scale_down_pick = ScaleDownPick::Oldest;
        let mut t = Timers::default();
        decide(&s, t0, 0, &two, &mut t);
        assert_eq!(
            decide(&s, t0 + Duration::from_secs(60), 0, &two, &mut t),
            vec![Action::Stop("old".into())]
        );
        // Terminating replicas do not count.
        let going = [r("x", Phase::Terminating, true, t0)];
        let mut t = Timers::default();
        assert_eq!(decide(&s, t0, 1, &going, &mut t), vec![Action::Start]);
    }
}
