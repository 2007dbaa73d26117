//! The backend's decisions, without I/O: which endpoint an attempt goes to, what
//! state an endpoint is in, how long a cold start will take, what replica time costs,
//! and the words participants see.

use serde::{Deserialize, Serialize};

/// Which endpoint jobs go to, and where a failed attempt goes next. Changed at run
/// time through the admin API; kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    pub active: String,
    #[serde(default)]
    pub failover: Vec<String>,
}

impl Routing {
    /// Active first, then the failover list in order, each name once.
    pub fn chain(&self) -> Vec<String> {
        let mut out = vec![self.active.clone()];
        for f in &self.failover {
            if !out.contains(f) {
                out.push(f.clone());
            }
        }
        out
    }
}

/// The endpoint for an attempt: the first endpoint of the chain that is usable (not
/// passed over) and that this job has not failed on yet. When every usable one has
/// failed it (or our memory of its failures was lost in a restart), the attempt
/// number walks the usable ones in order. When none is usable, the whole chain is
/// used the same way: trying beats failing the job unasked.
pub fn pick_endpoint<'a>(
    chain: &'a [String],
    usable: impl Fn(&str) -> bool,
    failed_here: &[String],
    attempt: u32,
) -> Option<&'a str> {
    let usable_ones: Vec<&String> = chain.iter().filter(|n| usable(n)).collect();
    let candidates: Vec<&String> = if usable_ones.is_empty() {
        chain.iter().collect()
    } else {
        usable_ones
    };
    if candidates.is_empty() {
        return None;
    }
    if let Some(fresh) = candidates.iter().find(|n| !failed_here.contains(n)) {
        // Without a memory of failures (a restart), later attempts still move on.
        if failed_here.is_empty() && attempt > 1 {
            let i = (attempt as usize - 1) % candidates.len();
            return Some(candidates[i].as_str());
        }
        return Some(fresh.as_str());
    }
    let i = (attempt.max(1) as usize - 1) % candidates.len();
    Some(candidates[i].as_str())
}

/// What the instructor sees for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    /// No replica running (scaled to zero, or not known to run).
    Cold,
    /// A replica is being started (cold start seen, or the provider says so).
    Starting,
    /// Replicas run; no job of ours is on it.
    Ready,
    /// Jobs of ours are on it.
    Busy,
    /// Passed over: it keeps failing, or its deployment has no capacity.
    Failing,
}

/// What is known about an endpoint, for [`endpoint_state`].
#[derive(Debug, Clone, Default)]
pub struct StateInputs {
    pub passed_over: bool,
    pub cold_start_in_progress: bool,
    pub in_flight: usize,
    /// Requests of ours that have a worker (`accepted` seen).
    pub accepted: usize,
    /// From the management API: replicas running / being started; `None` when unknown.
    pub replicas_running: Option<usize>,
    pub replicas_starting: Option<usize>,
    /// A job ran to its end here recently (no management API: the best evidence).
    pub recently_served: bool,
}

impl EndpointState {
    /// The name the admin API and the metrics use.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Cold => "cold",
            EndpointState::Starting => "starting",
            EndpointState::Ready => "ready",
            EndpointState::Busy => "busy",
            EndpointState::Failing => "failing",
        }
    }
}

pub fn endpoint_state(s: &StateInputs) -> EndpointState {
    if s.passed_over {
        return EndpointState::Failing;
    }
    if s.accepted > 0 {
        return EndpointState::Busy;
    }
    if s.cold_start_in_progress
        || (s.replicas_running == Some(0) && s.replicas_starting.unwrap_or(0) > 0)
    {
        return EndpointState::Starting;
    }
    if s.in_flight > 0 {
        // Sent, not yet picked up, and no cold start noticed yet.
        return EndpointState::Busy;
    }
    match s.replicas_running {
        Some(n) if n > 0 => EndpointState::Ready,
        Some(_) => EndpointState::Cold,
        None if s.recently_served => EndpointState::Ready,
        None => EndpointState::Cold,
    }
}

