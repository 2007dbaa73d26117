//! Example-based tests of each policy's rules.

use comfyume_scheduler::{Limits, MAX_LEVEL, Policy, QueuedJob, ScheduleError, Scheduler};
use serde::Deserialize;
use serde::de::IntoDeserializer;
use serde::de::value::Error as ValueError;

fn job(id: &str, user: &str, seq: u64, number: f64) -> QueuedJob {
    QueuedJob {
        id: id.to_owned(),
        user: user.to_owned(),
        seq,
        number,
        priority: None,
        enqueued_at_ms: 0,
    }
}

fn limits(max_running: u32) -> Limits {
    Limits {
        max_running_per_user: max_running,
        ..Limits::default()
    }
}

/// Picks until nothing is picked, releasing each job right away (one backend slot).
fn drain_one_at_a_time(s: &mut Scheduler, now_ms: i64) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(j) = s.pick(now_ms) {
        assert!(s.finished(&j.user));
        out.push(j.id);
    }
    out
}

#[test]
fn policy_parses_and_displays() {
    for p in Policy::ALL {
        assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
    }
    assert_eq!("round_robin".parse(), Ok(Policy::RoundRobin));
    assert_eq!(" FIFO\n".parse(), Ok(Policy::Fifo));
    assert_eq!(Policy::Priority.to_string(), "priority");
    let err = "round-robin".parse::<Policy>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown queue policy \"round-robin\": expected one of fifo, round_robin, priority"
    );
}

#[test]
fn policy_serde_uses_the_same_names() {
    let de = |s: &str| Policy::deserialize(s.to_owned().into_deserializer());
    let ok: Result<Policy, ValueError> = de("priority");
    assert_eq!(ok.unwrap(), Policy::Priority);
    let bad: Result<Policy, ValueError> = de("lottery");
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("unknown queue policy")
    );
    let name: &'static str = Policy::RoundRobin.into();
    assert_eq!(name, "round_robin");
}

#[test]
fn fifo_picks_in_seq_order() {
    let mut s = Scheduler::new(Policy::Fifo, limits(10));
    for (i, user) in ["c", "a", "b", "a", "c", "b"].iter().enumerate() {
        s.enqueue(job(&format!("j{i}"), user, i as u64 + 1, i as f64))
            .unwrap();
    }
    let order: Vec<_> = std::iter::from_fn(|| s.pick(0)).map(|j| j.id).collect();
    assert_eq!(order, ["j0", "j1", "j2", "j3", "j4", "j5"]);
}

#[test]
fn fifo_skips_capped_participants_and_resumes_after_finish() {
    let mut s = Scheduler::new(Policy::Fifo, limits(1));
    s.enqueue(job("a1", "a", 1, 1.0)).unwrap();
    s.enqueue(job("a2", "a", 2, 2.0)).unwrap();
    s.enqueue(job("b3", "b", 3, 3.0)).unwrap();
    assert_eq!(s.pick(0).unwrap().id, "a1");
    assert_eq!(s.pick(0).unwrap().id, "b3");
    assert_eq!(s.pick(0), None, "only a capped participant is waiting");
    assert_eq!(s.running_for("a"), 1);
    assert!(s.finished("a"));
    assert_eq!(s.pick(0).unwrap().id, "a2");
    assert!(s.is_empty());
}

#[test]
fn nothing_is_picked_when_only_capped_participants_wait() {
    let mut s = Scheduler::new(Policy::RoundRobin, limits(1));
    s.restore_running("a");
    s.enqueue(job("a1", "a", 1, 1.0)).unwrap();
    assert_eq!(s.pick(0), None);
    assert_eq!(s.len(), 1);
    assert!(s.finished("a"));
    assert!(!s.finished("a"), "no second running job to release");
    assert_eq!(s.pick(0).unwrap().id, "a1");
}

