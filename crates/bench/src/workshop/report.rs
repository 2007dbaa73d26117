//! The report of a workshop run: the figures drawn from what the participants
//! saw, what the server says at the end and what the simulators logged (no
//! I/O but the printing), as tables and one JSON line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::analysis::{self, JobSpan};
use super::participant::{self, Kind};
use super::{Args, FaultRecord, FinalJob, RECONCILE_S, REQUEST_TIMEOUT_S, STOP_GRACE_S};
use crate::common;

pub(super) fn pct(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub(super) struct Measures {
    pub(super) wall: Duration,
    pub(super) drained: Duration,
    pub(super) run_start_ms: i64,
    pub(super) run_end_ms: i64,
    pub(super) cpu_ms: f64,
    pub(super) hwm_kib: u64,
    pub(super) rss_peak_kib: u64,
    pub(super) rss_end_kib: Option<u64>,
    pub(super) restarts: usize,
    pub(super) load_at_start: String,
    pub(super) serve_logs: (usize, usize, BTreeMap<String, usize>),
    pub(super) participant_errors: Vec<String>,
}

pub(super) struct Report {
    rows: Vec<Vec<String>>,
    fault_rows: Vec<Vec<String>>,
    reason_rows: Vec<Vec<String>>,
    failed_rows: Vec<Vec<String>>,
    log_rows: Vec<Vec<String>>,
    header: String,
    summary: Value,
    pub(super) violations: Vec<String>,
}

impl Report {
    pub(super) fn build(
        a: &Args,
        l: &participant::Ledger,
        jobs: &[FinalJob],
        on_backends: &BTreeMap<String, analysis::JobOnBackends>,
        records: &[FaultRecord],
        m: Measures,
    ) -> Report {
        let known: HashMap<&str, &FinalJob> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        let acked: HashSet<&str> = l.acked.iter().map(|x| x.id.as_str()).collect();
        let lost: Vec<String> = l
            .acked
            .iter()
            .filter(|x| !known.contains_key(x.id.as_str()))
            .map(|x| {
                format!(
                    "{} of {} (accepted at {:.1} s)",
                    x.id,
                    x.user,
                    (x.at_ms - m.run_start_ms) as f64 / 1000.0
                )
            })
            .collect();
        let stuck: Vec<&FinalJob> = jobs
            .iter()
            .filter(|j| !participant::is_terminal(&j.status))
            .collect();
        let outputs_lost: Vec<&FinalJob> = jobs
            .iter()
            .filter(|j| j.status == "completed" && (j.outputs.0 == 0 || j.outputs.1 < j.outputs.0))
            .collect();
        let unexplained: Vec<&FinalJob> = jobs
            .iter()
            .filter(|j| j.status == "failed" && j.reason.is_none())
            .collect();
        let twice: Vec<(String, String)> = on_backends
            .iter()
            .filter_map(|(id, b)| analysis::run_twice(b).map(|why| (id.clone(), why)))
            .collect();
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for j in jobs {
            *states.entry(j.status.clone()).or_default() += 1;
            if j.status != "completed" {
                let r = j.reason.clone().unwrap_or_else(|| j.status.clone());
                *reasons
                    .entry(format!("{}: {}", j.status, analysis::reason_kind(&r)))
                    .or_default() += 1;
            }
        }
        let unacked = jobs
            .iter()
            .filter(|j| !acked.contains(j.id.as_str()))
            .count();
        let mut posts: BTreeMap<usize, usize> = BTreeMap::new();
        let mut execs: BTreeMap<usize, usize> = BTreeMap::new();
        for j in jobs {
            let b = on_backends.get(&j.id);
            *posts.entry(b.map_or(0, |b| b.posts)).or_default() += 1;
            *execs
                .entry(b.map_or(0, |b| b.executions.len()))
                .or_default() += 1;
        }

        // Latency of participant requests, all and per kind.
        let all: Vec<Duration> = l.latency.iter().map(|(_, d)| *d).collect();
        let s_all = common::summarize(&all);
        let mut per_kind = BTreeMap::new();
        for k in [
            Kind::Login,
            Kind::Page,
            Kind::Api,
            Kind::Submit,
            Kind::Job,
            Kind::View,
        ] {
            let v: Vec<Duration> = l
                .latency
                .iter()
                .filter(|(kk, _)| *kk == k)
                .map(|(_, d)| *d)
                .collect();
            per_kind.insert(k, common::summarize(&v));
        }
        let errors: usize = l.errors.values().sum();

        // Fairness: jobs completed per participant per window.
        let spans: Vec<JobSpan> = jobs
            .iter()
            .map(|j| JobSpan {
                user: j.user.clone(),
                created_ms: j.created_ms,
                ended_ms: j.ended_ms,
                succeeded: j.status == "completed",
            })
            .collect();
        let windows = analysis::fairness(
            &spans,
            m.run_start_ms,
            m.run_end_ms,
            (a.window_secs * 1000) as i64,
        );
        let min_mean = |v: &[f64]| {
            let min = v.iter().copied().fold(f64::NAN, f64::min);
            // NaN (null in the JSON) without any window.
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            (min, mean, v.len())
        };
        let jains: Vec<f64> = windows.iter().filter_map(|w| w.jain).collect();
        let (jain_min, jain_mean, _) = min_mean(&jains);
        let busy_jains: Vec<f64> = windows.iter().filter_map(|w| w.jain_backlogged).collect();
        let (busy_min, busy_mean, busy_n) = min_mean(&busy_jains);
        let r3 = |v: f64| {
            if v.is_nan() {
                Value::Null
            } else {
                json!((v * 1000.0).round() / 1000.0)
            }
        };

        let mut violations = Vec::new();
        if !lost.is_empty() {
            violations.push(format!("{} accepted jobs lost: {:?}", lost.len(), lost));
        }
        if !twice.is_empty() {
            violations.push(format!("{} jobs run twice: {:?}", twice.len(), twice));
        }
        if !stuck.is_empty() {
            violations.push(format!(
                "{} jobs stuck: {:?}",
                stuck.len(),
                stuck.iter().map(|j| (&j.id, &j.status)).collect::<Vec<_>>()
            ));
        }
        if !unexplained.is_empty() {
            violations.push(format!(
                "{} jobs failed without a reason: {:?}",
                unexplained.len(),
                unexplained.iter().map(|j| &j.id).collect::<Vec<_>>()
            ));
        }
        if !outputs_lost.is_empty() {
            violations.push(format!(
                "{} succeeded jobs with outputs missing: {:?}",
                outputs_lost.len(),
                outputs_lost
                    .iter()
                    .map(|j| (&j.id, j.outputs))
                    .collect::<Vec<_>>()
            ));
        }

        let cpu_s = m.cpu_ms / 1000.0;
        let cpu_pct = m.cpu_ms / m.wall.as_secs_f64().max(0.001) / 10.0;
        let mib = |k: u64| k as f64 / 1024.0;
        let n = |v: usize| v.to_string();
        let rows = vec![
            vec![
                "jobs accepted (200 with a prompt_id)".into(),
                n(l.acked.len()),
                String::new(),
            ],
            vec![
                "  + jobs the server has that no participant saw accepted".into(),
                n(unacked),
                format!(
                    "{} tabs closed right after Run, {} submissions cut",
                    l.closed_tab,
                    l.ambiguous.len()
                ),
            ],
            vec![
                "end states (completed / failed / cancelled)".into(),
                format!(
                    "{} / {} / {}",
                    states.get("completed").unwrap_or(&0),
                    states.get("failed").unwrap_or(&0),
                    states.get("cancelled").unwrap_or(&0)
                ),
                "every job ends, failures with a reason".into(),
            ],
            vec!["jobs lost".into(), n(lost.len()), "0".into()],
            vec!["jobs run twice".into(), n(twice.len()), "0".into()],
            vec![
                format!("jobs stuck (not ended {} s after the run)", a.drain()),
                n(stuck.len()),
                "0".into(),
            ],
            vec![
                "outputs lost (succeeded, not fetchable)".into(),
                n(outputs_lost.len()),
                "0".into(),
            ],
            vec![
                "POST /prompt accepted by backends per job".into(),
                fmt_hist(&posts),
                "count: jobs".into(),
            ],
            vec![
                "executions on backends per job".into(),
                fmt_hist(&execs),
                "count: jobs".into(),
            ],
            vec![
                "submissions refused (status type: n)".into(),
                fmt_map(&l.refused),
                "a clear error, never a 200 that is lost".into(),
            ],
            vec![
                "participant requests p50 / p99".into(),
                format!(
                    "{} / {} ms",
                    common::ms(s_all.p50_us),
                    common::ms(s_all.p99_us)
                ),
                format!(
                    "{} requests answered, {errors} unanswered (server away)",
                    s_all.n
                ),
            ],
            vec![
                "  POST /api/prompt p50 / p99".into(),
                format!(
                    "{} / {} ms",
                    common::ms(per_kind[&Kind::Submit].p50_us),
                    common::ms(per_kind[&Kind::Submit].p99_us)
                ),
                format!("{} answered", per_kind[&Kind::Submit].n),
            ],
            vec![
                "job ends seen on the WebSocket / by re-reading".into(),
                format!("{} / {}", l.ended_ws.len(), l.ended_resync.len()),
                format!(
                    "{} socket connects, {} drops; {} jobs waited out by participants",
                    l.ws_connects,
                    l.ws_drops,
                    l.gave_up.len()
                ),
            ],
            vec![
                "outputs fetched during the run".into(),
                n(l.outputs_fetched),
                format!("{} not fetchable at the time", l.output_misses.len()),
            ],
            vec![
                format!(
                    "Jain's index of jobs done per participant per {} s window (min / mean)",
                    a.window_secs
                ),
                fmt_min_mean(jain_min, jain_mean),
                format!(
                    "{} windows; among participants with a job waiting or running",
                    jains.len()
                ),
            ],
            vec![
                "  the same among participants waiting all through the window".into(),
                fmt_min_mean(busy_min, busy_mean),
                format!("{busy_n} windows with two or more of them"),
            ],
            vec![
                "serve RSS peak (sampled 1/s) / VmHWM / at the end".into(),
                format!(
                    "{:.1} / {:.1} / {} MiB",
                    mib(m.rss_peak_kib),
                    mib(m.hwm_kib),
                    m.rss_end_kib
                        .map_or("-".into(), |k| format!("{:.1}", mib(k)))
                ),
                format!("over {} starts", m.restarts + 1),
            ],
            vec![
                "serve CPU".into(),
                format!("{cpu_s:.1} s"),
                format!(
                    "{:.1} % of one core over {:.0} s",
                    cpu_pct,
                    m.wall.as_secs_f64()
                ),
            ],
        ];
        let fault_rows = records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let until = records.get(i + 1).map_or(i64::MAX, |n| n.started_ms);
                let failed: Vec<&FinalJob> = jobs
                    .iter()
                    .filter(|j| {
                        j.status != "completed"
                            && j.ended_ms.is_some_and(|e| e >= r.started_ms && e < until)
                    })
                    .collect();
                let mut why: BTreeMap<String, usize> = BTreeMap::new();
                for j in &failed {
                    *why.entry(j.reason.clone().unwrap_or_default()).or_default() += 1;
                }
                vec![
                    r.kind.name().to_string(),
                    format!("{:.0}", r.at_s),
                    format!("{:.0}", r.length_s),
                    r.skipped.clone().unwrap_or_else(|| r.detail.clone()),
                    if r.skipped.is_some() {
                        "-".into()
                    } else {
                        format!(
                            "{}{}",
                            failed.len(),
                            if why.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", fmt_map(&why))
                            }
                        )
                    },
                ]
            })
            .collect();
        let reason_rows = reasons
            .iter()
            .map(|(r, c)| vec![r.clone(), c.to_string()])
            .collect();
        let failed_rows = jobs
            .iter()
            .filter(|j| j.status != "completed")
            .take(40)
            .map(|j| {
                vec![
                    j.id.clone(),
                    j.user.clone(),
                    j.status.clone(),
                    format!(
                        "{:.1}",
                        (j.ended_ms.unwrap_or(0) - m.run_start_ms) as f64 / 1000.0
                    ),
                    l.retry_notices.get(&j.id).copied().unwrap_or(0).to_string(),
                    j.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let (warn, error, by) = &m.serve_logs;
        let mut top: Vec<(&String, &usize)> = by.iter().collect();
        top.sort_by(|x, y| y.1.cmp(x.1).then(x.0.cmp(y.0)));
        let log_rows = top
            .iter()
            .take(15)
            .map(|(msg, c)| vec![msg.to_string(), c.to_string()])
            .collect();

        let fairness = json!({
            "window_s": a.window_secs,
            "jain_min": r3(jain_min),
            "jain_mean": r3(jain_mean),
            "jain_backlogged_min": r3(busy_min),
            "jain_backlogged_mean": r3(busy_mean),
            "windows": windows.iter().map(|w| json!({
                "t_s": (w.start_ms - m.run_start_ms) / 1000, "active": w.active,
                "backlogged": w.backlogged, "done": w.done,
                "jain": w.jain.map(r3), "jain_backlogged": w.jain_backlogged.map(r3),
            })).collect::<Vec<_>>(),
        });
        let summary = json!({
            "bench": "workshop",
            "machine": common::machine(),
            "load_1m_at_start": m.load_at_start,
            "participants": a.participants,
            "duration_s": a.duration,
            "sims": a.sims,
            "step_ms": a.step_ms,
            "steps": [a.steps_min, a.steps_max],
            "seed": a.seed,
            "timeouts_s": {
                "job_timeout": a.job_timeout, "start_timeout": a.start_timeout,
                "backend_request": REQUEST_TIMEOUT_S, "stop_grace": STOP_GRACE_S,
                "reconcile": RECONCILE_S, "max_attempts": a.max_attempts,
            },
            "faults": records.iter().map(|r| json!({
                "fault": r.kind.key(), "at_s": pct(r.at_s), "length_s": pct(r.length_s),
                "ran": r.skipped.is_none(), "detail": r.skipped.clone().unwrap_or_else(|| r.detail.clone()),
            })).collect::<Vec<_>>(),
            "accepted": l.acked.len(),
            "unacknowledged_jobs": unacked,
            "closed_tab_clicks": l.closed_tab,
            "cut_submissions": l.ambiguous.len(),
            "refused": l.refused,
            "end_states": states,
            "reasons": reasons,
            "lost": lost.len(),
            "run_twice": twice.len(),
            "run_twice_jobs": twice.iter().map(|(id, why)| json!({"id": id, "why": why})).collect::<Vec<_>>(),
            "stuck": stuck.len(),
            "outputs_lost": outputs_lost.len(),
            "failed_without_reason": unexplained.len(),
            "posts_per_job": posts.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "executions_per_job": execs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "requests": s_all.json_ms(),
            "requests_by_kind": per_kind.iter().map(|(k, s)| (k.name().to_string(), s.json_ms())).collect::<serde_json::Map<_, _>>(),
            "requests_unanswered": errors,
            "ws": {"connects": l.ws_connects, "drops": l.ws_drops, "ends_seen": l.ended_ws.len(), "ends_reread": l.ended_resync.len()},
            "fairness": fairness,
            "serve": {
                "rss_peak_mib": pct(mib(m.rss_peak_kib)), "vmhwm_mib": pct(mib(m.hwm_kib)),
                "rss_end_mib": m.rss_end_kib.map(|k| pct(mib(k))),
                "cpu_s": pct(cpu_s), "cpu_pct_one_core": pct(cpu_pct), "starts": m.restarts + 1,
                "log_warn": warn, "log_error": error,
            },
            "wall_s": pct(m.wall.as_secs_f64()),
            "drain_s": pct(m.drained.as_secs_f64()),
            "participant_errors": m.participant_errors,
            "ok": violations.is_empty(),
        });
        let header = format!(
            "{} participants, {} simulators (step {} ms, {}-{} steps), {} s of submissions; JOB_TIMEOUT {} s, JOB_START_TIMEOUT {} s (configured), backend request {} s, stop grace {} s, reconcile {} s (production); load {} at start",
            a.participants,
            a.sims,
            a.step_ms,
            a.steps_min,
            a.steps_max,
            a.duration,
            a.job_timeout,
            a.start_timeout,
            REQUEST_TIMEOUT_S,
            STOP_GRACE_S,
            RECONCILE_S,
            m.load_at_start
        );
        Report {
            rows,
            fault_rows,
            reason_rows,
            failed_rows,
            log_rows,
            header,
            summary,
            violations,
        }
    }

    pub(super) fn print(&self, root: &Path) {
        common::print_machine();
        println!("{}; run directory {}", self.header, root.display());
        common::print_table(
            "workshop: faults (failed jobs: those that ended between this fault and the next)",
            &["fault", "at s", "took s", "what", "jobs failed"],
            &self.fault_rows,
        );
        if !self.reason_rows.is_empty() {
            common::print_table(
                "workshop: jobs not completed, by reason",
                &["state: reason", "jobs"],
                &self.reason_rows,
            );
            common::print_table(
                "workshop: jobs not completed (first 40)",
                &[
                    "job",
                    "user",
                    "state",
                    "ended at s",
                    "retry notices",
                    "reason",
                ],
                &self.failed_rows,
            );
        }
        if !self.log_rows.is_empty() {
            common::print_table(
                "workshop: serve's WARN and ERROR log lines",
                &["message", "lines"],
                &self.log_rows,
            );
        }
        common::print_table("workshop", &["figure", "value", "goal / note"], &self.rows);
        println!("{}", self.summary);
    }
}

fn fmt_min_mean(min: f64, mean: f64) -> String {
    if min.is_nan() {
        return "-".into();
    }
    format!("{min:.3} / {mean:.3}")
}

fn fmt_hist(h: &BTreeMap<usize, usize>) -> String {
    h.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_map(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}