/// Deployment statuses (the provider's `ContainerDeploymentStatus`) under which an
/// endpoint cannot take work.
pub fn no_capacity(status: &str) -> bool {
    matches!(status, "quota_reached" | "paused" | "unhealthy")
}

/// Statuses that mean a replica is being brought up.
pub fn status_is_starting(status: &str) -> bool {
    matches!(
        status,
        "initializing" | "image_pulling" | "provisioning" | "starting" | "version_updating"
    )
}

/// How many cold-start samples are kept per endpoint.
pub const COLD_START_SAMPLES: usize = 10;

/// The expected cold start: the median of the samples (seconds), else the default.
pub fn cold_start_estimate(samples: &[u64], default_secs: u64) -> u64 {
    if samples.is_empty() {
        return default_secs;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    s[s.len() / 2]
}

/// Adds a sample, keeping the newest [`COLD_START_SAMPLES`].
pub fn push_sample(samples: &mut Vec<u64>, secs: u64) {
    samples.push(secs);
    if samples.len() > COLD_START_SAMPLES {
        let drop = samples.len() - COLD_START_SAMPLES;
        samples.drain(..drop);
    }
}

/// "GPU starting, about 3 min" for a cold start expected to take `estimate_secs`,
/// `elapsed_secs` of which have passed.
pub fn cold_start_text(estimate_secs: u64, elapsed_secs: u64) -> String {
    let left = estimate_secs.saturating_sub(elapsed_secs);
    if left < 60 {
        "GPU starting, less than a minute".to_owned()
    } else {
        format!("GPU starting, about {} min", left.div_ceil(60))
    }
}

/// "your GPU time today: 4 min".
pub fn gpu_time_text(ms: u64) -> String {
    let secs = ms / 1000;
    if secs < 60 {
        format!("your GPU time today: {secs} s")
    } else {
        format!("your GPU time today: {} min", (secs + 30) / 60)
    }
}

/// The provider bills running replicas in 10-minute intervals.
pub const BILLING_INTERVAL_SECS: i64 = 600;

/// Intervals billed for a replica seen running from `started` to `until` (unix
/// seconds): every begun interval counts, and a replica that ran at all counts one.
pub fn billed_intervals(started: i64, until: i64) -> u64 {
    let ran = (until - started).max(0);
    (ran.div_euclid(BILLING_INTERVAL_SECS) + i64::from(ran % BILLING_INTERVAL_SECS != 0)).max(1)
        as u64
}

/// EUR for `intervals` of one replica at `eur_per_hour`.
pub fn interval_cost(intervals: u64, eur_per_hour: f64) -> f64 {
    intervals as f64 * eur_per_hour * (BILLING_INTERVAL_SECS as f64 / 3600.0)
}

/// EUR for `ms` of GPU time at `eur_per_hour` (what a job's own time is worth).
pub fn gpu_cost(ms: u64, eur_per_hour: f64) -> f64 {
    ms as f64 / 3_600_000.0 * eur_per_hour
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chain(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn chain_is_active_then_failover_once_each() {
        let r = Routing {
            active: "a".into(),
            failover: chain(&["b", "a", "c", "b"]),
        };
        assert_eq!(r.chain(), ["a", "b", "c"]);
    }

    #[test]
    fn attempts_move_down_the_chain_and_skip_failing_endpoints() {
        let c = chain(&["spot", "on-demand", "b300"]);
        let all = |_: &str| true;
        assert_eq!(pick_endpoint(&c, all, &[], 1), Some("spot"));
        // Failed on spot: the next attempt goes to on-demand.
        assert_eq!(
            pick_endpoint(&c, all, &chain(&["spot"]), 2),
            Some("on-demand")
        );
        assert_eq!(
            pick_endpoint(&c, all, &chain(&["spot", "on-demand"]), 3),
            Some("b300")
        );
        // A passed-over endpoint is skipped, even for a first attempt.
        let not_spot = |n: &str| n != "spot";
        assert_eq!(pick_endpoint(&c, not_spot, &[], 1), Some("on-demand"));
        // After a restart the failures are forgotten: the attempt number decides.
        assert_eq!(pick_endpoint(&c, all, &[], 2), Some("on-demand"));
        // Nothing usable: still tried, in order.
        let none = |_: &str| false;
        assert_eq!(pick_endpoint(&c, none, &[], 1), Some("spot"));
        assert_eq!(pick_endpoint(&[], all, &[], 1), None);
    }

    proptest! {
        #[test]
        fn a_pick_is_in_the_chain_and_avoids_a_failed_endpoint_when_it_can(
            n in 1usize..5, failed_mask in 0u8..32, usable_mask in 0u8..32, attempt in 1u32..8,
        ) {
            let c: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
            let failed: Vec<String> = c.iter().enumerate()
                .filter(|(i, _)| failed_mask & (1 << i) != 0).map(|(_, s)| s.clone()).collect();
            let usable = |name: &str| {
                let i: usize = name[1..].parse().unwrap();
                usable_mask & (1 << i) != 0
            };
            let got = pick_endpoint(&c, usable, &failed, attempt).unwrap();
            prop_assert!(c.iter().any(|e| e == got));
            let usable_fresh = c.iter().any(|e| usable(e) && !failed.contains(e));
            if usable_fresh && !failed.is_empty() {
                prop_assert!(!failed.iter().any(|f| f == got));
                prop_assert!(usable(got));
            }
        }

        #[test]
        fn billing_counts_every_begun_interval(start in 0i64..10_000_000, ran in 0i64..100_000) {
            let n = billed_intervals(start, start + ran);
            prop_assert!(n >= 1);
            prop_assert!((n as i64) * BILLING_INTERVAL_SECS >= ran);
            prop_assert!(((n as i64) - 1) * BILLING_INTERVAL_SECS < ran.max(1));
        }
    }

    #[test]
    fn endpoint_states() {
        let s = |f: &dyn Fn(&mut StateInputs)| {
            let mut i = StateInputs::default();
            f(&mut i);
            endpoint_state(&i)
        };
        assert_eq!(s(&|_| {}), EndpointState::Cold);
        assert_eq!(s(&|i| i.recently_served = true), EndpointState::Ready);
        assert_eq!(s(&|i| i.replicas_running = Some(2)), EndpointState::Ready);
        assert_eq!(
            s(&|i| {
                i.replicas_running = Some(0);
                i.replicas_starting = Some(1)
            }),
            EndpointState::Starting
        );
        assert_eq!(
            s(&|i| {
                i.in_flight = 3;
                i.cold_start_in_progress = true
            }),
            EndpointState::Starting
        );
        assert_eq!(s(&|i| i.in_flight = 1), EndpointState::Busy);
        assert_eq!(
            s(&|i| {
                i.accepted = 1;
                i.passed_over = true
            }),
            EndpointState::Failing
        );
    }

    #[test]
    fn cold_start_estimates_and_texts() {
        assert_eq!(cold_start_estimate(&[], 180), 180);
        assert_eq!(cold_start_estimate(&[100, 20, 300], 180), 100);
        let mut v = Vec::new();
        for i in 0..15 {
            push_sample(&mut v, i);
        }
        assert_eq!(v.len(), COLD_START_SAMPLES);
        assert_eq!(v[0], 5);
        assert_eq!(cold_start_text(180, 0), "GPU starting, about 3 min");
        assert_eq!(cold_start_text(180, 61), "GPU starting, about 2 min");
        assert_eq!(
            cold_start_text(180, 500),
            "GPU starting, less than a minute"
        );
        assert_eq!(
            gpu_time_text(4 * 60_000 + 10_000),
            "your GPU time today: 4 min"
        );
        assert_eq!(gpu_time_text(42_000), "your GPU time today: 42 s");
    }

    #[test]
    fn prices() {
        assert_eq!(billed_intervals(0, 0), 1);
        assert_eq!(billed_intervals(0, 600), 1);
        assert_eq!(billed_intervals(0, 601), 2);
        assert!((interval_cost(6, 0.97) - 0.97).abs() < 1e-9);
        assert!((gpu_cost(1_800_000, 2.80) - 1.40).abs() < 1e-9);
        assert!(no_capacity("quota_reached") && !no_capacity("healthy"));
    }
}