#[test]
fn round_robin_alternates_and_a_burst_does_not_delay_others() {
    for policy in [Policy::RoundRobin, Policy::Priority] {
        // Once with immediate finishes, once with caps out of the way: either way the
        // rotation alone must serve the 19 singles within the first 20 picks.
        for max_running in [1, 1000] {
            let mut s = Scheduler::new(policy, limits(max_running));
            for i in 0..50 {
                s.enqueue(job(&format!("burst{i}"), "u00", i, i as f64))
                    .unwrap();
            }
            for u in 1..20u64 {
                s.enqueue(job(
                    &format!("single{u}"),
                    &format!("u{u:02}"),
                    100 + u,
                    0.0,
                ))
                .unwrap();
            }
            let mut first20 = Vec::new();
            for _ in 0..20 {
                let j = s.pick(0).expect("work is waiting");
                if max_running == 1 {
                    s.finished(&j.user);
                }
                first20.push(j.id);
            }
            let singles = first20.iter().filter(|id| id.starts_with("single")).count();
            assert_eq!(singles, 19, "{policy} cap {max_running}: {first20:?}");
        }
    }
}

#[test]
fn round_robin_serves_least_recently_served_first() {
    let mut s = Scheduler::new(Policy::RoundRobin, limits(1));
    for i in 0..3 {
        s.enqueue(job(&format!("a{i}"), "a", i, i as f64)).unwrap();
        s.enqueue(job(&format!("b{i}"), "b", 10 + i, i as f64))
            .unwrap();
    }
    assert_eq!(
        drain_one_at_a_time(&mut s, 0),
        ["a0", "b0", "a1", "b1", "a2", "b2"]
    );
    // An idle participant keeps their history: c (never served) goes before a and b;
    // then b (served longer ago than a) before a.
    s.enqueue(job("a9", "a", 20, 0.0)).unwrap();
    s.enqueue(job("b9", "b", 21, 0.0)).unwrap();
    s.enqueue(job("c9", "c", 22, 0.0)).unwrap();
    assert_eq!(drain_one_at_a_time(&mut s, 0), ["c9", "a9", "b9"]);
}

#[test]
fn front_goes_ahead_of_the_same_participants_earlier_jobs_only() {
    for policy in Policy::ALL {
        let mut s = Scheduler::new(policy, limits(1));
        s.enqueue(job("a1", "a", 1, 1.0)).unwrap();
        s.enqueue(job("a2", "a", 2, 2.0)).unwrap();
        s.enqueue(job("a3", "a", 3, -3.0)).unwrap(); // front
        assert_eq!(
            drain_one_at_a_time(&mut s, 0),
            ["a3", "a1", "a2"],
            "{policy}"
        );

        s.enqueue(job("a4", "a", 4, 4.0)).unwrap();
        s.enqueue(job("a5", "a", 5, 5.0)).unwrap();
        s.enqueue(job("b6", "b", 6, 6.0)).unwrap();
        s.enqueue(job("a7", "a", 7, -7.0)).unwrap(); // front
        // a's front job jumps a's own queue but never b's job: under fifo a's turn comes with
        // its head a7 (seq 7) after b6; under the others a was served more recently than b.
        assert_eq!(
            drain_one_at_a_time(&mut s, 0),
            ["b6", "a7", "a4", "a5"],
            "{policy}"
        );
    }
}

#[test]
fn requeue_keeps_seq_and_goes_ahead_of_newer_jobs() {
    let mut s = Scheduler::new(Policy::RoundRobin, limits(1));
    s.enqueue(job("a1", "a", 1, 1.0)).unwrap();
    s.enqueue(job("a2", "a", 2, 2.0)).unwrap();
    let picked = s.pick(0).unwrap();
    assert_eq!(picked.id, "a1");
    s.enqueue(job("a3", "a", 3, 3.0)).unwrap();
    assert!(s.finished("a"));
    s.requeue(picked).unwrap();
    assert_eq!(s.get("a1").unwrap().seq, 1);
    assert_eq!(drain_one_at_a_time(&mut s, 0), ["a1", "a2", "a3"]);
}

