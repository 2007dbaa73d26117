//! `pick`: in-process cost of choosing the next job at a deep queue:
//! `Scheduler::pick` (+ `finished` + `enqueue`, so the depth stays put) for
//! each policy, and `Queue::take_next` over a real SQLite store (pick plus the
//! durable queued -> dispatched transition).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use comfyume_dispatch::events::NoEvents;
use comfyume_dispatch::{Queue, QueueConfig};
use comfyume_scheduler::{Limits, Policy, QueuedJob, Scheduler};
use comfyume_store::{JobPatch, JobState, NewJob, Store};
use serde_json::json;

use crate::common;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Jobs waiting (kept constant: every pick is followed by a new job).
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Participants the jobs belong to.
    #[arg(long, default_value_t = 200)]
    pub participants: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Scheduler operations per repetition.
    #[arg(long, default_value_t = 10_000)]
    pub ops: usize,
    /// `Queue::take_next` calls per repetition (each also costs a store write to finish the
    /// job and a submission to refill, outside the timing).
    #[arg(long, default_value_t = 300)]
    pub store_ops: usize,
}

fn user(i: usize, participants: usize) -> String {
    format!("user{:03}", i % participants.max(1) + 1)
}

/// ns per pick+finished+enqueue, one value per repetition.
fn scheduler_reps(policy: Policy, a: &Args) -> Vec<f64> {
    let mut s = Scheduler::new(
        policy,
        Limits {
            max_running_per_user: 1,
            max_queued_per_user: None,
            aging_ms: 60_000,
        },
    );
    let users: Vec<String> = (0..a.participants)
        .map(|i| user(i, a.participants))
        .collect();
    if policy == Policy::Priority {
        // Spread participants over the levels so the level comparison has work to do.
        for (i, u) in users.iter().enumerate() {
            let _ = s.set_user_priority(u, Some((i % 4) as u8));
        }
    }
    let mut seq = 0u64;
    for i in 0..a.jobs {
        seq += 1;
        s.enqueue(QueuedJob {
            id: format!("j{seq}"),
            user: users[i % users.len()].clone(),
            seq,
            number: seq as f64,
            priority: None,
            enqueued_at_ms: 0,
        })
        .expect("unique ids and seqs");
    }
    let mut out = Vec::new();
    for rep in 0..a.reps {
        // Ids made beforehand: the timed loop measures the scheduler, not formatting.
        let ids: Vec<String> = (1..=a.ops as u64)
            .map(|k| format!("j{}", seq + k))
            .collect();
        let now = (rep as i64 + 1) * 1_000;
        let t = Instant::now();
        for id in ids {
            let job = s.pick(now).expect("a job is always waiting");
            s.finished(&job.user);
            seq += 1;
            s.enqueue(QueuedJob {
                id,
                user: job.user,
                seq,
                number: seq as f64,
                priority: None,
                enqueued_at_ms: now,
            })
            .expect("unique ids and seqs");
        }
        out.push(t.elapsed().as_nanos() as f64 / a.ops as f64);
        std::hint::black_box(&s);
    }
    out
}

fn new_job(i: u64, a: &Args) -> NewJob {
    let u = user(i as usize, a.participants);
    NewJob {
        id: format!("job-{i:08}"),
        client_id: Some(format!("bench-{u}")),
        user: u,
        number: i as f64,
        priority: None,
        prompt: common::tiny_prompt(i),
        extra_data: json!({}),
        outputs_to_execute: vec!["2".into()],
    }
}

struct StoreFigures {
    fill: Duration,
    take_ns: Vec<f64>,
    take_samples: Vec<Duration>,
    submit_ns: Vec<f64>,
    submit_samples: Vec<Duration>,
}

