//! The worker protocol (`docs/worker-protocol.md`): the `POST /run` request, the events
//! of its answer, and Server-Sent Events framing and parsing. Shared by `comfyume-worker`
//! (which writes it) and the app server's serverless backend (which reads it).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Protocol version, sent in `accepted`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest accepted job id.
pub const MAX_JOB_ID_LEN: usize = 128;

/// `POST /run` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    pub job_id: String,
    pub prompt: Value,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub extra_data: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs_to_execute: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<RunInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// An input file the prompt names: inline or in the object store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInput {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_key: Option<String>,
}

/// Where an input's bytes come from, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputSource<'a> {
    Inline(&'a str),
    Store(&'a str),
}

/// Why a `POST /run` body is refused (400, `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("job_id must be 1 to {MAX_JOB_ID_LEN} characters of A-Z a-z 0-9 - _ . :")]
    BadJobId,
    #[error("prompt must be an object of nodes")]
    BadPrompt,
    #[error("extra_data must be an object")]
    BadExtraData,
    #[error("outputs_to_execute names an empty node id")]
    BadOutputs,
    #[error("input name {0:?} is not a relative path without '..' or empty segments")]
    BadInputName(String),
    #[error("input {0:?} needs exactly one of data_base64 and store_key")]
    BadInputSource(String),
    #[error("input {0:?} is named twice")]
    DuplicateInput(String),
    #[error("user must be at most 64 characters")]
    BadUser,
    #[error("attempt must be at least 1")]
    BadAttempt,
}

impl RunRequest {
    /// Checks everything that needs no I/O. The body's `job_id` is the job's identity;
    /// an `X-Inference-Id` header is not checked against it (a gateway may set its own).
    pub fn validate(&self) -> Result<(), RequestError> {
        if !valid_job_id(&self.job_id) {
            return Err(RequestError::BadJobId);
        }
        match &self.prompt {
            Value::Object(nodes) if !nodes.is_empty() => {}
            _ => return Err(RequestError::BadPrompt),
        }
        if !matches!(self.extra_data, Value::Null | Value::Object(_)) {
            return Err(RequestError::BadExtraData);
        }
        if self.outputs_to_execute.iter().any(|o| o.trim().is_empty()) {
            return Err(RequestError::BadOutputs);
        }
        let mut seen = std::collections::HashSet::new();
        for input in &self.inputs {
            if !valid_input_name(&input.name) {
                return Err(RequestError::BadInputName(truncate(&input.name)));
            }
            input.source()?;
            if !seen.insert(input.name.as_str()) {
                return Err(RequestError::DuplicateInput(truncate(&input.name)));
            }
        }
        if self.user.as_ref().is_some_and(|u| u.chars().count() > 64) {
            return Err(RequestError::BadUser);
        }
        if self.attempt == Some(0) {
            return Err(RequestError::BadAttempt);
        }
        Ok(())
    }
}

impl RunInput {
    pub fn source(&self) -> Result<InputSource<'_>, RequestError> {
        match (&self.data_base64, &self.store_key) {
            (Some(d), None) => Ok(InputSource::Inline(d)),
            (None, Some(k)) if !k.is_empty() && k.len() <= 1024 => Ok(InputSource::Store(k)),
            _ => Err(RequestError::BadInputSource(truncate(&self.name))),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// 1–128 characters of `A-Z a-z 0-9 - _ . :` (safe in a path segment, a header and a key).
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_JOB_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A relative path of non-empty segments, none `.` or `..`, no backslash or NUL.
pub fn valid_input_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && !name.contains(['\\', '\0'])
        && name
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// A delivered file, as ComfyUI's ui dicts name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileRef {
    pub filename: String,
    pub subfolder: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// Bucket and key of a file in the object store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRef {
    pub bucket: String,
    pub key: String,
}

/// How a file reached the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Inline,
    Store,
}

/// One entry of a final event's `files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredFile {
    pub file: FileRef,
    pub size: u64,
    pub sha256: String,
    pub delivery: Delivery,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreRef>,
}

/// `timing` of a final event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Timing {
    pub total_ms: u64,
    pub execution_ms: Option<u64>,
}

/// `kind` of an `error` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    ExecutionError,
    Rejected,
    Interrupted,
    Worker,
}

/// `reason` of an `aborted` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortReason {
    Sigterm,
    ComfyuiDied,
    ComfyuiUnreachable,
    ComfyuiLostJob,
    ComfyuiTimeout,
    ComfyuiProtocol,
    OutputStoreFailed,
    Internal,
    /// A reason this reader does not know (newer worker): still an abort.
    #[serde(other)]
    Other,
}

