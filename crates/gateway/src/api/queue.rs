//! The Run button: `POST /prompt`, and the participant's own views of the
//! workshop queue (`/queue`, `/history`, `/api/jobs`, `/prompt`, `/interrupt`)
//! in ComfyUI's shapes. Every view is filtered to the caller's own jobs.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use comfyume_store::{
    JobOrder, JobQuery, JobRecord, JobState, JobWithText, LimitKind, NewJob, StoreError,
};
use comfyume_wire::shapes::jobs::{JobSort, JobSource, JobStatus, JobsQuery, QueuedJob};
use comfyume_wire::shapes::queue::{ExecStatus, HistoryRecord, StatusStr};
use comfyume_wire::shapes::{self};
use comfyume_wire::{
    PromptError, check_prompt_request, strip_server_paths_in, uses_server_counter,
    validate_prompt_with_files,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value, json};

use crate::auth::Participant;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// A refused submission, counted by its error type.
fn prompt_error(e: PromptError) -> Response {
    crate::telemetry::job_refused(e.error_type());
    (StatusCode::BAD_REQUEST, Json(e.body())).into_response()
}

/// ComfyUI prints integral numbers without a fraction (`5`, not `5.0`).
pub fn number(n: f64) -> Number {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Number::from(n as i64)
    } else {
        Number::from_f64(n).unwrap_or_else(|| Number::from(0))
    }
}

fn now_ms() -> u64 {
    comfyume_dispatch::queue::now_ms() as u64
}

pub async fn post_prompt(
    State(state): State<AppState>,
    who: Participant,
    req: Request,
) -> Response {
    let limits = crate::limits::of(&req);
    let body = match crate::limits::read_body(req).await {
        Ok(b) => b,
        Err(e) => {
            crate::telemetry::job_refused("request_too_large");
            let body = PromptError::rejected("request_too_large", &e.message(), "").body();
            return (e.status(), Json(body)).into_response();
        }
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        // ComfyUI answers 500 here; a clear 400 in its error shape is kinder.
        Err(e) => {
            return prompt_error(PromptError::rejected(
                "invalid_json",
                "The request body is not valid JSON",
                &e.to_string(),
            ));
        }
    };
    // ComfyUI takes a counter value before validating, rejected prompts included.
    let counter = uses_server_counter(&body).then(|| state.queue.next_number());
    // The caps first: a 10,000-node prompt is refused before it costs a validation.
    if let Err(e) = check_prompt_request(&body, &limits.prompt) {
        return prompt_error(e);
    }
    let defs = state.object_info();
    // The participant's input folder is read only when a node can name one of its files.
    let names_files = body
        .get("prompt")
        .and_then(Value::as_object)
        .is_some_and(|nodes| {
            nodes.values().any(|n| {
                n.get("class_type")
                    .and_then(Value::as_str)
                    .is_some_and(|c| defs.file_classes.contains(c))
            })
        });
    let files = if names_files {
        crate::api::files::user_files(&state, &who.name).await
    } else {
        comfyume_wire::object_info::UserFiles::default()
    };
    let mut valid = match validate_prompt_with_files(&body, &defs.info, &files) {
        Ok(v) => v,
        Err(e) => return prompt_error(e),
    };
    drop(defs);
    // A participant at their storage quota gets no new job (it would never reach a GPU).
    if let Some(quota) = state.settings.user_quota_bytes {
        let used = crate::quota::usage(&state, &who.name).await.total();
        if let Err(e) = crate::quota::check(Some(quota), used, 0) {
            return prompt_error(PromptError::rejected("quota_exceeded", &e.message(), ""));
        }
    }
    valid.stamp_create_time(now_ms());
    let num = valid.priority(counter.unwrap_or(0));
    // A client-chosen id is a UUID (checked above), as ComfyUI's clients send.
    let prompt_id = valid
        .prompt_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let job = NewJob {
        id: prompt_id.clone(),
        user: who.name.clone(),
        number: num.as_f64().unwrap_or(0.0),
        priority: None,
        // Moved: only the node errors are answered from here on.
        prompt: std::mem::take(&mut valid.prompt),
        extra_data: Value::Object(std::mem::take(&mut valid.extra_data)),
        outputs_to_execute: std::mem::take(&mut valid.outputs_to_execute),
        client_id: valid.client_id.take(),
    };
    match state.queue.submit(job).await {
        Ok(_) => Json(valid.response(&prompt_id, &num)).into_response(),
        Err(comfyume_dispatch::QueueError::Store(e)) => submit_error(e, &prompt_id),
        Err(e) => prompt_error(PromptError::rejected("invalid_prompt", &e.to_string(), "")),
    }
}