async fn queue_reps(policy: Policy, a: &Args) -> Result<StoreFigures> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(
        comfyume_store::sqlite::SqliteStore::open(&dir.path().join("comfyume.db"))
            .await
            .context("opening the SQLite store")?,
    );
    let cfg = QueueConfig {
        policy,
        max_running_per_user: 1,
        max_queued_per_user: u32::MAX,
        max_queue_depth: u32::MAX,
        aging_ms: 60_000,
    };
    let (q, _) = Queue::open(store.clone(), cfg, Arc::new(NoEvents)).await?;
    let t = Instant::now();
    let mut next = 0u64;
    for _ in 0..a.jobs {
        next += 1;
        q.submit(new_job(next, a)).await?;
    }
    let fill = t.elapsed();
    let mut f = StoreFigures {
        fill,
        take_ns: Vec::new(),
        take_samples: Vec::new(),
        submit_ns: Vec::new(),
        submit_samples: Vec::new(),
    };
    for _ in 0..a.reps {
        let (mut take_total, mut submit_total) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..a.store_ops {
            let t = Instant::now();
            let (rec, claim) = q
                .take_next(|| true, |_| Some("bench".to_string()))
                .await?
                .context("a job is always waiting")?;
            let dt = t.elapsed();
            take_total += dt;
            f.take_samples.push(dt);
            // What the dispatcher does when the job ends, untimed.
            store
                .transition(
                    &rec.id,
                    &[JobState::Dispatched],
                    JobState::Succeeded,
                    JobPatch {
                        finished_at_ms: Some(comfyume_dispatch::queue::now_ms()),
                        ..Default::default()
                    },
                )
                .await?;
            drop(claim);
            next += 1;
            let t = Instant::now();
            q.submit(new_job(next, a)).await?;
            let dt = t.elapsed();
            submit_total += dt;
            f.submit_samples.push(dt);
        }
        f.take_ns
            .push(take_total.as_nanos() as f64 / a.store_ops as f64);
        f.submit_ns
            .push(submit_total.as_nanos() as f64 / a.store_ops as f64);
    }
    Ok(f)
}

pub async fn run(a: Args) -> Result<()> {
    let mut rows = Vec::new();
    let mut js = serde_json::Map::new();
    for policy in Policy::ALL {
        let mut reps = scheduler_reps(policy, &a);
        let spread = format!(
            "{:.0}..{:.0}",
            reps.iter().cloned().fold(f64::MAX, f64::min),
            reps.iter().cloned().fold(0.0, f64::max)
        );
        let med = common::median(&mut reps);
        rows.push(vec![
            format!("Scheduler::pick+finished+enqueue ({policy})"),
            format!("{med:.0}"),
            spread,
            format!("{} x {}", a.reps, a.ops),
        ]);
        js.insert(format!("scheduler_{policy}_ns"), json!(med.round()));
    }
    let policy = Policy::RoundRobin;
    let f = queue_reps(policy, &a).await?;
    let take_p = common::summarize(&f.take_samples);
    let submit_p = common::summarize(&f.submit_samples);
    let (mut take, mut submit) = (f.take_ns.clone(), f.submit_ns.clone());
    let take_med = common::median(&mut take);
    let submit_med = common::median(&mut submit);
    rows.push(vec![
        format!("Queue::take_next, SQLite ({policy})"),
        format!("{take_med:.0}"),
        format!(
            "p99 {:.0}, max {:.0}",
            take_p.p99_us * 1000.0,
            take_p.max_us * 1000.0
        ),
        format!("{} x {}", a.reps, a.store_ops),
    ]);
    rows.push(vec![
        format!(
            "Queue::submit, SQLite, at depth {} (for comparison)",
            a.jobs
        ),
        format!("{submit_med:.0}"),
        format!(
            "p99 {:.0}, max {:.0}",
            submit_p.p99_us * 1000.0,
            submit_p.max_us * 1000.0
        ),
        format!("{} x {}", a.reps, a.store_ops),
    ]);
    common::print_machine();
    println!(
        "{} jobs waiting from {} participants; filling the SQLite queue took {:.2} s ({:.0} submissions/s, depth 0 -> {})",
        a.jobs,
        a.participants,
        f.fill.as_secs_f64(),
        a.jobs as f64 / f.fill.as_secs_f64(),
        a.jobs
    );
    common::print_table(
        "pick",
        &["operation", "median ns/op", "spread (ns)", "reps x ops"],
        &rows,
    );
    js.insert("bench".into(), json!("pick"));
    js.insert("machine".into(), common::machine());
    js.insert("jobs".into(), json!(a.jobs));
    js.insert("participants".into(), json!(a.participants));
    js.insert("queue_take_next_ns".into(), json!(take_med.round()));
    js.insert("queue_submit_ns".into(), json!(submit_med.round()));
    js.insert(
        "queue_fill_per_s".into(),
        json!((a.jobs as f64 / f.fill.as_secs_f64()).round()),
    );
    println!("{}", serde_json::Value::Object(js));
    Ok(())
}
