//! The dispatcher's failure paths at the production timeouts (JOB_TIMEOUT 600 s,
//! JOB_START_TIMEOUT 600 s, a 15 s grace, a reconcile every 30 s), in virtual
//! time: a hanging backend, a backend that never starts the job, a backend
//! whose stop never answers, a lost backend, a panic, a submission whose caller
//! went away, a store answer that was lost after it committed, and a store that
//! cannot record a job's end. Every accepted job ends, once, within a bounded
//! time, and its slot and its owner's cap are free again.

mod support;

use std::sync::Arc;
use std::time::Duration;

use comfyume_dispatch::{Backend, DispatchConfig, QueueConfig};
use comfyume_store::JobState;
use support::{Call, Journal, Rig, Script, Scripted, new_job, rig};

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn production() -> DispatchConfig {
    let cfg = DispatchConfig::default();
    assert_eq!(cfg.job_timeout, SECS(600));
    assert_eq!(cfg.start_timeout, SECS(600));
    assert_eq!(cfg.stop_grace, SECS(15));
    assert_eq!(cfg.reconcile_every, SECS(30));
    cfg
}

async fn one_backend(b: Scripted, journal: Arc<Journal>) -> Rig {
    rig(
        vec![Arc::new(b) as Arc<dyn Backend>],
        production(),
        QueueConfig::default(),
        journal,
    )
    .await
}

/// Two backends in this order (both idle: a job lands on the first), production timeouts.
async fn two_backends(a: Scripted, b: Scripted, journal: &Arc<Journal>) -> Rig {
    rig(
        vec![Arc::new(a) as Arc<dyn Backend>, Arc::new(b)],
        production(),
        QueueConfig::default(),
        journal.clone(),
    )
    .await
}

fn runs_of(journal: &Journal, job: &str) -> Vec<String> {
    journal
        .calls()
        .into_iter()
        .filter_map(|(_, b, c)| matches!(c, Call::Run { job: j, .. } if j == job).then_some(b))
        .collect()
}