fn submit_error(e: StoreError, prompt_id: &str) -> Response {
    match e {
        StoreError::AlreadyExists => prompt_error(PromptError::rejected(
            "duplicate_prompt_id",
            "A job with this prompt_id already exists",
            prompt_id,
        )),
        StoreError::Limit(LimitKind::UserQueued { max }) => prompt_error(PromptError::rejected(
            "queue_limit_reached",
            &format!(
                "You already have {max} jobs waiting. Wait for one to finish before queueing more."
            ),
            "",
        )),
        StoreError::Limit(LimitKind::QueueDepth { max }) => prompt_error(PromptError::rejected(
            "queue_full",
            &format!("The workshop queue is full ({max} jobs waiting). Try again in a moment."),
            "",
        )),
        StoreError::Unavailable(reason) => {
            tracing::error!(%reason, "could not store a job");
            crate::telemetry::job_refused("server_unavailable");
            let mut body = PromptError::rejected(
                "server_unavailable",
                "The server could not save your job. Nothing was queued; please try again.",
                "",
            )
            .body();
            body["error"]["extra_info"] = json!({});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
        other => {
            tracing::error!(error = %other, "could not store a job");
            crate::telemetry::job_refused("server_error");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(
                    PromptError::rejected(
                        "server_error",
                        "The server could not save your job.",
                        "",
                    )
                    .body(),
                ),
            )
                .into_response()
        }
    }
}

pub async fn get_prompt(State(state): State<AppState>, who: Participant) -> Json<Value> {
    Json(shapes::queue::prompt_info(
        state.queue_remaining(&who.name).await,
    ))
}

/// The id the participant knows a job by (see [`JobRecord::prompt_id`]).
pub fn public_id(r: &JobRecord) -> &str {
    if r.prompt_id.is_empty() {
        &r.id
    } else {
        &r.prompt_id
    }
}

pub async fn get_queue(State(state): State<AppState>, who: Participant) -> ApiResult<Response> {
    // One read of the caller's unfinished jobs (running and pending are one snapshot), their
    // prompts and workflows written out as the store's text.
    let jobs = state
        .store
        .list_jobs_text(&JobQuery {
            user: Some(who.name.clone()),
            states: JobState::UNFINISHED.to_vec(),
            order: JobOrder::SeqAsc,
            ..Default::default()
        })
        .await?;
    let mut body = shapes::queue::QueueBody {
        running: Vec::new(),
        pending: Vec::new(),
    };
    for j in jobs {
        let list = if j.job.state == JobState::Queued {
            &mut body.pending
        } else {
            &mut body.running
        };
        list.push(shapes::queue::QueueEntry {
            number: number(j.job.number),
            prompt_id: public_id(&j.job).to_owned(),
            prompt: j.prompt,
            extra_data: j.extra_data,
            outputs_to_execute: j.job.outputs_to_execute,
        });
    }
    Ok(Json(body).into_response())
}

#[derive(Deserialize, Default)]
struct ClearDelete {
    #[serde(default)]
    clear: Option<bool>,
    #[serde(default)]
    delete: Option<Vec<Value>>,
}

fn parse_clear_delete(body: &[u8]) -> ApiResult<ClearDelete> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
}

fn ids(list: Option<Vec<Value>>) -> Vec<String> {
    list.unwrap_or_default()
        .into_iter()
        .map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        })
        .collect()
}

/// `POST /queue`: `clear` and `delete` touch only the caller's pending jobs.
pub async fn post_queue(
    State(state): State<AppState>,
    who: Participant,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let req = parse_clear_delete(&body)?;
    if req.clear == Some(true) {
        state
            .queue
            .clear_queued(&who.name)
            .await
            .map_err(queue_error)?;
    }
    let to_delete = ids(req.delete);
    if !to_delete.is_empty() {
        state
            .queue
            .cancel_queued(&who.name, &to_delete)
            .await
            .map_err(queue_error)?;
    }
    Ok(StatusCode::OK)
}

fn queue_error(e: comfyume_dispatch::QueueError) -> ApiError {
    match e {
        comfyume_dispatch::QueueError::Store(s) => ApiError::Store(s),
        other => ApiError::bad_request(other.to_string()),
    }
}

/// A finished job as ComfyUI's history keeps it.
pub fn history_record(r: &JobRecord) -> HistoryRecord {
    into_history_record(r.clone())
}

/// [`history_record`] of a record that is not needed after: its prompt and workflow (the
/// bulk of it) are moved, not copied.
pub fn into_history_record(mut r: JobRecord) -> HistoryRecord {
    let (prompt, extra_data) = (r.prompt.take(), r.extra_data.take());
    history_record_with(r, prompt, extra_data)
}

