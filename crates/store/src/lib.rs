//! Durable store for ComfyUMe: users and sessions, small metadata snapshots, and the job queue.
//!
//! The application holds an `Arc<dyn Store>`; each backend lives in its own module with its own
//! migrations (atuin-server style), and every backend must pass [`conformance`].

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod conformance;
mod password;
pub mod session_cache;
pub mod sqlite;
pub mod telemetry;

/// Every failure a store reports. Callers map these to HTTP once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    /// The record is not in a state that allows the operation (e.g. a CAS transition lost).
    #[error("{0}")]
    Conflict(String),
    #[error("queue limit: {0}")]
    Limit(LimitKind),
    /// Disk full, database locked, I/O error, timeout: retrying later may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Invalid input or anything unexpected. Never carries passwords or hashes.
    #[error("{0}")]
    Other(String),
}

/// Which enqueue limit was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LimitKind {
    /// The user already has `max` jobs waiting (queued or dispatched).
    UserQueued { max: u32 },
    /// The whole queue already holds `max` waiting jobs (queued or dispatched).
    QueueDepth { max: u32 },
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitKind::UserQueued { max } => write!(f, "at most {max} waiting jobs per user"),
            LimitKind::QueueDepth { max } => write!(f, "the queue is full ({max} waiting jobs)"),
        }
    }
}

/// A string that names no variant of an enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind}: {value:?}")]
pub struct ParseEnumError {
    pub kind: &'static str,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Participant,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Participant => "participant",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ParseEnumError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "participant" => Ok(Role::Participant),
            "admin" => Ok(Role::Admin),
            _ => Err(ParseEnumError {
                kind: "role",
                value: s.to_owned(),
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub disabled: bool,
    pub created_at_ms: i64,
    pub last_login_ms: Option<i64>,
}

/// How a user's password is stored (for the dashboard: who still has an imported bcrypt hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PasswordScheme {
    Argon2id,
    /// Imported from an nginx htpasswd file; replaced by argon2id at the next successful login.
    Bcrypt,
}

/// What changed about an account (see [`UserStore::account_changes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountChangeKind {
    /// A new password (every session of the account ended with it).
    Password,
    Disabled,
    Enabled,
    Removed,
}

impl AccountChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountChangeKind::Password => "password",
            AccountChangeKind::Disabled => "disabled",
            AccountChangeKind::Enabled => "enabled",
            AccountChangeKind::Removed => "removed",
        }
    }
}

impl FromStr for AccountChangeKind {
    type Err = ParseEnumError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            AccountChangeKind::Password,
            AccountChangeKind::Disabled,
            AccountChangeKind::Enabled,
            AccountChangeKind::Removed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
        .ok_or_else(|| ParseEnumError {
            kind: "account change",
            value: s.to_owned(),
        })
    }
}

/// One change to who may sign in, numbered in the order of the changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountChange {
    /// Strictly increasing, never reused.
    pub seq: i64,
    pub user: String,
    pub kind: AccountChangeKind,
    pub at_ms: i64,
}

/// A metadata snapshot (e.g. the backend's `object_info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaEntry {
    pub value: String,
    pub updated_at_ms: i64,
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Dispatched,
    Running,
    Succeeded,
    Failed,
    /// Removed from the queue before it started (ComfyUI's "delete pending").
    Cancelled,
    /// Stopped while running (ComfyUI's interrupt).
    Interrupted,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Interrupted,
    ];
    /// Accepted and not yet started; these count against [`EnqueueLimits`].
    pub const WAITING: [JobState; 2] = [JobState::Queued, JobState::Dispatched];
    pub const UNFINISHED: [JobState; 3] =
        [JobState::Queued, JobState::Dispatched, JobState::Running];
    pub const FINISHED: [JobState; 4] = [
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Interrupted => "interrupted",
        }
    }

    pub fn is_finished(self) -> bool {
        Self::FINISHED.contains(&self)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = ParseEnumError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseEnumError {
                kind: "job state",
                value: s.to_owned(),
            })
    }
}

