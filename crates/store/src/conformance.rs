//! The behaviour every [`Store`] backend must show, as stories that panic on the first
//! deviation. A backend's test file implements [`Backend`] and expands
//! [`conformance_tests!`](crate::conformance_tests) (one `#[tokio::test]` per story), or calls
//! [`run_all`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;

use crate::{
    AccountChangeKind, EnqueueLimits, JobOrder, JobPatch, JobQuery, JobRecord, JobState, LimitKind,
    NewJob, PasswordScheme, Role, Store, StoreError,
};

/// How the suite gets stores from a backend.
#[async_trait]
pub trait Backend: Send + Sync {
    /// A new, empty store, and a key naming its storage (file path, key prefix, ...).
    async fn create(&self) -> (Arc<dyn Store>, String);
    /// Closes every handle this backend opened on `key`, as a restart would, and opens the
    /// same storage again.
    async fn reopen(&self, key: &str) -> Arc<dyn Store>;
    /// Another handle on `key`'s storage while the others stay open, as a second process
    /// (the CLI while the server runs) would open it.
    async fn open_another(&self, key: &str) -> Arc<dyn Store>;
}

/// Expands to one `#[tokio::test]` per story, each calling `$backend` (an expression giving a
/// value that implements [`Backend`]) for its stores.
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr) => {
        $crate::conformance_tests!(@each $backend;
            users_crud, passwords_and_logins, bcrypt_import_and_rehash, disabled_users,
            sessions, meta, enqueue_roundtrip, durability_across_reopen, duplicate_ids,
            enqueue_limits, transitions_cas, listing, delete_and_clear_isolation, count_jobs,
            concurrent_enqueues, concurrent_transitions, job_priority_patch, account_changes,
            audit_log, dashboard_queries, prompt_ids_per_user);
    };
    (@each $backend:expr; $($story:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $story() {
                $crate::conformance::$story(&$backend).await;
            }
        )*
    };
}

/// Every story in turn.
pub async fn run_all(b: &dyn Backend) {
    users_crud(b).await;
    passwords_and_logins(b).await;
    bcrypt_import_and_rehash(b).await;
    disabled_users(b).await;
    sessions(b).await;
    meta(b).await;
    enqueue_roundtrip(b).await;
    durability_across_reopen(b).await;
    duplicate_ids(b).await;
    enqueue_limits(b).await;
    transitions_cas(b).await;
    listing(b).await;
    delete_and_clear_isolation(b).await;
    count_jobs(b).await;
    concurrent_enqueues(b).await;
    concurrent_transitions(b).await;
    job_priority_patch(b).await;
    account_changes(b).await;
    audit_log(b).await;
    dashboard_queries(b).await;
    prompt_ids_per_user(b).await;
}