/// A history record of a job read with its prompt and workflow as the stored JSON text, for
/// a page that writes them out unparsed.
pub fn history_record_of_text(j: JobWithText) -> HistoryRecord<Box<RawValue>> {
    history_record_with(j.job, j.prompt, j.extra_data)
}

/// `r`'s history record with the given prompt and workflow (`r`'s own are not read).
fn history_record_with<J>(mut r: JobRecord, prompt: J, extra_data: J) -> HistoryRecord<J> {
    let messages = r
        .messages
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|m| {
                    let a = m.as_array()?;
                    let mut data = a.get(1).cloned().unwrap_or(Value::Null);
                    // Errors come from the GPU servers (tracebacks, file names):
                    // participants see file names, never the servers' paths.
                    strip_server_paths_in(&mut data);
                    // Named by the id the participant knows (the backend saw the internal one).
                    if let Some(p) = data.get_mut("prompt_id")
                        && p.as_str() == Some(r.id.as_str())
                    {
                        *p = Value::String(public_id(&r).to_string());
                    }
                    Some((a.first()?.as_str()?.to_string(), data))
                })
                .collect()
        })
        .unwrap_or_default();
    let status = match r.state {
        JobState::Succeeded => Some(ExecStatus {
            status_str: StatusStr::Success,
            completed: true,
            messages,
        }),
        JobState::Failed | JobState::Interrupted => Some(ExecStatus {
            status_str: StatusStr::Error,
            completed: false,
            messages,
        }),
        _ => None,
    };
    let object = |v: Value| match v {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    HistoryRecord {
        number: number(r.number),
        prompt_id: public_id(&r).to_string(),
        prompt,
        extra_data,
        outputs_to_execute: std::mem::take(&mut r.outputs_to_execute),
        outputs: object(r.outputs.take()),
        status,
        meta: object(r.meta.take()),
    }
}

/// What history shows: finished jobs (a pending job removed from the queue
/// never ran, and ComfyUI forgets it).
const HISTORY_STATES: [JobState; 3] =
    [JobState::Succeeded, JobState::Failed, JobState::Interrupted];

#[derive(Deserialize)]
pub struct HistoryQuery {
    max_items: Option<String>,
    offset: Option<String>,
}

pub async fn get_history(
    State(state): State<AppState>,
    who: Participant,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<Response> {
    let max_items = match q.max_items.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<usize>()
                .map_err(|_| ApiError::bad_request("max_items must be a number"))?,
        ),
    };
    let offset = match q.offset.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<i64>()
                .map_err(|_| ApiError::bad_request("offset must be a number"))?,
        ),
    };
    let total = state
        .store
        .count_jobs(Some(&who.name), &HISTORY_STATES)
        .await? as usize;
    let window = shapes::queue::history_window(total, max_items, offset);
    if window.is_empty() {
        return Ok(Json(json!({})).into_response());
    }
    // Paged in the store: only the window is loaded, whatever the history's size.
    let jobs = state
        .store
        .list_jobs_text(&JobQuery {
            user: Some(who.name.clone()),
            states: HISTORY_STATES.to_vec(),
            order: JobOrder::SeqAsc,
            offset: window.start as u64,
            limit: Some(window.len() as u64),
            ..Default::default()
        })
        .await?;
    // The prompts and workflows (the bulk of a page) go from the store's text to the answer
    // unparsed, and the page is written without building a JSON value of it.
    let records = jobs.into_iter().map(history_record_of_text).collect();
    Ok(Json(shapes::queue::HistoryBody(records)).into_response())
}

pub async fn get_history_one(
    State(state): State<AppState>,
    who: Participant,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    // Looked up among the caller's own jobs only: another participant's id answers
    // exactly like an unknown one, 200 {}.
    match state.store.get_user_job(&who.name, &id).await? {
        Some(r) if HISTORY_STATES.contains(&r.state) => {
            let rec = history_record(&r);
            Ok(Json(shapes::queue::history_response([&rec])))
        }
        _ => Ok(Json(json!({}))),
    }
}

pub async fn post_history(
    State(state): State<AppState>,
    who: Participant,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let req = parse_clear_delete(&body)?;
    if req.clear == Some(true) {
        state.store.clear_history(&who.name).await?;
    }
    let to_delete = ids(req.delete);
    if !to_delete.is_empty() {
        state.store.delete_history(&who.name, &to_delete).await?;
    }
    Ok(StatusCode::OK)
}