/// One event of a `POST /run` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Accepted {
        job_id: String,
        worker: String,
        protocol: u32,
        replay: bool,
    },
    Submitted {
        job_id: String,
    },
    Started {
        job_id: String,
    },
    /// A ComfyUI WebSocket JSON message about the job.
    Comfyui {
        job_id: String,
        message: Value,
    },
    /// A ComfyUI binary frame, base64.
    Preview {
        job_id: String,
        frame: String,
    },
    OutputFile {
        job_id: String,
        file: FileRef,
        size: u64,
        chunks: u64,
    },
    OutputChunk {
        job_id: String,
        file: FileRef,
        index: u64,
        data: String,
    },
    OutputEnd {
        job_id: String,
        file: FileRef,
        size: u64,
        sha256: String,
    },
    OutputStored {
        job_id: String,
        file: FileRef,
        size: u64,
        sha256: String,
        store: StoreRef,
    },
    Notice {
        job_id: String,
        message: String,
    },
    Keepalive,
    Result {
        job_id: String,
        outputs: Map<String, Value>,
        files: Vec<DeliveredFile>,
        status: Value,
        meta: Map<String, Value>,
        timing: Timing,
    },
    Error {
        job_id: String,
        kind: ErrorKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outputs: Option<Map<String, Value>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        files: Option<Vec<DeliveredFile>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<Map<String, Value>>,
        timing: Timing,
    },
    Aborted {
        job_id: String,
        reason: AbortReason,
        message: String,
        timing: Timing,
    },
    /// An event type this reader does not know: to be ignored.
    #[serde(other)]
    Unknown,
}