/// A job as accepted by `POST /prompt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// The prompt_id the participant knows the job by: unique among that participant's jobs
    /// only. It becomes the job's internal [`JobRecord::id`] too unless another job (anyone's)
    /// already has that id; then the store gives it a fresh one (see [`JobRecord::prompt_id`]).
    pub id: String,
    pub user: String,
    pub number: f64,
    pub priority: Option<u8>,
    pub prompt: serde_json::Value,
    /// Already stripped of secrets.
    pub extra_data: serde_json::Value,
    pub outputs_to_execute: Vec<String>,
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Global submission order: strictly increasing, never reused.
    pub seq: i64,
    /// The internal id, unique across all users: what the GPU servers, the dispatcher and the
    /// instructor see.
    pub id: String,
    /// The id its owner knows it by (their `prompt_id`), unique among their own jobs. Equal
    /// to `id` unless that was taken by another job when it was submitted; every answer to
    /// the participant (HTTP and WebSocket) names the job by this one.
    #[serde(default)]
    pub prompt_id: String,
    pub user: String,
    pub number: f64,
    pub priority: Option<u8>,
    pub prompt: serde_json::Value,
    pub extra_data: serde_json::Value,
    pub outputs_to_execute: Vec<String>,
    pub client_id: Option<String>,
    pub state: JobState,
    pub attempts: u32,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub backend: Option<String>,
    pub error: Option<serde_json::Value>,
    /// `{node_id: ui}`
    pub outputs: serde_json::Value,
    /// ComfyUI status messages list.
    pub messages: serde_json::Value,
    pub meta: serde_json::Value,
}

/// A job from [`JobStore::list_jobs_text`]: its prompt and workflow as JSON text (checked to
/// be JSON); `job.prompt` and `job.extra_data` are `Null`, not loaded.
#[derive(Debug)]
pub struct JobWithText {
    pub job: JobRecord,
    pub prompt: Box<serde_json::value::RawValue>,
    pub extra_data: Box<serde_json::value::RawValue>,
}

impl JobRecord {
    /// The workflow id ComfyUI's `/api/jobs?workflow_id=` filters on
    /// (`extra_data.extra_pnginfo.workflow.id`).
    pub fn workflow_id(&self) -> Option<&str> {
        workflow_id_of(&self.extra_data)
    }
}

pub(crate) fn workflow_id_of(extra_data: &serde_json::Value) -> Option<&str> {
    extra_data
        .get("extra_pnginfo")?
        .get("workflow")?
        .get("id")?
        .as_str()
}

/// Caps checked atomically at enqueue. Both count waiting jobs, i.e. states
/// [`JobState::WAITING`] (queued + dispatched; running jobs are not counted). `0` means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EnqueueLimits {
    pub max_queued_per_user: u32,
    pub max_queue_depth: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobOrder {
    CreatedAsc,
    CreatedDesc,
    /// `finished_at_ms - started_at_ms`, 0 when either is missing (as ComfyUI sorts).
    DurationAsc,
    DurationDesc,
    #[default]
    SeqAsc,
}

/// Filters for [`JobStore::list_jobs`]. Empty `states` means every state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JobQuery {
    pub user: Option<String>,
    pub states: Vec<JobState>,
    pub workflow_id: Option<String>,
    pub order: JobOrder,
    pub offset: u64,
    pub limit: Option<u64>,
}

/// Field updates applied with a transition. `None` leaves a field unchanged;
/// `error: Some(Value::Null)` clears the error.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JobPatch {
    pub attempts_inc: bool,
    pub backend: Option<String>,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub error: Option<serde_json::Value>,
    pub outputs: Option<serde_json::Value>,
    pub messages: Option<serde_json::Value>,
    pub meta: Option<serde_json::Value>,
    /// `Some(level)` sets the job's own priority level (`Some(None)` clears it).
    #[serde(default)]
    pub priority: Option<Option<u8>>,
}