#[test]
fn requeue_ignores_the_queued_cap_but_enqueue_does_not() {
    let mut s = Scheduler::new(
        Policy::Fifo,
        Limits {
            max_queued_per_user: Some(1),
            ..Limits::default()
        },
    );
    s.enqueue(job("a1", "a", 1, 1.0)).unwrap();
    let a1 = s.pick(0).unwrap();
    s.enqueue(job("a2", "a", 2, 2.0)).unwrap();
    assert_eq!(
        s.enqueue(job("a3", "a", 3, 3.0)),
        Err(ScheduleError::QueueFull {
            user: "a".into(),
            max: 1
        })
    );
    s.enqueue(job("b3", "b", 3, 3.0)).unwrap();
    s.finished("a");
    s.requeue(a1).unwrap();
    assert_eq!(s.queued_for("a"), 2);
}

#[test]
fn bad_input_is_refused_without_changes() {
    let mut s = Scheduler::new(Policy::Priority, Limits::default());
    s.enqueue(job("x", "a", 1, 1.0)).unwrap();
    assert_eq!(
        s.enqueue(job("x", "b", 2, 2.0)),
        Err(ScheduleError::DuplicateId("x".into()))
    );
    assert_eq!(
        s.enqueue(job("y", "a", 1, 1.0)),
        Err(ScheduleError::DuplicateSeq {
            seq: 1,
            other: "x".into()
        })
    );
    let mut high = job("z", "a", 3, 3.0);
    high.priority = Some(MAX_LEVEL + 1);
    assert_eq!(s.enqueue(high), Err(ScheduleError::InvalidLevel(4)));
    assert_eq!(
        s.set_user_priority("a", Some(9)),
        Err(ScheduleError::InvalidLevel(9))
    );
    assert_eq!(s.user_priority("a"), None);
    assert_eq!((s.len(), s.queued_for("a"), s.queued_for("b")), (1, 1, 0));
}

#[test]
fn remove_takes_a_job_out_before_dispatch() {
    let mut s = Scheduler::new(Policy::RoundRobin, limits(5));
    s.enqueue(job("a1", "a", 1, 1.0)).unwrap();
    s.enqueue(job("a2", "a", 2, 2.0)).unwrap();
    assert_eq!(s.remove("a1").map(|j| j.seq), Some(1));
    assert_eq!(s.remove("a1"), None);
    assert!(!s.contains("a1"));
    assert_eq!(s.queued_for("a"), 1);
    assert_eq!(s.pick(0).unwrap().id, "a2");
    assert_eq!(s.pick(0), None);
}

#[test]
fn priority_serves_higher_levels_first_and_job_level_overrides_user_level() {
    let mut s = Scheduler::new(
        Policy::Priority,
        Limits {
            max_running_per_user: 10,
            aging_ms: 0,
            ..Limits::default()
        },
    );
    s.set_user_priority("teacher_pet", Some(2)).unwrap();
    s.set_user_priority("demoted", Some(3)).unwrap();
    s.enqueue(job("plain", "a", 1, 1.0)).unwrap();
    s.enqueue(job("pet", "teacher_pet", 2, 1.0)).unwrap();
    let mut boosted = job("boosted", "c", 3, 1.0);
    boosted.priority = Some(3);
    s.enqueue(boosted).unwrap();
    let mut low = job("low", "demoted", 4, 1.0);
    low.priority = Some(0);
    s.enqueue(low).unwrap();
    let order: Vec<_> = std::iter::from_fn(|| s.pick(0)).map(|j| j.id).collect();
    assert_eq!(order, ["boosted", "pet", "plain", "low"]);
}

#[test]
fn priority_lifts_a_participants_boosted_job_over_their_own_earlier_jobs() {
    let mut s = Scheduler::new(Policy::Priority, limits(1));
    s.enqueue(job("a1", "a", 1, 1.0)).unwrap();
    let mut a2 = job("a2", "a", 2, 2.0);
    a2.priority = Some(1);
    s.enqueue(a2).unwrap();
    assert_eq!(drain_one_at_a_time(&mut s, 0), ["a2", "a1"]);
}

