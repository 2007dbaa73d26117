//! `/api/jobs` and `/api/jobs/{id}` (ComfyUI's `comfy_execution/jobs.py` and route).

use std::cmp::Ordering;

use serde_json::{Map, Number, Value, json};

use super::queue::{HistoryRecord, StatusStr};
use crate::py::{obj_get, py_int, truthy};

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Pending,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    /// In ComfyUI's `JobStatus.ALL` order.
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::InProgress,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|j| j.as_str() == s)
    }
}

/// A queued prompt, seen from the jobs API.
#[derive(Debug, Clone, Copy)]
pub struct QueuedJob<'a> {
    pub number: &'a Number,
    pub prompt_id: &'a str,
    /// Without sensitive keys; `create_time` and `extra_pnginfo.workflow.id` are read from it.
    pub extra_data: &'a Value,
}

/// Where a job comes from: the pending queue, the running slot, or history.
#[derive(Debug, Clone, Copy)]
pub enum JobSource<'a> {
    Pending(QueuedJob<'a>),
    InProgress(QueuedJob<'a>),
    Finished(&'a HistoryRecord),
}

fn job_metadata(extra_data: &Value) -> (Option<&Value>, Option<&Value>) {
    let create_time = obj_get(extra_data, "create_time").filter(|v| !v.is_null());
    let workflow_id = obj_get(extra_data, "extra_pnginfo")
        .and_then(|p| obj_get(p, "workflow"))
        .and_then(|w| obj_get(w, "id"))
        .filter(|v| !v.is_null());
    (create_time, workflow_id)
}

/// `prune_dict`: `None` values are left out.
fn insert_some(m: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v.filter(|v| !v.is_null()) {
        m.insert(key.to_owned(), v);
    }
}

const THREE_D_EXTENSIONS: [&str; 5] = [".obj", ".fbx", ".gltf", ".glb", ".usdz"];

fn has_3d_extension(name: &str) -> bool {
    let lower = name.to_lowercase();
    THREE_D_EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

/// `normalize_output_item`: dicts pass, 3D file names become file dicts, the rest is dropped.
fn normalize_output_item(item: &Value) -> Option<Value> {
    match item {
        Value::String(s) if has_3d_extension(s) => {
            Some(json!({"filename": s, "type": "output", "subfolder": "", "mediaType": "3d"}))
        }
        Value::Object(_) => Some(item.clone()),
        _ => None,
    }
}

fn normalize_outputs(outputs: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for (node_id, node_outputs) in outputs {
        let Some(node_outputs) = node_outputs.as_object() else {
            out.insert(node_id.clone(), node_outputs.clone());
            continue;
        };
        let mut node = Map::new();
        for (media_type, items) in node_outputs {
            match items {
                Value::Array(list) if media_type != "animated" => {
                    let normalized: Vec<Value> = list
                        .iter()
                        .filter(|i| !i.is_null())
                        .map(|i| normalize_output_item(i).unwrap_or_else(|| i.clone()))
                        .collect();
                    node.insert(media_type.clone(), Value::Array(normalized));
                }
                other => {
                    node.insert(media_type.clone(), other.clone());
                }
            }
        }
        out.insert(node_id.clone(), Value::Object(node));
    }
    Value::Object(out)
}

fn is_previewable(media_type: &str, item: &Value) -> bool {
    if matches!(media_type, "images" | "video" | "audio" | "3d") {
        return true;
    }
    let format = obj_get(item, "format")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if format.starts_with("video/") || format.starts_with("audio/") {
        return true;
    }
    has_3d_extension(
        obj_get(item, "filename")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    )
}

/// `get_outputs_summary`: (outputs_count, preview_output).
pub fn outputs_summary(outputs: &Map<String, Value>) -> (u64, Option<Value>) {
    let mut count = 0;
    let mut preview = None;
    let mut fallback = None;
    for (node_id, node_outputs) in outputs {
        let Some(node_outputs) = node_outputs.as_object() else {
            continue;
        };
        for (media_type, items) in node_outputs {
            let Some(items) = items.as_array().filter(|_| media_type != "animated") else {
                continue;
            };
            for item in items {
                let Some(normalized) = normalize_output_item(item) else {
                    continue;
                };
                count += 1;
                if preview.is_some() || !is_previewable(media_type, &normalized) {
                    continue;
                }
                let mut enriched = normalized.as_object().cloned().unwrap_or_default();
                enriched.insert("nodeId".into(), Value::String(node_id.clone()));
                if !enriched.contains_key("mediaType") {
                    enriched.insert("mediaType".into(), Value::String(media_type.clone()));
                }
                if obj_get(&normalized, "type").and_then(Value::as_str) == Some("output") {
                    preview = Some(Value::Object(enriched));
                } else if fallback.is_none() {
                    fallback = Some(Value::Object(enriched));
                }
            }
        }
    }
    (count, preview.or(fallback))
}

fn queued_entry(job: &QueuedJob<'_>, status: JobStatus) -> Value {
    let (create_time, workflow_id) = job_metadata(job.extra_data);
    let mut m = Map::new();
    m.insert("id".into(), Value::String(job.prompt_id.to_owned()));
    m.insert("status".into(), Value::String(status.as_str().into()));
    m.insert("priority".into(), Value::Number(job.number.clone()));
    insert_some(&mut m, "create_time", create_time.cloned());
    m.insert("outputs_count".into(), Value::from(0));
    insert_some(&mut m, "workflow_id", workflow_id.cloned());
    Value::Object(m)
}

fn finished_entry(r: &HistoryRecord, include_outputs: bool) -> Value {
    let (create_time, workflow_id) = job_metadata(&r.extra_data);
    let (outputs_count, preview_output) = outputs_summary(&r.outputs);
    let mut start = None;
    let mut end = None;
    let mut execution_error = None;
    let mut interrupted = false;
    for (event, data) in r.status.iter().flat_map(|s| &s.messages) {
        if !data.is_object() {
            continue;
        }
        match event.as_str() {
            "execution_start" => start = obj_get(data, "timestamp").cloned(),
            "execution_success" | "execution_error" | "execution_interrupted" => {
                end = obj_get(data, "timestamp").cloned();
                if event == "execution_error" {
                    execution_error = Some(data.clone());
                } else if event == "execution_interrupted" {
                    interrupted = true;
                }
            }
            _ => {}
        }
    }
    let status = match r.status.as_ref().map(|s| s.status_str) {
        Some(StatusStr::Error) if interrupted => JobStatus::Cancelled,
        Some(StatusStr::Error) => JobStatus::Failed,
        _ => JobStatus::Completed,
    };
    let mut m = Map::new();
    m.insert("id".into(), Value::String(r.prompt_id.clone()));
    m.insert("status".into(), Value::String(status.as_str().into()));
    m.insert("priority".into(), Value::Number(r.number.clone()));
    insert_some(&mut m, "create_time", create_time.cloned());
    insert_some(&mut m, "execution_start_time", start);
    insert_some(&mut m, "execution_end_time", end);
    insert_some(&mut m, "execution_error", execution_error);
    m.insert("outputs_count".into(), Value::from(outputs_count));
    insert_some(&mut m, "preview_output", preview_output);
    insert_some(&mut m, "workflow_id", workflow_id.cloned());
    if include_outputs {
        m.insert("outputs".into(), normalize_outputs(&r.outputs));
        m.insert(
            "execution_status".into(),
            r.status.as_ref().map_or(Value::Null, |s| s.to_json()),
        );
        m.insert(
            "workflow".into(),
            json!({"prompt": r.prompt, "extra_data": r.extra_data}),
        );
    }
    Value::Object(m)
}

/// A job as listed by `GET /api/jobs`.
pub fn job_entry(source: &JobSource<'_>) -> Value {
    match source {
        JobSource::Pending(j) => queued_entry(j, JobStatus::Pending),
        JobSource::InProgress(j) => queued_entry(j, JobStatus::InProgress),
        JobSource::Finished(r) => finished_entry(r, false),
    }
}

/// A job as returned by `GET /api/jobs/{id}`: finished jobs add `outputs`,
/// `execution_status` and `workflow: {prompt, extra_data}`.
pub fn job_detail(source: &JobSource<'_>) -> Value {
    match source {
        JobSource::Finished(r) => finished_entry(r, true),
        other => job_entry(other),
    }
}

/// The 404 body of `GET /api/jobs/{id}`.
pub fn job_not_found() -> Value {
    json!({"error": "Job not found"})
}

/// `sort_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobSort {
    CreatedAt,
    ExecutionDuration,
}

/// A bad `GET /api/jobs` query: 400 `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobsQueryError {
    pub message: String,
}

impl JobsQueryError {
    pub fn status(&self) -> u16 {
        400
    }
    pub fn body(&self) -> Value {
        json!({"error": self.message})
    }
}

/// Parsed `GET /api/jobs` query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsQuery {
    /// `None`: every status. `Some(empty)` is possible (`status=,`) and matches nothing.
    pub status: Option<Vec<JobStatus>>,
    /// Empty values are treated as absent.
    pub workflow_id: Option<String>,
    pub sort_by: JobSort,
    /// True for `desc` (the default).
    pub descending: bool,
    pub limit: Option<u64>,
    pub offset: u64,
}