#[async_trait]
pub trait UserStore: Send + Sync {
    /// Names match `^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$` (else `Other`); passwords are non-empty.
    async fn create_user(&self, name: &str, password: &str, role: Role)
    -> Result<User, StoreError>;
    /// An nginx htpasswd bcrypt entry (`$2y$`, `$2b$`, `$2a$`); rehashed to argon2id at the next
    /// successful [`UserStore::verify_password`].
    async fn import_bcrypt(
        &self,
        name: &str,
        bcrypt_hash: &str,
        role: Role,
    ) -> Result<User, StoreError>;
    async fn get_user(&self, name: &str) -> Result<Option<User>, StoreError>;
    /// Sorted by name.
    async fn list_users(&self) -> Result<Vec<User>, StoreError>;
    /// Also ends every session of that user. Recorded as an [`AccountChange`].
    async fn set_password(&self, name: &str, password: &str) -> Result<(), StoreError>;
    /// A disabled user cannot log in and their sessions stop resolving (until re-enabled).
    /// A real change (not disabling a disabled user) is recorded as an [`AccountChange`].
    async fn set_disabled(&self, name: &str, disabled: bool) -> Result<(), StoreError>;
    /// Also drops their sessions. Their jobs stay. Recorded as an [`AccountChange`].
    async fn remove_user(&self, name: &str) -> Result<(), StoreError>;
    /// `None` for unknown, wrong password or disabled. Updates `last_login_ms` on success.
    async fn verify_password(&self, name: &str, password: &str)
    -> Result<Option<User>, StoreError>;
    async fn password_scheme(&self, name: &str) -> Result<Option<PasswordScheme>, StoreError>;
    /// A 256-bit random token, base64url without padding; only its SHA-256 is stored.
    /// `NotFound` for an unknown user, `Conflict` for a disabled one.
    async fn create_session(&self, user: &str, ttl_ms: i64) -> Result<String, StoreError>;
    /// `None` if expired, unknown, or the user is disabled or removed. Changes made through
    /// this store apply at once; an implementation may take up to
    /// [`session_cache::RECHECK`] to see changes made by another process.
    async fn session_user(&self, token: &str) -> Result<Option<User>, StoreError>;
    /// Idempotent.
    async fn delete_session(&self, token: &str) -> Result<(), StoreError>;
    /// The account and its credential revision: the number of its latest
    /// [`AccountChange`] (0 when none). A cache of verified passwords stays valid exactly as
    /// long as this number is unchanged, whichever process changed the account.
    async fn user_revision(&self, name: &str) -> Result<Option<(User, i64)>, StoreError>;
    /// Password changes, disables, enables and removals numbered after `after`, oldest first,
    /// at most `limit`; made by any process sharing this storage. A caller that polls this
    /// sees another process's changes: seeing any also drops sessions this store cached, so
    /// [`UserStore::session_user`] reflects them at once. Entries older than 30 days may be gone.
    async fn account_changes(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AccountChange>, StoreError>;
    /// The number of the newest account change (0 when none), where a poller starts.
    async fn last_account_change(&self) -> Result<i64, StoreError>;
}

#[async_trait]
pub trait MetaStore: Send + Sync {
    async fn get_meta(&self, key: &str) -> Result<Option<MetaEntry>, StoreError>;
    async fn put_meta(&self, key: &str, value: &str, source: &str) -> Result<(), StoreError>;
}

#[async_trait]
pub trait JobStore: Send + Sync {
    /// Durable when it returns. `AlreadyExists` when the same user already has a job with
    /// this prompt_id (`job.id`; checked first), then `Limit` per user, then `Limit` for the
    /// whole queue (see [`EnqueueLimits`]). Another user's job with that id is no refusal:
    /// the new job gets a fresh internal id instead (see [`NewJob::id`]).
    async fn enqueue(&self, job: NewJob, limits: EnqueueLimits) -> Result<JobRecord, StoreError>;
    /// [`JobStore::enqueue`], also answering how many unfinished jobs (queued, dispatched,
    /// running) the job's owner has with it, for their `status` message; `None` when that
    /// count could not be taken (the job is stored all the same).
    async fn enqueue_counted(
        &self,
        job: NewJob,
        limits: EnqueueLimits,
    ) -> Result<(JobRecord, Option<u64>), StoreError> {
        let rec = self.enqueue(job, limits).await?;
        let n = self
            .count_jobs(Some(&rec.user), &JobState::UNFINISHED)
            .await
            .ok();
        Ok((rec, n))
    }
    /// By internal id.
    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// `user`'s job that they know as `prompt_id` (see [`JobRecord::prompt_id`]); another
    /// user's job is never found this way, whatever its ids.
    /// (A scan of the user's jobs here, so that wrappers and new backends are correct from
    /// the start; backends override it with an indexed look-up.)
    async fn get_user_job(
        &self,
        user: &str,
        prompt_id: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        let (jobs, _) = self
            .list_jobs(&JobQuery {
                user: Some(user.to_owned()),
                ..Default::default()
            })
            .await?;
        Ok(jobs
            .into_iter()
            .find(|j| j.prompt_id == prompt_id || (j.prompt_id.is_empty() && j.id == prompt_id)))
    }
    /// One page and the total number of matching jobs.
    async fn list_jobs(&self, q: &JobQuery) -> Result<(Vec<JobRecord>, u64), StoreError>;
    /// [`list_jobs`](JobStore::list_jobs)'s page, without the total, for a page that is
    /// only written out again (`GET /history`, `GET /queue`): each job's prompt and workflow,
    /// the bulk of a history, stay the JSON text the store holds instead of being parsed.
    async fn list_jobs_text(&self, q: &JobQuery) -> Result<Vec<JobWithText>, StoreError>;
    /// Queued, dispatched and running jobs in seq order.
    async fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// Compare-and-set: `Conflict` if the current state is not in `from`, `NotFound` if no job.
    async fn transition(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        patch: JobPatch,
    ) -> Result<JobRecord, StoreError>;
    /// Marks that user's *queued* jobs whose prompt_ids are among `prompt_ids` cancelled
    /// (finished now); returns the *internal* ids of those actually cancelled, in the order
    /// given. Other users' jobs and other states are untouched.
    async fn delete_queued(
        &self,
        user: &str,
        prompt_ids: &[String],
    ) -> Result<Vec<String>, StoreError>;
    /// Cancels all of that user's queued jobs; returns their internal ids in seq order.
    async fn clear_queued(&self, user: &str) -> Result<Vec<String>, StoreError>;
    /// Hard-deletes that user's *finished* jobs whose prompt_ids are among `prompt_ids`;
    /// returns how many.
    async fn delete_history(&self, user: &str, prompt_ids: &[String]) -> Result<u64, StoreError>;
    async fn clear_history(&self, user: &str) -> Result<u64, StoreError>;
    /// Empty `states` means every state.
    async fn count_jobs(&self, user: Option<&str>, states: &[JobState]) -> Result<u64, StoreError>;
    /// How many jobs are in each state, every state listed (zeros included) in
    /// [`JobState::ALL`]'s order: the `comfyume_jobs` gauge. An implementation that keeps
    /// per-state counters answers with one read.
    async fn job_state_counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let mut out = Vec::with_capacity(JobState::ALL.len());
        for state in JobState::ALL {
            out.push((state, self.count_jobs(None, &[state]).await?));
        }
        Ok(out)
    }
    /// Light rows for dashboards. The default reads whole records; backends override it.
    async fn job_summaries(&self, q: &SummaryQuery) -> Result<Vec<JobSummary>, StoreError> {
        let (jobs, _) = self
            .list_jobs(&JobQuery {
                states: q.states.clone(),
                ..Default::default()
            })
            .await?;
        let mut out: Vec<JobSummary> = jobs
            .iter()
            .filter(|r| summary_matches(r, q))
            .map(JobSummary::from)
            .collect();
        if q.order == SummaryOrder::FinishedDesc {
            out.sort_by(|a, b| {
                b.finished_at_ms
                    .cmp(&a.finished_at_ms)
                    .then(b.seq.cmp(&a.seq))
            });
        }
        if let Some(n) = q.limit {
            out.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        }
        Ok(out)
    }
    /// Every participant with jobs: counts by state, GPU time, last activity; sorted by name.
    /// The default reads whole records; backends override it.
    async fn user_job_stats(&self) -> Result<Vec<UserJobStats>, StoreError> {
        let (jobs, _) = self.list_jobs(&JobQuery::default()).await?;
        let mut by: std::collections::BTreeMap<String, UserJobStats> = Default::default();
        for r in &jobs {
            let e = by.entry(r.user.clone()).or_insert_with(|| UserJobStats {
                user: r.user.clone(),
                ..Default::default()
            });
            *e.counts.entry(r.state).or_default() += 1;
            if let (Some(s), Some(f)) = (r.started_at_ms, r.finished_at_ms) {
                e.gpu_ms += u64::try_from(f - s).unwrap_or(0);
            }
            let last = r
                .created_at_ms
                .max(r.started_at_ms.unwrap_or(0))
                .max(r.finished_at_ms.unwrap_or(0));
            e.last_activity_ms = e.last_activity_ms.max(last);
        }
        Ok(by.into_values().collect())
    }
}