#[test]
fn priority_round_robins_within_a_level_and_follows_user_level_changes() {
    let mut s = Scheduler::new(
        Policy::Priority,
        Limits {
            aging_ms: 0,
            ..Limits::default()
        },
    );
    for (user, base) in [("a", 0), ("b", 10), ("c", 20)] {
        for i in 0..2 {
            s.enqueue(job(&format!("{user}{i}"), user, base + i, i as f64))
                .unwrap();
        }
    }
    s.set_user_priority("a", Some(1)).unwrap();
    s.set_user_priority("b", Some(1)).unwrap();
    assert_eq!(
        drain_one_at_a_time(&mut s, 0),
        ["a0", "b0", "a1", "b1", "c0", "c1"]
    );

    s.enqueue(job("a2", "a", 30, 0.0)).unwrap();
    s.enqueue(job("c2", "c", 31, 0.0)).unwrap();
    s.set_user_priority("a", None).unwrap();
    s.set_user_priority("c", Some(2)).unwrap();
    assert_eq!(drain_one_at_a_time(&mut s, 0), ["c2", "a2"]);
}

#[test]
fn aging_lets_a_level_zero_job_through() {
    let aging_ms = 1_000;
    let mut s = Scheduler::new(
        Policy::Priority,
        Limits {
            max_running_per_user: 1,
            aging_ms,
            ..Limits::default()
        },
    );
    s.set_user_priority("vip", Some(MAX_LEVEL)).unwrap();
    s.enqueue(job("patient", "low", 1, 1.0)).unwrap();
    let mut seq = 10;
    let mut now = 0;
    // The VIP always has fresh work; before 3 * aging_ms the level-0 job stays behind it.
    while now < 3 * aging_ms as i64 {
        let mut fresh = job(&format!("vip{seq}"), "vip", seq, seq as f64);
        fresh.enqueued_at_ms = now;
        s.enqueue(fresh).unwrap();
        seq += 1;
        let j = s.pick(now).unwrap();
        assert_eq!(j.user, "vip", "at {now} ms");
        s.finished("vip");
        now += 250;
    }
    assert_eq!(s.position("patient", now), Some(0));
    let mut fresh = job("vip-last", "vip", seq, seq as f64);
    fresh.enqueued_at_ms = now;
    s.enqueue(fresh).unwrap();
    assert_eq!(s.pick(now).unwrap().id, "patient");
}

#[test]
fn set_policy_at_runtime_changes_the_next_pick() {
    let mut s = Scheduler::new(Policy::Fifo, limits(10));
    for i in 0..3 {
        s.enqueue(job(&format!("a{i}"), "a", i, i as f64)).unwrap();
    }
    s.enqueue(job("b0", "b", 10, 0.0)).unwrap();
    assert_eq!(s.pick(0).unwrap().id, "a0");
    assert_eq!(s.pick(0).unwrap().id, "a1");
    s.set_policy(Policy::RoundRobin);
    assert_eq!(s.policy(), Policy::RoundRobin);
    assert_eq!(s.pick(0).unwrap().id, "b0");
}

#[test]
fn position_and_projected_order_match_uncapped_picks() {
    for policy in Policy::ALL {
        let mut s = Scheduler::new(
            policy,
            Limits {
                max_running_per_user: u32::MAX,
                aging_ms: 500,
                ..Limits::default()
            },
        );
        s.set_user_priority("b", Some(1)).unwrap();
        let mut seq = 0;
        for (user, n) in [("a", 4), ("b", 2), ("c", 3), ("d", 1)] {
            for i in 0..n {
                let mut j = job(
                    &format!("{user}{i}"),
                    user,
                    seq,
                    if i == 2 { -1.0 } else { i as f64 },
                );
                j.enqueued_at_ms = seq as i64 * 100;
                if user == "c" && i == 1 {
                    j.priority = Some(2);
                }
                s.enqueue(j).unwrap();
                seq += 1;
            }
        }
        let now = 1_000;
        let projected: Vec<String> = s
            .projected_order(now)
            .iter()
            .map(|j| j.id.clone())
            .collect();
        for (i, id) in projected.iter().enumerate() {
            assert_eq!(s.position(id, now), Some(i), "{policy} {id}");
        }
        assert_eq!(s.position("nope", now), None);
        let picked: Vec<_> = std::iter::from_fn(|| s.pick(now)).map(|j| j.id).collect();
        assert_eq!(picked, projected, "{policy}");
    }
}