/// The instructor's actions are kept in order, newest first when listed, paged by `before`,
/// and survive a reopen.
pub async fn audit_log(b: &dyn Backend) {
    let (s, key) = b.create().await;
    assert!(s.list_audit(None, 10).await.unwrap().is_empty());
    let mut seqs = Vec::new();
    for i in 0..5 {
        let e = s
            .append_audit(crate::NewAudit {
                actor: "teacher".into(),
                action: format!("job.cancel{i}"),
                target: (i % 2 == 0).then(|| format!("job{i}")),
                detail: if i == 4 {
                    serde_json::Value::Null
                } else {
                    json!({"n": i, "why": "<b>demo</b>"})
                },
            })
            .await
            .unwrap();
        assert_eq!(e.actor, "teacher");
        assert!(e.at_ms > 0);
        seqs.push(e.seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let all = s.list_audit(None, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        [
            "job.cancel4",
            "job.cancel3",
            "job.cancel2",
            "job.cancel1",
            "job.cancel0"
        ]
    );
    assert_eq!(all[1].target, None);
    assert_eq!(all[2].target.as_deref(), Some("job2"));
    assert_eq!(all[3].detail, json!({"n": 1, "why": "<b>demo</b>"}));
    assert_eq!(all[0].detail, json!({}), "a null detail is stored as {{}}");
    let page = s.list_audit(Some(all[1].seq), 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [all[2].seq, all[3].seq]
    );
    drop(s);
    let s = b.reopen(&key).await;
    assert_eq!(s.list_audit(None, 100).await.unwrap(), all);
}

/// The dashboard's light listings agree with the full records: summaries filtered by state
/// and creation time, newest results first; per-participant counts and GPU time.
pub async fn dashboard_queries(b: &dyn Backend) {
    let (s, _) = b.create().await;
    assert!(s.user_job_stats().await.unwrap().is_empty());
    for (id, user) in [
        ("d0", "a"),
        ("d1", "a"),
        ("d2", "b"),
        ("d3", "b"),
        ("d4", "a"),
    ] {
        s.enqueue(new_job(id, user), NO_LIMITS).await.unwrap();
    }
    let t0 = s.get_job("d0").await.unwrap().unwrap().created_at_ms;
    // d0 and d2 ran (1 s and 3 s on the GPU) and succeeded, d2 last; d1 failed; d3 runs.
    for (id, to, ran) in [
        ("d0", JobState::Succeeded, 1000),
        ("d1", JobState::Failed, 0),
        ("d2", JobState::Succeeded, 3000),
    ] {
        s.transition(
            id,
            &[JobState::Queued],
            JobState::Running,
            JobPatch {
                started_at_ms: Some(t0 + 10),
                backend: Some("gpu-1".into()),
                attempts_inc: true,
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
        s.transition(
            id,
            &[JobState::Running],
            to,
            JobPatch {
                finished_at_ms: Some(t0 + 10 + ran + if id == "d2" { 5000 } else { 0 }),
                started_at_ms: Some(t0 + 10 + if id == "d2" { 5000 } else { 0 }),
                outputs: Some(json!({"9": {"images": [{"filename": format!("{id}.png")}]}})),
                error: (to == JobState::Failed).then(|| json!({"exception_message": "boom"})),
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
    }
    s.transition(
        "d3",
        &[JobState::Queued],
        JobState::Running,
        JobPatch {
            started_at_ms: Some(t0 + 20),
            ..JobPatch::default()
        },
    )
    .await
    .unwrap();

    let results = s
        .job_summaries(&crate::SummaryQuery {
            states: vec![JobState::Succeeded],
            order: crate::SummaryOrder::FinishedDesc,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids_of(&results), ["d2", "d0"], "newest result first");
    let full = s.get_job("d2").await.unwrap().unwrap();
    assert_eq!(results[0], crate::JobSummary::from(&full));
    assert_eq!(results[0].outputs["9"]["images"][0]["filename"], "d2.png");

    let all = s
        .job_summaries(&crate::SummaryQuery::default())
        .await
        .unwrap();
    assert_eq!(ids_of(&all), ["d0", "d1", "d2", "d3", "d4"], "seq order");
    let failed = s
        .job_summaries(&crate::SummaryQuery {
            states: vec![JobState::Failed],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(failed[0].error, Some(json!({"exception_message": "boom"})));
    let limited = s
        .job_summaries(&crate::SummaryQuery {
            order: crate::SummaryOrder::FinishedDesc,
            limit: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        ids_of(&limited),
        ["d2", "d0", "d1"],
        "unfinished jobs sort last"
    );
    let none = s
        .job_summaries(&crate::SummaryQuery {
            created_since_ms: Some(crate::now_ms() + 60_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());

    let stats = s.user_job_stats().await.unwrap();
    assert_eq!(
        stats.iter().map(|u| u.user.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let a = &stats[0];
    assert_eq!(a.counts.get(&JobState::Succeeded), Some(&1));
    assert_eq!(a.counts.get(&JobState::Failed), Some(&1));
    assert_eq!(a.counts.get(&JobState::Queued), Some(&1));
    assert_eq!(a.counts.get(&JobState::Running), None);
    assert_eq!(a.gpu_ms, 1000, "only d0 ran to an end (d1 failed at once)");
    let b_ = &stats[1];
    assert_eq!(b_.counts.get(&JobState::Running), Some(&1));
    assert_eq!(b_.gpu_ms, 3000);
    assert_eq!(b_.last_activity_ms, t0 + 10 + 3000 + 5000);
}

fn ids_of(v: &[crate::JobSummary]) -> Vec<&str> {
    v.iter().map(|j| j.id.as_str()).collect()
}

/// The instructor sets, changes and clears a waiting job's own priority
/// level; other fields and other jobs stay as they were, and it survives a reopen.
pub async fn job_priority_patch(b: &dyn Backend) {
    let (s, key) = b.create().await;
    s.enqueue(new_job("p1", "u1"), NO_LIMITS).await.unwrap();
    s.enqueue(new_job("p2", "u1"), NO_LIMITS).await.unwrap();
    let set = JobPatch {
        priority: Some(Some(3)),
        ..JobPatch::default()
    };
    let r = s
        .transition("p1", &[JobState::Queued], JobState::Queued, set)
        .await
        .unwrap();
    assert_eq!(r.priority, Some(3));
    assert_eq!(r.attempts, 0);
    assert_eq!(s.get_job("p2").await.unwrap().unwrap().priority, None);
    // A patch without `priority` leaves it alone.
    let r = s
        .transition(
            "p1",
            &[JobState::Queued],
            JobState::Queued,
            JobPatch::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.priority, Some(3));
    drop(s);
    let s = b.reopen(&key).await;
    assert_eq!(s.get_job("p1").await.unwrap().unwrap().priority, Some(3));
    let clear = JobPatch {
        priority: Some(None),
        ..JobPatch::default()
    };
    let r = s
        .transition("p1", &[JobState::Queued], JobState::Queued, clear)
        .await
        .unwrap();
    assert_eq!(r.priority, None);
}

/// A small job of `user`, with a workflow id in `extra_pnginfo` as the frontend sends it.
pub fn new_job(id: &str, user: &str) -> NewJob {
    NewJob {
        id: id.to_owned(),
        user: user.to_owned(),
        number: 1.0,
        priority: None,
        prompt: json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 64}}}),
        extra_data: json!({"client_id": "c", "extra_pnginfo": {"workflow": {"id": format!("wf-{user}")}}}),
        outputs_to_execute: vec!["1".into()],
        client_id: Some("c".into()),
    }
}

const NO_LIMITS: EnqueueLimits = EnqueueLimits {
    max_queued_per_user: 0,
    max_queue_depth: 0,
};

fn ids(jobs: &[JobRecord]) -> Vec<&str> {
    jobs.iter().map(|j| j.id.as_str()).collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

async fn finish(s: &dyn Store, id: &str, to: JobState) -> JobRecord {
    s.transition(
        id,
        &JobState::UNFINISHED,
        to,
        JobPatch {
            finished_at_ms: Some(crate::now_ms()),
            ..JobPatch::default()
        },
    )
    .await
    .unwrap()
}

pub async fn users_crud(b: &dyn Backend) {
    let (s, _) = b.create().await;
    assert!(s.list_users().await.unwrap().is_empty());

    let before = crate::now_ms();
    let bob = s
        .create_user("bob", "hunter2", Role::Participant)
        .await
        .unwrap();
    assert_eq!(bob.name, "bob");
    assert_eq!(bob.role, Role::Participant);
    assert!(!bob.disabled);
    assert!(bob.created_at_ms >= before);
    assert_eq!(bob.last_login_ms, None);
    s.create_user("alice", "pw", Role::Admin).await.unwrap();

    assert!(matches!(
        s.create_user("bob", "other", Role::Admin).await,
        Err(StoreError::AlreadyExists)
    ));
    // Names are unique without regard to case (two workspaces nobody can tell apart),
    // for imported accounts too.
    for same in ["BOB", "Bob", "ALICE"] {
        assert!(
            matches!(
                s.create_user(same, "other", Role::Participant).await,
                Err(StoreError::AlreadyExists)
            ),
            "{same} beside an existing account"
        );
    }
    assert!(matches!(
        s.import_bcrypt("bOb", &bcrypt::hash("pw", 4).unwrap(), Role::Participant)
            .await,
        Err(StoreError::AlreadyExists)
    ));
    for bad in ["", "../etc", "a b", ".hidden", &"x".repeat(65)] {
        assert!(
            matches!(
                s.create_user(bad, "pw", Role::Participant).await,
                Err(StoreError::Other(_))
            ),
            "name {bad:?} accepted"
        );
    }
    assert!(matches!(
        s.create_user("carol", "", Role::Participant).await,
        Err(StoreError::Other(_))
    ));

    assert_eq!(s.get_user("bob").await.unwrap(), Some(bob.clone()));
    assert_eq!(s.get_user("nobody").await.unwrap(), None);
    assert_eq!(s.get_user("../x").await.unwrap(), None);
    let names: Vec<String> = s
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(
        s.password_scheme("bob").await.unwrap(),
        Some(PasswordScheme::Argon2id)
    );

    s.remove_user("bob").await.unwrap();
    assert_eq!(s.get_user("bob").await.unwrap(), None);
    assert!(matches!(
        s.remove_user("bob").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.set_disabled("bob", true).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.set_password("bob", "x").await,
        Err(StoreError::NotFound)
    ));
    // The name is free again.
    s.create_user("bob", "again", Role::Participant)
        .await
        .unwrap();
}

pub async fn passwords_and_logins(b: &dyn Backend) {
    let (s, _) = b.create().await;
    s.create_user("u1", "correct horse", Role::Participant)
        .await
        .unwrap();

    assert_eq!(s.verify_password("u1", "wrong").await.unwrap(), None);
    assert_eq!(s.verify_password("nobody", "x").await.unwrap(), None);
    assert_eq!(s.verify_password("../bad name", "x").await.unwrap(), None);
    assert_eq!(s.get_user("u1").await.unwrap().unwrap().last_login_ms, None);

    let before = crate::now_ms();
    let u = s
        .verify_password("u1", "correct horse")
        .await
        .unwrap()
        .expect("right password verifies");
    assert_eq!(u.name, "u1");
    let last = u.last_login_ms.expect("login recorded");
    assert!(last >= before);
    assert_eq!(
        s.get_user("u1").await.unwrap().unwrap().last_login_ms,
        Some(last)
    );

    let token = s.create_session("u1", 60_000).await.unwrap();
    s.set_password("u1", "battery staple").await.unwrap();
    assert_eq!(
        s.verify_password("u1", "correct horse").await.unwrap(),
        None
    );
    assert!(
        s.verify_password("u1", "battery staple")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        s.session_user(&token).await.unwrap(),
        None,
        "a new password ends old sessions"
    );
    assert!(matches!(
        s.set_password("u1", "").await,
        Err(StoreError::Other(_))
    ));
}

pub async fn bcrypt_import_and_rehash(b: &dyn Backend) {
    let (s, _) = b.create().await;
    let b2b = bcrypt::hash("secret-1", 4).unwrap();
    assert!(b2b.starts_with("$2b$"));
    // htpasswd -B writes $2y$; $2a$ comes from older tools. Same algorithm.
    let b2y = bcrypt::hash("secret-2", 4)
        .unwrap()
        .replacen("$2b$", "$2y$", 1);
    let b2a = bcrypt::hash("secret-3", 4)
        .unwrap()
        .replacen("$2b$", "$2a$", 1);

    let u = s
        .import_bcrypt("user001", &b2y, Role::Participant)
        .await
        .unwrap();
    assert_eq!(u.name, "user001");
    assert!(!u.disabled);
    s.import_bcrypt("user002", &b2b, Role::Participant)
        .await
        .unwrap();
    s.import_bcrypt("teacher", &b2a, Role::Admin).await.unwrap();
    assert!(matches!(
        s.import_bcrypt("user001", &b2b, Role::Participant).await,
        Err(StoreError::AlreadyExists)
    ));
    for bad in [
        "plaintext",
        "$apr1$abc$def",
        "$2y$04$tooshort",
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
    ] {
        assert!(
            matches!(
                s.import_bcrypt("user009", bad, Role::Participant).await,
                Err(StoreError::Other(_))
            ),
            "accepted {bad:?}"
        );
    }
    assert!(matches!(
        s.import_bcrypt("bad name", &b2b, Role::Participant).await,
        Err(StoreError::Other(_))
    ));
    assert_eq!(s.get_user("user009").await.unwrap(), None);

    assert_eq!(
        s.password_scheme("user001").await.unwrap(),
        Some(PasswordScheme::Bcrypt)
    );
    assert_eq!(s.verify_password("user001", "wrong").await.unwrap(), None);
    assert_eq!(
        s.password_scheme("user001").await.unwrap(),
        Some(PasswordScheme::Bcrypt),
        "a failed login must not rehash"
    );
    assert!(
        s.verify_password("user001", "secret-2")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        s.password_scheme("user001").await.unwrap(),
        Some(PasswordScheme::Argon2id),
        "rehashed at the first successful login"
    );
    // Still the same password after the rehash.
    assert!(
        s.verify_password("user001", "secret-2")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(s.verify_password("user001", "wrong").await.unwrap(), None);

    assert!(
        s.verify_password("user002", "secret-1")
            .await
            .unwrap()
            .is_some()
    );
    let t = s
        .verify_password("teacher", "secret-3")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.role, Role::Admin);
    assert_eq!(s.password_scheme("nobody").await.unwrap(), None);
}

pub async fn disabled_users(b: &dyn Backend) {
    let (s, _) = b.create().await;
    s.create_user("d", "pw", Role::Participant).await.unwrap();
    let token = s.create_session("d", 60_000).await.unwrap();

    s.set_disabled("d", true).await.unwrap();
    assert!(s.get_user("d").await.unwrap().unwrap().disabled);
    assert_eq!(s.verify_password("d", "pw").await.unwrap(), None);
    assert_eq!(s.session_user(&token).await.unwrap(), None);
    assert!(matches!(
        s.create_session("d", 60_000).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        s.get_user("d").await.unwrap().unwrap().last_login_ms,
        None,
        "a refused login is not recorded"
    );

    s.set_disabled("d", false).await.unwrap();
    assert!(!s.get_user("d").await.unwrap().unwrap().disabled);
    assert!(s.verify_password("d", "pw").await.unwrap().is_some());
    assert_eq!(
        s.session_user(&token).await.unwrap().map(|u| u.name),
        Some("d".into())
    );
}

pub async fn sessions(b: &dyn Backend) {
    let (s, _) = b.create().await;
    s.create_user("a", "pw", Role::Participant).await.unwrap();
    s.create_user("b", "pw", Role::Admin).await.unwrap();

    let ta = s.create_session("a", 60_000).await.unwrap();
    let ta2 = s.create_session("a", 60_000).await.unwrap();
    let tb = s.create_session("b", 60_000).await.unwrap();
    assert_ne!(ta, ta2);
    // 32 bytes, base64url without padding.
    assert_eq!(ta.len(), 43);
    assert!(
        ta.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    );

    assert_eq!(
        s.session_user(&ta).await.unwrap().map(|u| u.name),
        Some("a".into())
    );
    let ub = s.session_user(&tb).await.unwrap().unwrap();
    assert_eq!((ub.name.as_str(), ub.role), ("b", Role::Admin));
    assert_eq!(s.session_user("not-a-token").await.unwrap(), None);
    assert_eq!(s.session_user("").await.unwrap(), None);

    assert!(matches!(
        s.create_session("nobody", 60_000).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.create_session("a", 0).await,
        Err(StoreError::Other(_))
    ));

    s.delete_session(&ta).await.unwrap();
    s.delete_session(&ta).await.unwrap();
    s.delete_session("unknown").await.unwrap();
    assert_eq!(s.session_user(&ta).await.unwrap(), None);
    assert!(
        s.session_user(&ta2).await.unwrap().is_some(),
        "logout ends one session only"
    );

    let short = s.create_session("a", 40).await.unwrap();
    assert!(s.session_user(&short).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(s.session_user(&short).await.unwrap(), None, "expired");
    assert!(s.session_user(&ta2).await.unwrap().is_some());

    s.remove_user("a").await.unwrap();
    assert_eq!(s.session_user(&ta2).await.unwrap(), None);
    s.create_user("a", "pw2", Role::Participant).await.unwrap();
    assert_eq!(
        s.session_user(&ta2).await.unwrap(),
        None,
        "a re-created user does not inherit sessions"
    );
    assert!(s.session_user(&tb).await.unwrap().is_some());
}

pub async fn meta(b: &dyn Backend) {
    let (s, _) = b.create().await;
    assert_eq!(s.get_meta("object_info").await.unwrap(), None);
    let before = crate::now_ms();
    s.put_meta("object_info", r#"{"A":1}"#, "http://gpu-1")
        .await
        .unwrap();
    let e = s.get_meta("object_info").await.unwrap().unwrap();
    assert_eq!(e.value, r#"{"A":1}"#);
    assert_eq!(e.source, "http://gpu-1");
    assert!(e.updated_at_ms >= before);

    let big = "x".repeat(800_000);
    s.put_meta("object_info", &big, "gpu-2").await.unwrap();
    let e2 = s.get_meta("object_info").await.unwrap().unwrap();
    assert_eq!(e2.value, big);
    assert_eq!(e2.source, "gpu-2");
    assert!(e2.updated_at_ms >= e.updated_at_ms);
    s.put_meta("other", "", "").await.unwrap();
    assert_eq!(s.get_meta("other").await.unwrap().unwrap().value, "");
    assert_eq!(s.get_meta("object_info").await.unwrap().unwrap().value, big);
}

pub async fn enqueue_roundtrip(b: &dyn Backend) {
    let (s, _) = b.create().await;
    let before = crate::now_ms();
    let mut nj = new_job("p1", "u1");
    nj.number = 7.5;
    nj.priority = Some(3);
    nj.prompt = json!({"3": {"class_type": "KSampler", "inputs": {"seed": 42, "cfg": 7.5, "text": "ü ✓ \"q\""}}});
    let r = s.enqueue(nj.clone(), NO_LIMITS).await.unwrap();
    assert_eq!(r.id, "p1");
    assert_eq!(r.user, "u1");
    assert_eq!(r.number, 7.5);
    assert_eq!(r.priority, Some(3));
    assert_eq!(r.prompt, nj.prompt);
    assert_eq!(r.extra_data, nj.extra_data);
    let texts = s.list_jobs_text(&JobQuery::default()).await.unwrap();
    let text: serde_json::Value = serde_json::from_str(texts[0].prompt.get()).unwrap();
    assert_eq!(text, nj.prompt);
    assert_eq!(r.outputs_to_execute, ["1"]);
    assert_eq!(r.client_id.as_deref(), Some("c"));
    assert_eq!(r.state, JobState::Queued);
    assert_eq!(r.attempts, 0);
    assert!(r.created_at_ms >= before);
    assert_eq!((r.started_at_ms, r.finished_at_ms), (None, None));
    assert_eq!((r.backend.clone(), r.error.clone()), (None, None));
    assert_eq!(r.outputs, json!({}));
    assert_eq!(r.messages, json!([]));
    assert_eq!(r.meta, json!({}));
    assert_eq!(r.workflow_id(), Some("wf-u1"));
    assert_eq!(s.get_job("p1").await.unwrap(), Some(r.clone()));
    assert_eq!(s.get_job("nope").await.unwrap(), None);

    let mut bare = new_job("p2", "u1");
    bare.client_id = None;
    bare.extra_data = json!({});
    bare.outputs_to_execute = vec![];
    let r2 = s.enqueue(bare, NO_LIMITS).await.unwrap();
    assert!(r2.seq > r.seq);
    assert_eq!(r2.client_id, None);
    assert_eq!(r2.workflow_id(), None);
    assert!(r2.outputs_to_execute.is_empty());

    let mut nan = new_job("p3", "u1");
    nan.number = f64::NAN;
    assert!(matches!(
        s.enqueue(nan, NO_LIMITS).await,
        Err(StoreError::Other(_))
    ));
    assert!(matches!(
        s.enqueue(new_job("", "u1"), NO_LIMITS).await,
        Err(StoreError::Other(_))
    ));
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), 2);
}

pub async fn durability_across_reopen(b: &dyn Backend) {
    let (s, key) = b.create().await;
    s.create_user("u", "pw", Role::Participant).await.unwrap();
    let token = s.create_session("u", 600_000).await.unwrap();
    s.put_meta("k", "v", "src").await.unwrap();
    let mut before = Vec::new();
    for i in 0..40 {
        before.push(
            s.enqueue(
                new_job(&format!("j{i:02}"), &format!("u{}", i % 3)),
                NO_LIMITS,
            )
            .await
            .unwrap(),
        );
    }
    let running = s
        .transition(
            "j05",
            &[JobState::Queued],
            JobState::Running,
            JobPatch {
                attempts_inc: true,
                backend: Some("sim".into()),
                started_at_ms: Some(1),
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
    let done = finish(&*s, "j06", JobState::Succeeded).await;
    drop(s);

    let s = b.reopen(&key).await;
    let all = s.list_jobs(&JobQuery::default()).await.unwrap();
    assert_eq!(all.1, 40);
    assert_eq!(all.0.len(), 40);
    for (got, want) in all.0.iter().zip(&before) {
        assert_eq!(got.id, want.id);
        assert_eq!(got.seq, want.seq);
    }
    assert_eq!(s.get_job("j05").await.unwrap(), Some(running));
    assert_eq!(s.get_job("j06").await.unwrap(), Some(done));
    assert_eq!(s.get_job("j00").await.unwrap().as_ref(), Some(&before[0]));
    let unfinished = s.unfinished_jobs().await.unwrap();
    assert_eq!(unfinished.len(), 39);
    assert!(unfinished.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(!unfinished.iter().any(|j| j.id == "j06"));

    assert!(s.verify_password("u", "pw").await.unwrap().is_some());
    assert!(s.session_user(&token).await.unwrap().is_some());
    assert_eq!(s.get_meta("k").await.unwrap().unwrap().value, "v");
    // Submission order keeps growing after a restart.
    let next = s.enqueue(new_job("after", "u0"), NO_LIMITS).await.unwrap();
    assert!(next.seq > before.last().unwrap().seq);
}

pub async fn duplicate_ids(b: &dyn Backend) {
    let (s, _) = b.create().await;
    let first = s.enqueue(new_job("same", "u1"), NO_LIMITS).await.unwrap();
    assert_eq!(
        (first.id.as_str(), first.prompt_id.as_str()),
        ("same", "same")
    );
    let mut again = new_job("same", "u1");
    again.number = 99.0;
    assert!(matches!(
        s.enqueue(again.clone(), NO_LIMITS).await,
        Err(StoreError::AlreadyExists)
    ));
    finish(&*s, "same", JobState::Succeeded).await;
    assert!(
        matches!(
            s.enqueue(again, NO_LIMITS).await,
            Err(StoreError::AlreadyExists)
        ),
        "a finished job's prompt_id stays taken for its owner"
    );
    let got = s.get_job("same").await.unwrap().unwrap();
    assert_eq!((got.user.as_str(), got.number), ("u1", first.number));
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), 1);
    // A duplicate is reported before any limit.
    let full = EnqueueLimits {
        max_queued_per_user: 1,
        max_queue_depth: 1,
    };
    s.enqueue(new_job("q", "u1"), NO_LIMITS).await.unwrap();
    assert!(matches!(
        s.enqueue(new_job("q", "u1"), full).await,
        Err(StoreError::AlreadyExists)
    ));
}

/// A prompt_id is unique per participant: another participant may choose the same one and
/// is neither refused nor told; each finds, cancels and deletes only their own job by it,
/// while the internal ids stay unique across everyone. Survives a reopen.
pub async fn prompt_ids_per_user(b: &dyn Backend) {
    let (s, key) = b.create().await;
    let mine = s.enqueue(new_job("p", "u1"), NO_LIMITS).await.unwrap();
    let theirs = s.enqueue(new_job("p", "u2"), NO_LIMITS).await.unwrap();
    assert_eq!((mine.id.as_str(), mine.prompt_id.as_str()), ("p", "p"));
    assert_eq!(theirs.prompt_id, "p");
    assert_ne!(theirs.id, "p", "the internal id stays unique");
    assert!(!theirs.id.is_empty());
    // A participant may also pick an id that is someone else's internal id.
    let third = s
        .enqueue(new_job(&theirs.id, "u3"), NO_LIMITS)
        .await
        .unwrap();
    assert_eq!(third.prompt_id, theirs.id);
    let all_ids: HashSet<String> = [&mine, &theirs, &third]
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(all_ids.len(), 3);
    assert_eq!(s.get_job(&theirs.id).await.unwrap().unwrap().user, "u2");

    // Each finds their own job by the id they chose, never the other's.
    let got = |u: &'static str| {
        let s = s.clone();
        async move { s.get_user_job(u, "p").await.unwrap() }
    };
    assert_eq!(got("u1").await.unwrap().id, mine.id);
    assert_eq!(got("u2").await.unwrap().id, theirs.id);
    assert_eq!(got("u3").await, None);
    assert_eq!(s.get_user_job("u1", &theirs.id).await.unwrap(), None);
    let listed = s
        .list_jobs(&JobQuery {
            user: Some("u2".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .0;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id.clone(), listed[0].prompt_id.as_str()),
        (theirs.id.clone(), "p")
    );
    // The same id twice for one participant is still a duplicate.
    assert!(matches!(
        s.enqueue(new_job("p", "u2"), NO_LIMITS).await,
        Err(StoreError::AlreadyExists)
    ));

    // u2 cancels "p": their own job goes (its internal id comes back), u1's stays queued.
    let cancelled = s.delete_queued("u2", &strings(&["p"])).await.unwrap();
    assert_eq!(cancelled, vec![theirs.id.clone()]);
    assert_eq!(
        s.get_job("p").await.unwrap().unwrap().state,
        JobState::Queued
    );
    assert_eq!(
        s.get_job(&theirs.id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    // u1 finishes "p"; u2 deleting "p" from history removes nothing of u1's.
    finish(&*s, "p", JobState::Succeeded).await;
    assert_eq!(s.delete_history("u3", &strings(&["p"])).await.unwrap(), 0);
    assert_eq!(s.delete_history("u2", &strings(&["p"])).await.unwrap(), 1);
    assert!(s.get_job("p").await.unwrap().is_some());

    // The prompt ids survive a restart.
    let s = b.reopen(&key).await;
    let back = s.get_user_job("u3", &theirs.id).await.unwrap().unwrap();
    assert_eq!(
        (back.id, back.prompt_id),
        (third.id.clone(), theirs.id.clone())
    );
    assert_eq!(s.delete_history("u1", &strings(&["p"])).await.unwrap(), 1);
    assert_eq!(s.get_user_job("u1", "p").await.unwrap(), None);
}

pub async fn enqueue_limits(b: &dyn Backend) {
    let (s, _) = b.create().await;
    let lim = EnqueueLimits {
        max_queued_per_user: 2,
        max_queue_depth: 5,
    };
    s.enqueue(new_job("a1", "a"), lim).await.unwrap();
    s.enqueue(new_job("a2", "a"), lim).await.unwrap();
    match s.enqueue(new_job("a3", "a"), lim).await {
        Err(StoreError::Limit(LimitKind::UserQueued { max: 2 })) => {}
        other => panic!("expected the per-user limit, got {other:?}"),
    }
    assert_eq!(s.get_job("a3").await.unwrap(), None, "nothing half-written");

    // Dispatched still counts as waiting; running does not.
    s.transition(
        "a1",
        &[JobState::Queued],
        JobState::Dispatched,
        JobPatch::default(),
    )
    .await
    .unwrap();
    assert!(matches!(
        s.enqueue(new_job("a3", "a"), lim).await,
        Err(StoreError::Limit(LimitKind::UserQueued { .. }))
    ));
    s.transition(
        "a1",
        &[JobState::Dispatched],
        JobState::Running,
        JobPatch::default(),
    )
    .await
    .unwrap();
    s.enqueue(new_job("a3", "a"), lim).await.unwrap();

    // Other users are not held back by a's cap, until the whole queue is full.
    s.enqueue(new_job("b1", "b"), lim).await.unwrap();
    s.enqueue(new_job("c1", "c"), lim).await.unwrap();
    s.enqueue(new_job("c2", "c"), lim).await.unwrap();
    // Waiting now: a2 a3 b1 c1 c2 = 5.
    match s.enqueue(new_job("d1", "d"), lim).await {
        Err(StoreError::Limit(LimitKind::QueueDepth { max: 5 })) => {}
        other => panic!("expected the depth limit, got {other:?}"),
    }
    // The per-user check comes first.
    assert!(matches!(
        s.enqueue(new_job("a4", "a"), lim).await,
        Err(StoreError::Limit(LimitKind::UserQueued { .. }))
    ));
    // Finishing or cancelling frees room.
    assert_eq!(
        s.delete_queued("c", &strings(&["c1"])).await.unwrap(),
        ["c1"]
    );
    s.enqueue(new_job("d1", "d"), lim).await.unwrap();
    assert!(matches!(
        s.enqueue(new_job("d2", "d"), lim).await,
        Err(StoreError::Limit(LimitKind::QueueDepth { .. }))
    ));
    // 0 means no limit.
    for i in 0..8 {
        s.enqueue(new_job(&format!("z{i}"), "z"), NO_LIMITS)
            .await
            .unwrap();
    }
    let only_user = EnqueueLimits {
        max_queued_per_user: 1,
        max_queue_depth: 0,
    };
    s.enqueue(new_job("y1", "y"), only_user).await.unwrap();
    assert_eq!(
        s.count_jobs(None, &JobState::WAITING).await.unwrap(),
        5 + 8 + 1
    );
}

pub async fn transitions_cas(b: &dyn Backend) {
    let (s, _) = b.create().await;
    let q = s.enqueue(new_job("t1", "u"), NO_LIMITS).await.unwrap();

    let d = s
        .transition(
            "t1",
            &[JobState::Queued],
            JobState::Dispatched,
            JobPatch {
                attempts_inc: true,
                backend: Some("gpu-a".into()),
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(d.state, JobState::Dispatched);
    assert_eq!(d.attempts, 1);
    assert_eq!(d.backend.as_deref(), Some("gpu-a"));
    assert_eq!((d.seq, d.created_at_ms), (q.seq, q.created_at_ms));

    match s
        .transition(
            "t1",
            &[JobState::Queued],
            JobState::Dispatched,
            JobPatch {
                attempts_inc: true,
                ..JobPatch::default()
            },
        )
        .await
    {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        s.get_job("t1").await.unwrap().unwrap(),
        d,
        "a lost CAS changes nothing"
    );
    assert!(matches!(
        s.transition(
            "nope",
            &[JobState::Queued],
            JobState::Running,
            JobPatch::default()
        )
        .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        s.transition("t1", &[], JobState::Running, JobPatch::default())
            .await,
        Err(StoreError::Conflict(_))
    ));

    let r = s
        .transition(
            "t1",
            &[JobState::Dispatched, JobState::Queued],
            JobState::Running,
            JobPatch {
                started_at_ms: Some(1_000),
                messages: Some(json!([["execution_start", {"prompt_id": "t1"}]])),
                meta: Some(json!({"trace": "abc"})),
                error: Some(json!({"type": "transient"})),
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.state, JobState::Running);
    assert_eq!(r.attempts, 1);
    assert_eq!(
        r.backend.as_deref(),
        Some("gpu-a"),
        "None leaves a field as is"
    );
    assert_eq!(r.started_at_ms, Some(1_000));
    assert_eq!(r.error, Some(json!({"type": "transient"})));
    assert_eq!(r.meta, json!({"trace": "abc"}));

    // Same-state update (progress), then back to queued for a retry, clearing the error.
    let r = s
        .transition(
            "t1",
            &[JobState::Running],
            JobState::Running,
            JobPatch {
                messages: Some(json!([["execution_start", {}], ["executing", {}]])),
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.messages.as_array().unwrap().len(), 2);
    assert_eq!(r.error, Some(json!({"type": "transient"})));
    let r = s
        .transition(
            "t1",
            &[JobState::Running],
            JobState::Queued,
            JobPatch {
                error: Some(serde_json::Value::Null),
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((r.state, r.error.clone()), (JobState::Queued, None));

    let f = s
        .transition(
            "t1",
            &[JobState::Queued],
            JobState::Succeeded,
            JobPatch {
                attempts_inc: true,
                backend: Some("gpu-b".into()),
                finished_at_ms: Some(3_500),
                outputs: Some(json!({"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}})),
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(f.state, JobState::Succeeded);
    assert_eq!(f.attempts, 2);
    assert_eq!(f.backend.as_deref(), Some("gpu-b"));
    assert_eq!(
        (f.started_at_ms, f.finished_at_ms),
        (Some(1_000), Some(3_500))
    );
    assert_eq!(f.outputs["9"]["images"][0]["filename"], "a.png");
    assert_eq!(f.meta, json!({"trace": "abc"}));
    assert_eq!(s.get_job("t1").await.unwrap().unwrap(), f);
    assert!(s.unfinished_jobs().await.unwrap().is_empty());
}

pub async fn listing(b: &dyn Backend) {
    let (s, _) = b.create().await;
    // u1: five jobs with known durations; u2: three jobs; one u2 job has another workflow.
    let durations = [(0, 30), (1, 10), (2, 50), (3, 20), (4, 40)];
    for (i, _) in durations {
        s.enqueue(new_job(&format!("a{i}"), "u1"), NO_LIMITS)
            .await
            .unwrap();
    }
    for i in 0..3 {
        let mut j = new_job(&format!("b{i}"), "u2");
        if i == 2 {
            j.extra_data = json!({"extra_pnginfo": {"workflow": {"id": "special"}}});
        }
        s.enqueue(j, NO_LIMITS).await.unwrap();
    }
    for (i, d) in durations {
        s.transition(
            &format!("a{i}"),
            &[JobState::Queued],
            if i == 4 {
                JobState::Failed
            } else {
                JobState::Succeeded
            },
            JobPatch {
                started_at_ms: Some(1_000),
                finished_at_ms: Some(1_000 + d),
                ..JobPatch::default()
            },
        )
        .await
        .unwrap();
    }
    s.transition(
        "b0",
        &[JobState::Queued],
        JobState::Running,
        JobPatch::default(),
    )
    .await
    .unwrap();

    let q = |f: &dyn Fn(&mut JobQuery)| {
        let mut q = JobQuery::default();
        f(&mut q);
        q
    };

    let (all, total) = s.list_jobs(&JobQuery::default()).await.unwrap();
    assert_eq!(total, 8);
    assert_eq!(ids(&all), ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]);

    let (u2, total) = s
        .list_jobs(&q(&|q| q.user = Some("u2".into())))
        .await
        .unwrap();
    assert_eq!((ids(&u2), total), (vec!["b0", "b1", "b2"], 3));
    let (none, total) = s
        .list_jobs(&q(&|q| q.user = Some("nobody".into())))
        .await
        .unwrap();
    assert_eq!((none.len(), total), (0, 0));

    let (fin, total) = s
        .list_jobs(&q(&|q| {
            q.states = vec![JobState::Succeeded, JobState::Failed];
        }))
        .await
        .unwrap();
    assert_eq!((fin.len(), total), (5, 5));
    let (waiting, _) = s
        .list_jobs(&q(&|q| {
            q.states = JobState::UNFINISHED.to_vec();
            q.user = Some("u2".into());
        }))
        .await
        .unwrap();
    assert_eq!(ids(&waiting), ["b0", "b1", "b2"]);
    let (running, _) = s
        .list_jobs(&q(&|q| q.states = vec![JobState::Running]))
        .await
        .unwrap();
    assert_eq!(ids(&running), ["b0"]);

    let (wf, total) = s
        .list_jobs(&q(&|q| q.workflow_id = Some("wf-u2".into())))
        .await
        .unwrap();
    assert_eq!((ids(&wf), total), (vec!["b0", "b1"], 2));
    let (wf, _) = s
        .list_jobs(&q(&|q| q.workflow_id = Some("special".into())))
        .await
        .unwrap();
    assert_eq!(ids(&wf), ["b2"]);

    let (d, _) = s
        .list_jobs(&q(&|q| {
            q.user = Some("u1".into());
            q.order = JobOrder::DurationAsc;
        }))
        .await
        .unwrap();
    assert_eq!(ids(&d), ["a1", "a3", "a0", "a4", "a2"]);
    let (d, _) = s
        .list_jobs(&q(&|q| {
            q.order = JobOrder::DurationDesc;
        }))
        .await
        .unwrap();
    // Jobs without a duration sort as 0, ties newest first.
    assert_eq!(ids(&d), ["a2", "a4", "a0", "a3", "a1", "b2", "b1", "b0"]);
    let (c, _) = s
        .list_jobs(&q(&|q| q.order = JobOrder::CreatedDesc))
        .await
        .unwrap();
    assert_eq!(ids(&c), ["b2", "b1", "b0", "a4", "a3", "a2", "a1", "a0"]);
    let (c, _) = s
        .list_jobs(&q(&|q| q.order = JobOrder::CreatedAsc))
        .await
        .unwrap();
    assert_eq!(ids(&c), ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]);

    // Paging: offset/limit in the store, total counts every match.
    let (p, total) = s
        .list_jobs(&q(&|q| {
            q.order = JobOrder::CreatedDesc;
            q.offset = 2;
            q.limit = Some(3);
        }))
        .await
        .unwrap();
    assert_eq!((ids(&p), total), (vec!["b0", "a4", "a3"], 8));
    let (p, total) = s
        .list_jobs(&q(&|q| {
            q.offset = 6;
        }))
        .await
        .unwrap();
    assert_eq!((ids(&p), total), (vec!["b1", "b2"], 8));
    let (p, total) = s
        .list_jobs(&q(&|q| {
            q.offset = 100;
            q.limit = Some(5);
        }))
        .await
        .unwrap();
    assert_eq!((p.len(), total), (0, 8));
    let (p, total) = s
        .list_jobs(&q(&|q| {
            q.limit = Some(0);
        }))
        .await
        .unwrap();
    assert_eq!((p.len(), total), (0, 8));
    let (p, _) = s
        .list_jobs(&q(&|q| {
            q.offset = u64::MAX;
            q.limit = Some(u64::MAX);
        }))
        .await
        .unwrap();
    assert!(p.is_empty());

    // The same pages with the prompt and workflow as text: the same jobs, and the text is
    // the JSON of the value.
    for query in [
        JobQuery::default(),
        q(&|q| {
            q.user = Some("u1".into());
            q.states = vec![JobState::Succeeded, JobState::Failed];
            q.offset = 1;
            q.limit = Some(3);
        }),
        q(&|q| q.workflow_id = Some("special".into())),
        q(&|q| q.offset = 100),
    ] {
        let (values, _) = s.list_jobs(&query).await.unwrap();
        let texts = s.list_jobs_text(&query).await.unwrap();
        assert_eq!(texts.len(), values.len());
        for (t, v) in texts.iter().zip(&values) {
            let mut bare = v.clone();
            bare.prompt = json!(null);
            bare.extra_data = json!(null);
            assert_eq!(t.job, bare);
            assert_eq!(t.prompt.get(), v.prompt.to_string());
            assert_eq!(t.extra_data.get(), v.extra_data.to_string());
        }
    }
}

pub async fn delete_and_clear_isolation(b: &dyn Backend) {
    let (s, _) = b.create().await;
    for u in ["u1", "u2"] {
        for i in 0..4 {
            s.enqueue(new_job(&format!("{u}-{i}"), u), NO_LIMITS)
                .await
                .unwrap();
        }
    }
    // u1-0 runs, u1-1 finished; u2-0 finished.
    s.transition(
        "u1-0",
        &[JobState::Queued],
        JobState::Running,
        JobPatch::default(),
    )
    .await
    .unwrap();
    finish(&*s, "u1-1", JobState::Succeeded).await;
    finish(&*s, "u2-0", JobState::Failed).await;

    // Only the caller's queued jobs go; order of the request, no duplicates.
    let gone = s
        .delete_queued(
            "u1",
            &strings(&["u1-3", "u2-1", "u1-0", "u1-1", "nope", "u1-3", "u1-2"]),
        )
        .await
        .unwrap();
    assert_eq!(gone, ["u1-3", "u1-2"]);
    let j = s.get_job("u1-3").await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    assert!(j.finished_at_ms.is_some());
    assert_eq!(
        s.get_job("u2-1").await.unwrap().unwrap().state,
        JobState::Queued
    );
    assert_eq!(
        s.get_job("u1-0").await.unwrap().unwrap().state,
        JobState::Running
    );
    assert!(s.delete_queued("u1", &[]).await.unwrap().is_empty());
    assert!(
        s.delete_queued("u1", &strings(&["u1-3"]))
            .await
            .unwrap()
            .is_empty(),
        "already cancelled"
    );

    assert!(s.clear_queued("u1").await.unwrap().is_empty());
    assert_eq!(
        s.clear_queued("u2").await.unwrap(),
        ["u2-1", "u2-2", "u2-3"]
    );
    assert_eq!(s.count_jobs(None, &[JobState::Queued]).await.unwrap(), 0);

    // History: only finished jobs of the caller, hard-deleted.
    assert_eq!(
        s.delete_history("u1", &strings(&["u2-0", "u1-0", "u1-1", "u1-1"]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.get_job("u1-1").await.unwrap(), None);
    assert!(s.get_job("u2-0").await.unwrap().is_some());
    assert!(s.get_job("u1-0").await.unwrap().is_some(), "running stays");
    assert_eq!(s.delete_history("u1", &[]).await.unwrap(), 0);

    // u1 still has u1-2, u1-3 (cancelled) and u1-0 (running).
    assert_eq!(s.clear_history("u1").await.unwrap(), 2);
    assert_eq!(
        ids(&s
            .list_jobs(&JobQuery {
                user: Some("u1".into()),
                ..JobQuery::default()
            })
            .await
            .unwrap()
            .0),
        ["u1-0"]
    );
    assert_eq!(s.count_jobs(Some("u2"), &[]).await.unwrap(), 4);
    assert_eq!(s.clear_history("u2").await.unwrap(), 4);
    assert_eq!(s.clear_history("u2").await.unwrap(), 0);
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), 1);
    // A hard-deleted id is free again.
    s.enqueue(new_job("u2-0", "u2"), NO_LIMITS).await.unwrap();
}

pub async fn count_jobs(b: &dyn Backend) {
    let (s, _) = b.create().await;
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), 0);
    for i in 0..6 {
        s.enqueue(
            new_job(&format!("c{i}"), if i < 4 { "a" } else { "b" }),
            NO_LIMITS,
        )
        .await
        .unwrap();
    }
    finish(&*s, "c0", JobState::Succeeded).await;
    finish(&*s, "c4", JobState::Interrupted).await;
    s.transition(
        "c1",
        &[JobState::Queued],
        JobState::Dispatched,
        JobPatch::default(),
    )
    .await
    .unwrap();
    assert_eq!(s.count_jobs(None, &[]).await.unwrap(), 6);
    assert_eq!(s.count_jobs(Some("a"), &[]).await.unwrap(), 4);
    assert_eq!(
        s.count_jobs(Some("a"), &JobState::WAITING).await.unwrap(),
        3
    );
    assert_eq!(s.count_jobs(None, &[JobState::Queued]).await.unwrap(), 3);
    assert_eq!(s.count_jobs(None, &JobState::FINISHED).await.unwrap(), 2);
    assert_eq!(
        s.count_jobs(Some("b"), &[JobState::Interrupted])
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.count_jobs(Some("zz"), &[]).await.unwrap(), 0);
    // Every state, in order, zeros included (the `comfyume_jobs` gauge reads these).
    let counts = s.job_state_counts().await.unwrap();
    assert_eq!(
        counts,
        vec![
            (JobState::Queued, 3),
            (JobState::Dispatched, 1),
            (JobState::Running, 0),
            (JobState::Succeeded, 1),
            (JobState::Failed, 0),
            (JobState::Cancelled, 0),
            (JobState::Interrupted, 1),
        ]
    );

    // Submitting also answers the owner's unfinished count (queued, dispatched, running),
    // the number their `status` message shows; finished jobs and others' do not count.
    s.transition(
        "c1",
        &[JobState::Dispatched],
        JobState::Running,
        JobPatch::default(),
    )
    .await
    .unwrap();
    let (rec, n) = s
        .enqueue_counted(new_job("c6", "a"), NO_LIMITS)
        .await
        .unwrap();
    assert_eq!((rec.id.as_str(), rec.state), ("c6", JobState::Queued));
    assert_eq!(n, Some(4), "c1 running, c2 and c3 queued, c6");
    assert_eq!(s.get_job("c6").await.unwrap().as_ref(), Some(&rec));
    let (_, n) = s
        .enqueue_counted(new_job("c7", "newcomer"), NO_LIMITS)
        .await
        .unwrap();
    assert_eq!(n, Some(1));
    assert!(matches!(
        s.enqueue_counted(new_job("c6", "a"), NO_LIMITS).await,
        Err(StoreError::AlreadyExists)
    ));
}

/// 8 tasks × 100 enqueues at once: no "database is locked", every seq distinct, and each
/// task sees its own jobs in increasing seq order.
pub async fn concurrent_enqueues(b: &dyn Backend) {
    let (s, _) = b.create().await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..100 {
                let r = s
                    .enqueue(
                        new_job(&format!("t{t}-{i}"), &format!("user{t}")),
                        NO_LIMITS,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("task {t} job {i}: {e}"));
                seqs.push(r.seq);
            }
            seqs
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "per-task order");
        all.extend(seqs);
    }
    assert_eq!(all.len(), 800, "seqs are distinct");
    let unfinished = s.unfinished_jobs().await.unwrap();
    assert_eq!(unfinished.len(), 800);
    assert!(unfinished.windows(2).all(|w| w[0].seq < w[1].seq));

    // Limits hold under contention: 8 tasks race for 10 places.
    let lim = EnqueueLimits {
        max_queued_per_user: 0,
        max_queue_depth: 810,
    };
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..5 {
                match s.enqueue(new_job(&format!("r{t}-{i}"), "racer"), lim).await {
                    Ok(_) => ok += 1,
                    Err(StoreError::Limit(LimitKind::QueueDepth { .. })) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 10);
    assert_eq!(s.count_jobs(None, &JobState::WAITING).await.unwrap(), 810);
}

/// Several dispatchers race to claim the same jobs: each job is claimed exactly once.
pub async fn concurrent_transitions(b: &dyn Backend) {
    let (s, _) = b.create().await;
    for i in 0..20 {
        s.enqueue(new_job(&format!("j{i}"), "u"), NO_LIMITS)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for t in 0..6 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for i in 0..20 {
                let id = format!("j{i}");
                match s
                    .transition(
                        &id,
                        &[JobState::Queued],
                        JobState::Dispatched,
                        JobPatch {
                            attempts_inc: true,
                            backend: Some(format!("b{t}")),
                            ..JobPatch::default()
                        },
                    )
                    .await
                {
                    Ok(r) => won.push((id, r.backend.unwrap())),
                    Err(StoreError::Conflict(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            won
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.unwrap());
    }
    assert_eq!(won.len(), 20, "every job claimed exactly once");
    let claimed: HashSet<_> = won.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(claimed.len(), 20);
    for (id, backend) in won {
        let j = s.get_job(&id).await.unwrap().unwrap();
        assert_eq!((j.attempts, j.backend), (1, Some(backend)));
    }
}

/// Password changes, disables, enables and removals are numbered in order, whichever
/// handle on the storage made them, so a running server notices what the CLI did; the
/// credential revision moves with each; and a store that sees another handle's change drops
/// the sessions it cached.
pub async fn account_changes(b: &dyn Backend) {
    let (s, key) = b.create().await;
    s.create_user("a", "pw", Role::Participant).await.unwrap();
    s.create_user("b", "pw", Role::Participant).await.unwrap();
    let start = s.last_account_change().await.unwrap();
    assert!(
        s.account_changes(start, 100).await.unwrap().is_empty(),
        "creating accounts is not a change to tell"
    );
    let (_, rev0) = s.user_revision("a").await.unwrap().unwrap();
    assert_eq!(s.user_revision("nobody").await.unwrap(), None);

    s.set_password("a", "pw2").await.unwrap();
    let (_, rev1) = s.user_revision("a").await.unwrap().unwrap();
    assert!(rev1 > rev0, "a new password moves the revision");
    let (_, b_rev) = s.user_revision("b").await.unwrap().unwrap();
    assert!(b_rev < rev1, "another account's revision stays");
    s.set_disabled("a", true).await.unwrap();
    s.set_disabled("a", true).await.unwrap(); // no change: nothing recorded
    let (ua, rev2) = s.user_revision("a").await.unwrap().unwrap();
    assert!(ua.disabled && rev2 > rev1);
    s.set_disabled("a", false).await.unwrap();
    s.remove_user("b").await.unwrap();
    assert!(matches!(
        s.set_disabled("nobody", true).await,
        Err(StoreError::NotFound)
    ));

    let all = s.account_changes(start, 100).await.unwrap();
    let seen: Vec<(&str, AccountChangeKind)> =
        all.iter().map(|c| (c.user.as_str(), c.kind)).collect();
    assert_eq!(
        seen,
        vec![
            ("a", AccountChangeKind::Password),
            ("a", AccountChangeKind::Disabled),
            ("a", AccountChangeKind::Enabled),
            ("b", AccountChangeKind::Removed),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(all.iter().all(|c| c.at_ms > 0));
    assert_eq!(s.last_account_change().await.unwrap(), all[3].seq);
    assert_eq!(
        s.account_changes(all[1].seq, 100).await.unwrap(),
        all[2..].to_vec(),
        "only those after the given number"
    );
    assert_eq!(
        s.account_changes(start, 1).await.unwrap(),
        all[..1].to_vec()
    );

    // Another handle on the same storage (the CLI while the server runs).
    let token = s.create_session("a", 60_000).await.unwrap();
    assert!(s.session_user(&token).await.unwrap().is_some());
    let other = b.open_another(&key).await;
    let cursor = s.last_account_change().await.unwrap();
    other.set_disabled("a", true).await.unwrap();
    let (_, rev3) = s.user_revision("a").await.unwrap().unwrap();
    assert!(rev3 > rev2, "the revision is read from storage, not cached");
    let seen = s.account_changes(cursor, 100).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].user.as_str(), seen[0].kind),
        ("a", AccountChangeKind::Disabled)
    );
    assert_eq!(
        s.session_user(&token).await.unwrap(),
        None,
        "after seeing the change, the cached session is gone at once"
    );
}