/// A job without its heavy parts (prompt, extra data, messages): what dashboards list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub seq: i64,
    pub id: String,
    pub user: String,
    pub state: JobState,
    pub priority: Option<u8>,
    pub attempts: u32,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub backend: Option<String>,
    pub error: Option<serde_json::Value>,
    /// `{node_id: ui}`, as in [`JobRecord::outputs`].
    pub outputs: serde_json::Value,
}

impl From<&JobRecord> for JobSummary {
    fn from(r: &JobRecord) -> Self {
        JobSummary {
            seq: r.seq,
            id: r.id.clone(),
            user: r.user.clone(),
            state: r.state,
            priority: r.priority,
            attempts: r.attempts,
            created_at_ms: r.created_at_ms,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            backend: r.backend.clone(),
            error: r.error.clone(),
            outputs: r.outputs.clone(),
        }
    }
}

/// Order of [`SummaryQuery`] results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryOrder {
    #[default]
    SeqAsc,
    /// Newest `finished_at_ms` first (unfinished last), then newest `seq`.
    FinishedDesc,
}

/// Filters for [`JobStore::job_summaries`]. Empty `states` means every state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SummaryQuery {
    pub states: Vec<JobState>,
    /// Only jobs created at or after this (ms).
    pub created_since_ms: Option<i64>,
    pub order: SummaryOrder,
    pub limit: Option<u64>,
}