fn job_source_entry(r: &JobRecord, detail: bool) -> Value {
    let num = number(r.number);
    let q = QueuedJob {
        number: &num,
        prompt_id: public_id(r),
        extra_data: &r.extra_data,
    };
    let rec;
    let source = match r.state {
        JobState::Queued => JobSource::Pending(q),
        JobState::Dispatched | JobState::Running => JobSource::InProgress(q),
        _ => {
            rec = history_record(r);
            JobSource::Finished(&rec)
        }
    };
    let mut v = if detail {
        shapes::jobs::job_detail(&source)
    } else {
        shapes::jobs::job_entry(&source)
    };
    // Timestamps we know better than extra_data does.
    if let Some(m) = v.as_object_mut() {
        if let Some(t) = r.started_at_ms {
            m.insert("execution_start_time".into(), json!(t));
        }
        if let Some(t) = r.finished_at_ms {
            m.insert("execution_end_time".into(), json!(t));
        }
    }
    v
}

fn states_for(status: &[JobStatus]) -> Vec<JobState> {
    let mut out = Vec::new();
    for s in status {
        match s {
            JobStatus::Pending => out.extend([JobState::Queued]),
            JobStatus::InProgress => out.extend([JobState::Dispatched, JobState::Running]),
            JobStatus::Completed => out.push(JobState::Succeeded),
            JobStatus::Failed => out.push(JobState::Failed),
            JobStatus::Cancelled => out.push(JobState::Interrupted),
        }
    }
    out
}

const VISIBLE_STATES: [JobState; 6] = [
    JobState::Queued,
    JobState::Dispatched,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Interrupted,
];

pub async fn get_jobs(
    State(state): State<AppState>,
    who: Participant,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    let q = match JobsQuery::parse(raw.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return Ok((StatusCode::BAD_REQUEST, Json(e.body())).into_response()),
    };
    let states = match &q.status {
        None => VISIBLE_STATES.to_vec(),
        Some(list) => states_for(list),
    };
    if states.is_empty() {
        return Ok(Json(json!({"jobs": [], "pagination": {"offset": q.offset, "limit": q.limit, "total": 0, "has_more": false}})).into_response());
    }
    let order = match (q.sort_by, q.descending) {
        (JobSort::CreatedAt, true) => JobOrder::CreatedDesc,
        (JobSort::CreatedAt, false) => JobOrder::CreatedAsc,
        (JobSort::ExecutionDuration, true) => JobOrder::DurationDesc,
        (JobSort::ExecutionDuration, false) => JobOrder::DurationAsc,
    };
    let (jobs, total) = state
        .store
        .list_jobs(&JobQuery {
            user: Some(who.name.clone()),
            states,
            workflow_id: q.workflow_id.clone(),
            order,
            offset: q.offset,
            limit: q.limit,
        })
        .await?;
    let has_more = q.offset + (jobs.len() as u64) < total;
    let entries: Vec<Value> = jobs.iter().map(|r| job_source_entry(r, false)).collect();
    Ok(Json(json!({
        "jobs": entries,
        "pagination": {"offset": q.offset, "limit": q.limit, "total": total, "has_more": has_more}
    }))
    .into_response())
}

pub async fn get_job(
    State(state): State<AppState>,
    who: Participant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    match state.store.get_user_job(&who.name, &id).await? {
        Some(r) if r.state != JobState::Cancelled => {
            Ok(Json(job_source_entry(&r, true)).into_response())
        }
        _ => Ok((StatusCode::NOT_FOUND, Json(shapes::jobs::job_not_found())).into_response()),
    }
}

/// `POST /interrupt`: stops the caller's own running job; a "global" interrupt
/// from a participant stops only their own. Never anyone else's.
pub async fn post_interrupt(
    State(state): State<AppState>,
    who: Participant,
    body: Bytes,
) -> StatusCode {
    let prompt_id = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("prompt_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    // The participant names the job by their prompt_id; the queue knows its internal id.
    let internal = match prompt_id {
        None => None,
        Some(p) => match state.store.get_user_job(&who.name, &p).await {
            Ok(Some(r)) => Some(r.id),
            // Not theirs, or unknown: like ComfyUI, an interrupt of a prompt that is not
            // running does nothing.
            Ok(None) => return StatusCode::OK,
            Err(e) => {
                tracing::warn!(user = %who.name, error = %e, "could not look up the job to interrupt");
                return StatusCode::OK;
            }
        },
    };
    let n = state.queue.interrupt(&who.name, internal.as_deref());
    if n > 0 {
        tracing::info!(user = %who.name, jobs = n, "interrupt requested");
    }
    StatusCode::OK
}

/// `POST /free`: GPU memory belongs to the backends; nothing to free here.
pub async fn post_free() -> StatusCode {
    StatusCode::OK
}