/// What the metrics read: each participant's queued and running counts, and the oldest
/// waiting job's enqueue time, whatever its place in the order (`front` jobs included).
#[test]
fn counts_and_oldest_wait_for_the_metrics() {
    let mut s = Scheduler::new(Policy::RoundRobin, limits(1));
    assert_eq!(s.oldest_enqueued_ms(), None);
    let mut a1 = job("a1", "a", 1, 1.0);
    a1.enqueued_at_ms = 5_000;
    let mut a2 = job("a2", "a", 2, 2.0);
    a2.enqueued_at_ms = 6_000;
    // Sent to the front of b's queue, but submitted earliest.
    let mut b1 = job("b1", "b", 3, -1.0);
    b1.enqueued_at_ms = 1_000;
    let mut b2 = job("b2", "b", 4, 3.0);
    b2.enqueued_at_ms = 7_000;
    for j in [a1, a2, b2, b1] {
        s.enqueue(j).unwrap();
    }
    assert_eq!(s.oldest_enqueued_ms(), Some(1_000));
    let picked = s.pick(10_000).unwrap();
    let mut counts: Vec<(String, usize, u32)> = s
        .user_counts()
        .map(|(u, q, r)| (u.to_owned(), q, r))
        .collect();
    counts.sort();
    let who = picked.user.clone();
    let expect = |u: &str| if u == who { (1, 1) } else { (2, 0) };
    for (u, q, r) in &counts {
        assert_eq!((*q, *r), expect(u), "{u}");
    }
    assert_eq!(counts.len(), 2);
    assert!(s.finished(&who));
    s.remove("b1");
    s.remove("a1");
    assert_eq!(s.oldest_enqueued_ms(), Some(6_000));
}

/// The instructor's "move to front": the job runs next under every policy, the most recently
/// moved first; a running cap still holds it back; cancelling it forgets the move.
#[test]
fn moved_to_the_front_runs_next() {
    use comfyume_scheduler::{Limits, Policy, QueuedJob, Scheduler};
    for policy in Policy::ALL {
        let mut s = Scheduler::new(policy, Limits::default());
        for (i, user) in ["a", "a", "b", "c", "c"].iter().enumerate() {
            s.enqueue(QueuedJob {
                id: format!("j{i}"),
                user: user.to_string(),
                seq: i as u64 + 1,
                number: i as f64,
                priority: None,
                enqueued_at_ms: 0,
            })
            .unwrap();
        }
        assert!(!s.move_to_front("nope"));
        assert!(s.move_to_front("j4"));
        assert!(s.move_to_front("j1"));
        assert_eq!(s.front(), ["j1", "j4"]);
        let order: Vec<&str> = s.projected_order(0).iter().map(|j| j.id.as_str()).collect();
        assert_eq!(&order[..2], ["j1", "j4"], "{policy:?}");
        assert_eq!(s.position("j4", 0), Some(1));
        assert_eq!(s.pick(0).unwrap().id, "j1", "{policy:?}");
        assert_eq!(s.pick(0).unwrap().id, "j4", "{policy:?}");
        // b is the only participant without a running job left.
        assert_eq!(s.pick(0).unwrap().id, "j2");
        assert!(s.pick(0).is_none());
        // Moved while its participant is at the cap: it waits, then goes first.
        assert!(s.move_to_front("j3"));
        assert!(s.finished("a"));
        assert_eq!(s.pick(0).unwrap().id, "j0", "c is still capped");
        assert!(s.finished("c"));
        assert_eq!(s.pick(0).unwrap().id, "j3");
        assert!(s.front().is_empty());
        // A cancelled job leaves the front list.
        s.enqueue(QueuedJob {
            id: "k".into(),
            user: "d".into(),
            seq: 99,
            number: 99.0,
            priority: None,
            enqueued_at_ms: 0,
        })
        .unwrap();
        s.move_to_front("k");
        s.remove("k");
        assert!(s.front().is_empty());
    }
}