/// One participant's jobs, counted by state, and their GPU time.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserJobStats {
    pub user: String,
    /// Jobs in each state (states without jobs are absent).
    pub counts: std::collections::BTreeMap<JobState, u64>,
    /// Sum of `finished_at_ms - started_at_ms` over their finished jobs that started.
    pub gpu_ms: u64,
    /// The latest submission, start or end of one of their jobs (ms).
    pub last_activity_ms: i64,
}

fn summary_matches(r: &JobRecord, q: &SummaryQuery) -> bool {
    (q.states.is_empty() || q.states.contains(&r.state))
        && q.created_since_ms.is_none_or(|t| r.created_at_ms >= t)
}

/// An instructor's action as recorded in the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAudit {
    /// Who did it (an account name).
    pub actor: String,
    /// What, as a short dotted name (`job.cancel`, `queue.pause`, ...).
    pub action: String,
    /// On what (a job id, a participant, ...), if anything in particular.
    pub target: Option<String>,
    /// Parameters and outcome; never a secret.
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Strictly increasing, never reused.
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub detail: serde_json::Value,
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Durable when it returns.
    async fn append_audit(&self, entry: NewAudit) -> Result<AuditEntry, StoreError>;
    /// Newest first: entries numbered below `before` (every entry when `None`), at most `limit`.
    async fn list_audit(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError>;
}

/// Everything the application needs; hold it as `Arc<dyn Store>`.
pub trait Store: UserStore + MetaStore + JobStore + AuditStore {}
impl<T: UserStore + MetaStore + JobStore + AuditStore + ?Sized> Store for T {}

pub(crate) fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$`
pub fn valid_user_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "user001", "_x", "A.b-c_d", &"x".repeat(64)] {
            assert!(valid_user_name(ok), "{ok}");
        }
        for bad in ["", ".x", "-x", "a b", "a/b", "é", &"x".repeat(65), "../x"] {
            assert!(!valid_user_name(bad), "{bad}");
        }
    }

    #[test]
    fn enums_roundtrip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert_eq!(
            serde_json::to_value(Role::Participant).unwrap(),
            "participant"
        );
        assert!("Admin".parse::<Role>().is_err());
        assert!("done".parse::<JobState>().is_err());
    }
}