impl Event {
    /// `result`, `error` and `aborted` end a job's stream.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::Result { .. } | Event::Error { .. } | Event::Aborted { .. }
        )
    }

    /// The event as its single-line JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail (string keys, no non-finite floats made here).
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// ComfyUI's error body shape (`{"error": {...}, "node_errors": {}}`), used for every
/// answer of the worker that is not an event stream.
pub fn error_body(kind: &str, message: &str, details: &str) -> Value {
    json!({
        "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    })
}

/// One SSE event carrying `json` (which must be a single line) as its data.
pub fn sse_data(json: &str) -> String {
    debug_assert!(!json.contains('\n'));
    format!("data: {json}\n\n")
}

/// The keep-alive: a comment (for idle proxies) and a `keepalive` data event (for a
/// gateway that re-frames events and drops comments).
pub const SSE_KEEPALIVE: &str = ": keepalive\ndata: {\"type\":\"keepalive\"}\n\n";

/// One parsed SSE event: its `event:` name (if any) and its data lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// An incremental Server-Sent Events parser (the WHATWG rules that matter here): feed it
/// bytes as they come, take whole events out. Comments and `id:`/`retry:` are skipped;
/// an event without data lines is not reported. A line longer than `max_line` is an
/// error (a protection against a peer that never ends a line).
#[derive(Debug)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    max_line: usize,
    bom_checked: bool,
}

/// A line longer than the parser's limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an SSE line is longer than {0} bytes")]
pub struct SseLineTooLong(pub usize);

impl SseParser {
    pub fn new(max_line: usize) -> Self {
        SseParser {
            buf: Vec::new(),
            event: None,
            data: None,
            max_line,
            bom_checked: false,
        }
    }

    /// Adds bytes; returns the events they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, SseLineTooLong> {
        self.buf.extend_from_slice(bytes);
        if !self.bom_checked && self.buf.len() >= 3 {
            if self.buf.starts_with(b"\xEF\xBB\xBF") {
                self.buf.drain(..3);
            }
            self.bom_checked = true;
        }
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let end = start + pos;
            let mut next = end + 1;
            if self.buf[end] == b'\r' {
                if next >= self.buf.len() {
                    // A `\r` at the end: wait to see whether `\n` follows.
                    break;
                }
                if self.buf[next] == b'\n' {
                    next += 1;
                }
            }
            let line = String::from_utf8_lossy(&self.buf[start..end]).into_owned();
            start = next;
            if let Some(ev) = self.line(&line) {
                out.push(ev);
            }
        }
        self.buf.drain(..start);
        if self.buf.len() > self.max_line {
            return Err(SseLineTooLong(self.max_line));
        }
        Ok(out)
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            return data.map(|data| SseEvent { event, data });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(v: Value) -> RunRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_minimal_request_is_valid() {
        let r = request(json!({"job_id": "j-1", "prompt": {"1": {}}}));
        assert_eq!(r.validate(), Ok(()));
    }

    #[test]
    fn hostile_requests_are_refused() {
        let base = json!({"job_id": "j", "prompt": {"1": {}}});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            request(b).validate()
        };
        assert_eq!(with("job_id", json!("")), Err(RequestError::BadJobId));
        assert_eq!(with("job_id", json!("../x")), Err(RequestError::BadJobId));
        assert_eq!(with("job_id", json!("a b")), Err(RequestError::BadJobId));
        assert_eq!(with("job_id", json!("..")), Err(RequestError::BadJobId));
        assert_eq!(
            with("job_id", json!("x".repeat(129))),
            Err(RequestError::BadJobId)
        );
        assert_eq!(with("prompt", json!([])), Err(RequestError::BadPrompt));
        assert_eq!(with("prompt", json!({})), Err(RequestError::BadPrompt));
        assert_eq!(
            with("extra_data", json!(3)),
            Err(RequestError::BadExtraData)
        );
        assert_eq!(
            with("outputs_to_execute", json!([""])),
            Err(RequestError::BadOutputs)
        );
        for name in ["", "/etc/passwd", "a/../b", "a//b", "./a", "a\\b", "a/"] {
            assert!(
                matches!(
                    with("inputs", json!([{"name": name, "data_base64": ""}])),
                    Err(RequestError::BadInputName(_))
                ),
                "{name:?}"
            );
        }
        assert!(matches!(
            with("inputs", json!([{"name": "a.png"}])),
            Err(RequestError::BadInputSource(_))
        ));
        assert!(matches!(
            with(
                "inputs",
                json!([{"name": "a.png", "data_base64": "", "store_key": "k"}])
            ),
            Err(RequestError::BadInputSource(_))
        ));
        assert!(matches!(
            with(
                "inputs",
                json!([{"name": "a.png", "data_base64": ""}, {"name": "a.png", "store_key": "k"}])
            ),
            Err(RequestError::DuplicateInput(_))
        ));
        assert_eq!(with("attempt", json!(0)), Err(RequestError::BadAttempt));
        assert_eq!(
            with("user", json!("u".repeat(65))),
            Err(RequestError::BadUser)
        );
        assert_eq!(
            with(
                "inputs",
                json!([{"name": "sub/dir/a.png", "store_key": "k"}])
            ),
            Ok(())
        );
    }

    #[test]
    fn events_have_the_documented_shape() {
        let file = FileRef {
            filename: "a.png".into(),
            subfolder: String::new(),
            kind: "output".into(),
        };
        let e = Event::OutputChunk {
            job_id: "j".into(),
            file: file.clone(),
            index: 0,
            data: "AA==".into(),
        };
        assert_eq!(
            e.to_json(),
            r#"{"type":"output_chunk","job_id":"j","file":{"filename":"a.png","subfolder":"","type":"output"},"index":0,"data":"AA=="}"#
        );
        let e = Event::Aborted {
            job_id: "j".into(),
            reason: AbortReason::Sigterm,
            message: "m".into(),
            timing: Timing {
                total_ms: 5,
                execution_ms: None,
            },
        };
        assert_eq!(
            e.to_json(),
            r#"{"type":"aborted","job_id":"j","reason":"sigterm","message":"m","timing":{"total_ms":5,"execution_ms":null}}"#
        );
        assert!(e.is_final());
        assert_eq!(Event::Keepalive.to_json(), r#"{"type":"keepalive"}"#);
        let back: Event = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(back, e);
        // Readers ignore what they do not know.
        let unknown: Event = serde_json::from_str(r#"{"type":"future","x":1}"#).unwrap();
        assert_eq!(unknown, Event::Unknown);
        let odd: Event = serde_json::from_str(
            r#"{"type":"aborted","job_id":"j","reason":"meteor","message":"","timing":{"total_ms":1,"execution_ms":2}}"#,
        )
        .unwrap();
        assert!(matches!(
            odd,
            Event::Aborted {
                reason: AbortReason::Other,
                ..
            }
        ));
    }

    #[test]
    fn sse_parser_handles_reframing_and_splits() {
        let stream = "data: {\"a\":1}\n\n: comment\n\nevent:response\ndata:{\"b\":2}\r\n\r\nid: 7\ndata: x\ndata: y\n\n";
        // Every split point gives the same events.
        for cut in 0..stream.len() {
            let mut p = SseParser::new(1024);
            let mut evs = p.feed(&stream.as_bytes()[..cut]).unwrap();
            evs.extend(p.feed(&stream.as_bytes()[cut..]).unwrap());
            assert_eq!(
                evs,
                vec![
                    SseEvent {
                        event: None,
                        data: "{\"a\":1}".into()
                    },
                    SseEvent {
                        event: Some("response".into()),
                        data: "{\"b\":2}".into()
                    },
                    SseEvent {
                        event: None,
                        data: "x\ny".into()
                    },
                ],
                "cut at {cut}"
            );
        }
        let mut p = SseParser::new(8);
        assert!(p.feed(b"data: 0123456789").is_err());
        let mut p = SseParser::new(64);
        let evs = p.feed(SSE_KEEPALIVE.as_bytes()).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(
            serde_json::from_str::<Event>(&evs[0].data).unwrap(),
            Event::Keepalive
        );
        assert_eq!(p.feed(sse_data("{}").as_bytes()).unwrap()[0].data, "{}");
    }
}