impl Default for JobsQuery {
    fn default() -> Self {
        JobsQuery {
            status: None,
            workflow_id: None,
            sort_by: JobSort::CreatedAt,
            descending: true,
            limit: None,
            offset: 0,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Python int's decimal text as u64: negatives clamp to 0 (ComfyUI does so for offset),
/// values past u64 saturate.
fn saturating_u64(text: &str) -> u64 {
    if text.starts_with('-') {
        return 0;
    }
    text.parse::<u64>().unwrap_or(u64::MAX)
}

impl JobsQuery {
    /// Parses a raw query string (`status=completed&limit=1`); the first occurrence of a
    /// parameter wins, as with aiohttp's `query.get`.
    pub fn parse(raw_query: &str) -> Result<Self, JobsQueryError> {
        let pairs = raw_query
            .trim_start_matches('?')
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (percent_decode(k), percent_decode(v)),
                None => (percent_decode(p), String::new()),
            });
        Self::from_pairs(pairs)
    }

    /// Parses decoded `(name, value)` pairs; the first occurrence of a name wins.
    pub fn from_pairs<I, K, V>(pairs: I) -> Result<Self, JobsQueryError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut params: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            if !params.iter().any(|(pk, _)| pk == k.as_ref()) {
                params.push((k.as_ref().to_owned(), v.as_ref().to_owned()));
            }
        }
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let err = |m: String| Err(JobsQueryError { message: m });
        let mut q = JobsQuery::default();