fn error_type(rec: &comfyume_store::JobRecord) -> String {
    rec.error.as_ref().unwrap()["exception_type"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(start_paused = true)]
async fn a_hanging_backend_whose_stop_never_answers_frees_slot_and_cap_within_timeout_plus_grace() {
    let journal = Arc::new(Journal::default());
    let mut b = Scripted::new("gpu", 2, Script::runs(SECS(1)), &journal)
        .script("hang", Script::HangAfterStart);
    b.stop_answers = false;
    let r = one_backend(b, journal.clone()).await;
    // The same participant's second job waits for their running cap (1).
    r.queue.submit(new_job("hang", "u1")).await.unwrap();
    r.queue.submit(new_job("next", "u1")).await.unwrap();

    r.at(SECS(1)).await;
    assert_eq!(r.state("hang").await, JobState::Running);
    assert_eq!(
        r.state("next").await,
        JobState::Queued,
        "capped behind the running job"
    );
    assert_eq!(r.active("gpu"), 1);

    // Still within JOB_TIMEOUT + grace: nothing is given up yet.
    r.at(SECS(600 + 15 - 1)).await;
    assert_eq!(r.state("hang").await, JobState::Running);
    assert_eq!(r.state("next").await, JobState::Queued);

    r.at(SECS(600 + 15 + 3)).await;
    let hung = r.job("hang").await;
    assert_eq!(hung.state, JobState::Failed);
    assert_eq!(error_type(&hung), "ComfyUMe.JobTimeout");
    // The cap and the slot came back: the next job ran and ended.
    assert_eq!(r.state("next").await, JobState::Succeeded);
    assert_eq!(r.active("gpu"), 0);
    // The backend was told to stop the abandoned job (it never answered).
    assert!(
        journal
            .calls()
            .iter()
            .any(|(_, _, c)| *c == Call::Stop { job: "hang".into() })
    );
    // The participant heard the failure and the end marker.
    let msgs = r.events.texts("u1");
    let end = msgs
        .iter()
        .position(|m| m["type"] == "executing" && m["data"]["prompt_id"] == "hang")
        .expect("end marker");
    assert!(msgs[..end].iter().any(|m| m["type"] == "execution_error"));
}

#[tokio::test(start_paused = true)]
async fn job_timeout_counts_from_the_start_not_from_the_hand_over() {
    let journal = Arc::new(Journal::default());
    // Two slots: the second job is handed over in advance and waits 595 s in
    // the GPU's own queue behind the first, then runs 100 s.
    let b = Scripted::new("gpu", 2, Script::runs(SECS(1)), &journal)
        .script("first", Script::runs(SECS(595)))
        .script(
            "second",
            Script::Run {
                wait: SECS(595),
                run: SECS(100),
            },
        );
    let r = one_backend(b, journal).await;
    r.queue.submit(new_job("first", "u1")).await.unwrap();
    r.queue.submit(new_job("second", "u2")).await.unwrap();
    r.at(SECS(1)).await;
    assert_eq!(
        r.state("second").await,
        JobState::Dispatched,
        "handed over in advance"
    );
    r.at(SECS(700)).await;
    assert_eq!(r.state("first").await, JobState::Succeeded);
    let second = r.job("second").await;
    assert_eq!(second.state, JobState::Succeeded, "{:?}", second.error);
    assert_eq!(second.attempts, 1);
    assert_eq!(r.active("gpu"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_job_a_backend_never_starts_is_retried_elsewhere_after_the_start_timeout() {
    let journal = Arc::new(Journal::default());
    let mut stuck = Scripted::new("gpu-a", 1, Script::NeverStart, &journal);
    stuck.stop_answers = false;
    let good = Scripted::new("gpu-b", 1, Script::runs(SECS(5)), &journal);
    let r = two_backends(stuck, good, &journal).await;
    // Both idle: the job lands on the first, gpu-a; another participant's on gpu-b.
    r.queue.submit(new_job("job", "u1")).await.unwrap();
    r.queue.submit(new_job("busy", "u2")).await.unwrap();
    r.at(SECS(1)).await;
    assert_eq!(runs_of(&journal, "job"), ["gpu-a"]);

    r.at(SECS(600 + 15 - 1)).await;
    assert_eq!(r.state("job").await, JobState::Dispatched);
    r.at(SECS(600 + 15 + 6)).await;
    let job = r.job("job").await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempts, 2);
    assert_eq!(runs_of(&journal, "job"), ["gpu-a", "gpu-b"]);
    assert_eq!((r.active("gpu-a"), r.active("gpu-b")), (0, 0));
    // The participant was told, and never saw the abandoned attempt end.
    let msgs = r.events.texts("u1");
    assert!(msgs.iter().any(|m| {
        m["type"] == "comfyume"
            && m["data"]["message"]
                .as_str()
                .unwrap()
                .contains("did not start the job within 600 s")
    }));
    assert!(!msgs.iter().any(|m| m["type"] == "execution_interrupted"));
}

#[tokio::test(start_paused = true)]
async fn a_lost_backend_is_told_to_stop_the_job_before_it_runs_elsewhere() {
    let journal = Arc::new(Journal::default());
    let flaky = Scripted::new("gpu-a", 1, Script::LoseAfter(SECS(3)), &journal);
    let good = Scripted::new("gpu-b", 1, Script::runs(SECS(5)), &journal);
    let r = two_backends(flaky, good, &journal).await;
    r.queue.submit(new_job("job", "u1")).await.unwrap();
    r.at(SECS(60)).await;
    assert_eq!(r.state("job").await, JobState::Succeeded);
    let calls: Vec<(String, Call)> = journal
        .calls()
        .into_iter()
        .map(|(_, b, c)| (b, c))
        .filter(|(_, c)| !matches!(c, Call::Ended { .. }))
        .collect();
    assert_eq!(
        calls,
        [
            (
                "gpu-a".into(),
                Call::Run {
                    job: "job".into(),
                    attempt: 1
                }
            ),
            ("gpu-a".into(), Call::Stop { job: "job".into() }),
            (
                "gpu-b".into(),
                Call::Run {
                    job: "job".into(),
                    attempt: 2
                }
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_a_job_fails_it_and_frees_slot_and_cap() {
    let journal = Arc::new(Journal::default());
    let b = Scripted::new("gpu", 1, Script::runs(SECS(1)), &journal).script("boom", Script::Panic);
    let r = one_backend(b, journal).await;
    r.queue.submit(new_job("boom", "u1")).await.unwrap();
    r.queue.submit(new_job("after", "u1")).await.unwrap();
    r.at(SECS(10)).await;
    let boom = r.job("boom").await;
    assert_eq!(boom.state, JobState::Failed);
    assert_eq!(error_type(&boom), "ComfyUMe.InternalError");
    assert_eq!(r.state("after").await, JobState::Succeeded);
    assert_eq!(r.active("gpu"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_submission_whose_caller_went_away_after_the_commit_still_runs() {
    let journal = Arc::new(Journal::default());
    let b = Scripted::new("gpu", 1, Script::runs(SECS(1)), &journal);
    let r = one_backend(b, journal.clone()).await;
    r.store.faults.lock().unwrap().enqueue_answer_delay = Some(SECS(2));
    // The tab closes while the store's answer is on its way: the job is committed.
    tokio::select! {
        _ = r.queue.submit(new_job("orphan", "u1")) => panic!("answered too early"),
        _ = tokio::time::sleep(SECS(1)) => {}
    }
    r.at(SECS(10)).await;
    assert_eq!(r.state("orphan").await, JobState::Succeeded);
    assert_eq!(runs_of(&journal, "orphan"), ["gpu"]);
}

#[tokio::test(start_paused = true)]
async fn a_dispatch_whose_commit_answer_was_lost_runs_exactly_once() {
    let journal = Arc::new(Journal::default());
    let b = Scripted::new("gpu", 1, Script::runs(SECS(1)), &journal);
    let r = one_backend(b, journal.clone()).await;
    r.store
        .faults
        .lock()
        .unwrap()
        .dispatch_commits_then_times_out = true;
    r.queue.submit(new_job("job", "u1")).await.unwrap();
    // The store says dispatched; nobody runs it until the reconciler (due at
    // once after such an error) adopts it.
    r.at(SECS(40)).await;
    let job = r.job("job").await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(runs_of(&journal, "job"), ["gpu"], "run exactly once");
    assert_eq!(r.active("gpu"), 0);
    assert_eq!(r.queue.queued_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_job_the_scheduler_never_heard_of_is_picked_up_by_the_periodic_reconcile() {
    let journal = Arc::new(Journal::default());
    let b = Scripted::new("gpu", 1, Script::runs(SECS(1)), &journal);
    let r = one_backend(b, journal.clone()).await;
    // Committed behind the queue's back (as a lost hand-over would leave it).
    use comfyume_store::JobStore;
    r.store
        .enqueue(new_job("stray", "u1"), Default::default())
        .await
        .unwrap();
    r.at(SECS(29)).await;
    assert_eq!(r.state("stray").await, JobState::Queued);
    r.at(SECS(32)).await;
    assert_eq!(r.state("stray").await, JobState::Succeeded);
    assert_eq!(runs_of(&journal, "stray"), ["gpu"]);
}

#[tokio::test(start_paused = true)]
async fn a_relayed_execution_error_names_no_server_paths() {
    let journal = Arc::new(Journal::default());
    let b = Scripted::new("gpu", 1, Script::RaiseWithTraceback, &journal);
    let r = one_backend(b, journal).await;
    r.queue.submit(new_job("err", "u1")).await.unwrap();
    r.at(SECS(5)).await;
    assert_eq!(r.state("err").await, JobState::Failed);
    let msgs = r.events.texts("u1");
    let err = msgs
        .iter()
        .find(|m| m["type"] == "execution_error")
        .expect("the error reached the participant");
    let text = err.to_string();
    assert!(!text.contains("/home/comfy"), "{text}");
    assert!(
        text.contains("execution.py") && text.contains("node.py"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_backend_does_not_burn_a_jobs_attempts_while_a_healthy_one_is_busy() {
    let journal = Arc::new(Journal::default());
    let dead = Scripted::new("gpu-a", 2, Script::Unreachable, &journal);
    let busy = Scripted::new("gpu-b", 1, Script::runs(SECS(5)), &journal)
        .script("long", Script::runs(SECS(60)));
    // gpu-b first, so the long job lands there (both idle: the first wins).
    let r = two_backends(busy, dead, &journal).await;
    // gpu-b busy for a minute; gpu-a has free slots but refuses everything.
    r.queue.submit(new_job("long", "u2")).await.unwrap();
    r.at(SECS(1)).await;
    r.queue.submit(new_job("job", "u1")).await.unwrap();
    r.at(SECS(30)).await;
    // One attempt lost on the dead server, then it waits for the healthy one.
    assert_eq!(runs_of(&journal, "job"), ["gpu-a"]);
    assert_eq!(r.state("job").await, JobState::Queued);
    r.at(SECS(70)).await;
    let job = r.job("job").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(runs_of(&journal, "job"), ["gpu-a", "gpu-b"]);
}

#[tokio::test(start_paused = true)]
async fn a_full_data_disk_fails_the_job_once_with_its_reason_and_runs_it_nowhere_else() {
    let journal = Arc::new(Journal::default());
    let a = Scripted::new("gpu-a", 1, Script::DiskFull, &journal);
    let b = Scripted::new("gpu-b", 1, Script::DiskFull, &journal);
    let r = two_backends(a, b, &journal).await;
    r.queue.submit(new_job("job", "u1")).await.unwrap();
    r.at(SECS(10)).await;
    let job = r.job("job").await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(error_type(&job), "ComfyUMe.OutputNotSaved");
    let msg = job.error.as_ref().unwrap()["exception_message"].to_string();
    assert!(msg.contains("No space left on device"), "{msg}");
    assert_eq!(runs_of(&journal, "job").len(), 1, "not run again elsewhere");
    // Not the GPU's fault: both stay in good standing.
    r.queue.submit(new_job("next", "u1")).await.unwrap();
    r.at(SECS(20)).await;
    assert_eq!(runs_of(&journal, "next").len(), 1);
}

/// A store that cannot record a job's end (a full disk): the job is found again by the
/// reconciler and re-attached, but at a pace that slows down (1 s, 2 s, 4 s, ... up to
/// the 30 s reconcile), not hundreds of times a second; once the store can write again,
/// the job ends, once.
#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_record_endings_is_retried_at_a_growing_pace() {
    let journal = Arc::new(Journal::default());
    let r = one_backend(
        Scripted::new("gpu-a", 1, Script::runs(SECS(1)), &journal),
        journal.clone(),
    )
    .await;
    r.store.faults.lock().unwrap().endings_fail = true;
    r.queue.submit(new_job("job", "u1")).await.unwrap();
    r.at(SECS(120)).await;
    let runs = runs_of(&journal, "job").len();
    // First run, then a re-attach per reconcile: after 1+2+4+8+16+30+30 s about 7-8.
    assert!(
        (2..=10).contains(&runs),
        "{runs} runs in 120 s while the store could not write"
    );
    r.store.faults.lock().unwrap().endings_fail = false;
    r.at(SECS(180)).await;
    let job = r.job("job").await;
    assert_eq!(
        job.state,
        JobState::Succeeded,
        "{job:?} {:?}",
        journal.calls()
    );
    let settled = runs_of(&journal, "job").len();
    r.at(SECS(300)).await;
    assert_eq!(
        runs_of(&journal, "job").len(),
        settled,
        "nothing after it ended"
    );
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_job_is_told_to_stop_until_its_backend_confirms() {
    let journal = Arc::new(Journal::default());
    let b = Scripted::new("gpu", 1, Script::runs(SECS(1)), &journal)
        .script("hang", Script::HangAfterStart);
    // The server does not answer the first three requests to stop it, then does.
    b.stop_failures
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let r = one_backend(b, journal.clone()).await;
    r.queue.submit(new_job("hang", "u1")).await.unwrap();
    r.at(SECS(600 + 15 + 5 + 10 + 20 + 40 + 60)).await;
    let stops = journal
        .calls()
        .iter()
        .filter(|(_, _, c)| *c == Call::Stop { job: "hang".into() })
        .count();
    assert_eq!(stops, 4, "asked until it confirmed, then no more");
    assert_eq!(r.state("hang").await, JobState::Failed);
}