        if let Some(status) = get("status").filter(|s| !s.is_empty()) {
            let wanted: Vec<String> = status
                .split(',')
                .map(|s| s.trim().to_lowercase())
                .filter(|s| !s.is_empty())
                .collect();
            let invalid: Vec<&str> = wanted
                .iter()
                .map(String::as_str)
                .filter(|s| JobStatus::parse(s).is_none())
                .collect();
            if !invalid.is_empty() {
                let valid: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                return err(format!(
                    "Invalid status value(s): {}. Valid values: {}",
                    invalid.join(", "),
                    valid.join(", ")
                ));
            }
            q.status = Some(wanted.iter().filter_map(|s| JobStatus::parse(s)).collect());
        }
        q.workflow_id = get("workflow_id")
            .filter(|w| !w.is_empty())
            .map(str::to_owned);
        q.sort_by = match get("sort_by")
            .unwrap_or("created_at")
            .to_lowercase()
            .as_str()
        {
            "created_at" => JobSort::CreatedAt,
            "execution_duration" => JobSort::ExecutionDuration,
            _ => return err("sort_by must be 'created_at' or 'execution_duration'".into()),
        };
        q.descending = match get("sort_order").unwrap_or("desc").to_lowercase().as_str() {
            "asc" => false,
            "desc" => true,
            _ => return err("sort_order must be 'asc' or 'desc'".into()),
        };
        if let Some(limit) = get("limit") {
            let Ok(n) = py_int(&Value::String(limit.to_owned())) else {
                return err("limit must be an integer".into());
            };
            if n.text.starts_with('-') || n.text == "0" {
                return err("limit must be a positive integer".into());
            }
            q.limit = Some(saturating_u64(&n.text));
        }
        if let Some(offset) = get("offset") {
            let Ok(n) = py_int(&Value::String(offset.to_owned())) else {
                return err("offset must be an integer".into());
            };
            q.offset = saturating_u64(&n.text);
        }
        Ok(q)
    }

    /// `get_all_jobs` over job entries (running first, then pending, then history, as
    /// ComfyUI gathers them): filter, stable sort, paginate, and build
    /// `{"jobs": [...], "pagination": {offset, limit, total, has_more}}`.
    pub fn apply(&self, jobs: Vec<Value>) -> Value {
        let mut jobs: Vec<Value> = jobs
            .into_iter()
            .filter(|j| {
                let status = obj_get(j, "status")
                    .and_then(Value::as_str)
                    .and_then(JobStatus::parse);
                match &self.status {
                    None => true,
                    Some(wanted) => status.is_some_and(|s| wanted.contains(&s)),
                }
            })
            .filter(|j| match &self.workflow_id {
                None => true,
                Some(w) => obj_get(j, "workflow_id").and_then(Value::as_str) == Some(w.as_str()),
            })
            .collect();
        let key = |j: &Value| -> f64 {
            let field = |k: &str| obj_get(j, k).and_then(Value::as_f64);
            match self.sort_by {
                JobSort::CreatedAt => field("create_time").unwrap_or(0.0),
                JobSort::ExecutionDuration => {
                    let start = obj_get(j, "execution_start_time");
                    let end = obj_get(j, "execution_end_time");
                    if start.is_some_and(truthy) && end.is_some_and(truthy) {
                        field("execution_end_time").unwrap_or(0.0)
                            - field("execution_start_time").unwrap_or(0.0)
                    } else {
                        0.0
                    }
                }
            }
        };
        // Stable in both directions, like Python's sorted(reverse=...).
        jobs.sort_by(|a, b| {
            let (ka, kb) = (key(a), key(b));
            let ord = ka.partial_cmp(&kb).unwrap_or(Ordering::Equal);
            if self.descending { ord.reverse() } else { ord }
        });
        let total = jobs.len();
        let offset = usize::try_from(self.offset)
            .unwrap_or(usize::MAX)
            .min(total);
        let limit = self.limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
        let page: Vec<Value> = jobs
            .into_iter()
            .skip(offset)
            .take(limit.unwrap_or(usize::MAX))
            .collect();
        let has_more = offset + page.len() < total;
        json!({
            "jobs": page,
            "pagination": {
                "offset": self.offset,
                "limit": self.limit,
                "total": total,
                "has_more": has_more,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::queue::tests::fixture_record;
    use crate::shapes::queue::{ExecStatus, StatusStr};

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/../../tests/fixtures/comfyui/api/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn text(v: &Value) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn detail_and_list_match_the_captures() {
        let record = fixture_record();
        let src = JobSource::Finished(&record);
        assert_eq!(text(&job_detail(&src)), text(&fixture("job_entry.json")));
        let listing = JobsQuery::default().apply(vec![job_entry(&src)]);
        assert_eq!(text(&listing), text(&fixture("jobs_after.json")));
    }

    #[test]
    fn queued_jobs_and_cancelled_history() {
        let extra = json!({"create_time": 5, "extra_pnginfo": {"workflow": {"id": "wf-1"}}});
        let n = Number::from(-3);
        let q = QueuedJob {
            number: &n,
            prompt_id: "p",
            extra_data: &extra,
        };
        assert_eq!(
            text(&job_entry(&JobSource::Pending(q))),
            r#"{"id":"p","status":"pending","priority":-3,"create_time":5,"outputs_count":0,"workflow_id":"wf-1"}"#
        );
        assert_eq!(
            job_detail(&JobSource::InProgress(q))["status"],
            "in_progress"
        );

        let mut r = fixture_record();
        r.outputs = Map::new();
        r.status = Some(ExecStatus {
            status_str: StatusStr::Error,
            completed: false,
            messages: vec![
                (
                    "execution_start".into(),
                    json!({"prompt_id": "x", "timestamp": 10}),
                ),
                (
                    "execution_interrupted".into(),
                    json!({"prompt_id": "x", "timestamp": 25}),
                ),
            ],
        });
        let e = job_entry(&JobSource::Finished(&r));
        assert_eq!(e["status"], "cancelled");
        assert_eq!(e["execution_end_time"], 25);
        assert_eq!(e["outputs_count"], 0);
        assert!(e.get("preview_output").is_none());
        r.status.as_mut().unwrap().messages[1] = (
            "execution_error".into(),
            json!({"exception_message": "boom", "timestamp": 30}),
        );
        let e = job_entry(&JobSource::Finished(&r));
        assert_eq!(e["status"], "failed");
        assert_eq!(e["execution_error"]["exception_message"], "boom");
    }

    #[test]
    fn preview_prefers_output_type_and_counts_3d_names() {
        let outputs = json!({
            "4": {"images": [{"filename": "t.png", "subfolder": "", "type": "temp"}]},
            "5": {"animated": [true], "text": ["hello"], "3d": ["mesh.glb"],
                  "images": [{"filename": "o.png", "subfolder": "", "type": "output"}]}
        });
        let (count, preview) = outputs_summary(outputs.as_object().unwrap());
        assert_eq!(count, 3);
        assert_eq!(
            text(&preview.unwrap()),
            r#"{"filename":"mesh.glb","type":"output","subfolder":"","mediaType":"3d","nodeId":"5"}"#
        );
    }

    #[test]
    fn query_errors_use_comfyui_messages() {
        let e = |q: &str| JobsQuery::parse(q).unwrap_err().message;
        assert_eq!(
            e("status=bogus"),
            "Invalid status value(s): bogus. Valid values: pending, in_progress, completed, failed, cancelled"
        );
        assert_eq!(
            e("status=completed,%20Nope,x"),
            "Invalid status value(s): nope, x. Valid values: pending, in_progress, completed, failed, cancelled"
        );
        assert_eq!(
            e("sort_by=name"),
            "sort_by must be 'created_at' or 'execution_duration'"
        );
        assert_eq!(e("sort_order=up"), "sort_order must be 'asc' or 'desc'");
        assert_eq!(e("limit=abc"), "limit must be an integer");
        assert_eq!(e("limit="), "limit must be an integer");
        assert_eq!(e("limit=0"), "limit must be a positive integer");
        assert_eq!(e("limit=-2"), "limit must be a positive integer");
        assert_eq!(e("offset=1.5"), "offset must be an integer");
        let err = JobsQuery::parse("sort_order=x").unwrap_err();
        assert_eq!(err.status(), 400);
        assert_eq!(
            text(&err.body()),
            r#"{"error":"sort_order must be 'asc' or 'desc'"}"#
        );
    }

    #[test]
    fn query_parses_and_applies() {
        let q = JobsQuery::parse("?status=Completed,+failed&limit=%201&offset=-4&sort_by=CREATED_AT&sort_order=asc&workflow_id=&limit=9").unwrap();
        assert_eq!(
            q.status,
            Some(vec![JobStatus::Completed, JobStatus::Failed])
        );
        assert_eq!(q.limit, Some(1));
        assert_eq!(q.offset, 0);
        assert!(!q.descending);
        assert_eq!(q.workflow_id, None);
        assert_eq!(JobsQuery::parse("status=,").unwrap().status, Some(vec![]));

        let job = |id: &str, status: &str, t: i64, wf: &str| json!({"id": id, "status": status, "priority": 0, "create_time": t, "outputs_count": 0, "workflow_id": wf});
        let jobs = vec![
            job("a", "in_progress", 5, "w1"),
            job("b", "pending", 7, "w2"),
            job("c", "completed", 5, "w1"),
            job("d", "failed", 1, "w1"),
        ];
        let out = JobsQuery::default().apply(jobs.clone());
        let ids: Vec<&str> = out["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["b", "a", "c", "d"]);
        let out = JobsQuery::parse("sort_order=asc&limit=2&offset=1&workflow_id=w1")
            .unwrap()
            .apply(jobs.clone());
        let ids: Vec<&str> = out["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(
            out["pagination"],
            json!({"offset": 1, "limit": 2, "total": 3, "has_more": false})
        );
        let out = JobsQuery::parse("status=completed,failed&limit=1")
            .unwrap()
            .apply(jobs);
        assert_eq!(
            out["pagination"],
            json!({"offset": 0, "limit": 1, "total": 2, "has_more": true})
        );
    }
}
