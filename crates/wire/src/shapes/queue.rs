//! `/prompt`, `/queue` and `/history` response shapes.

use serde_json::{Map, Number, Value, json};

/// `GET /prompt`: `{"exec_info": {"queue_remaining": N}}` (N counts pending plus running).
pub fn prompt_info(queue_remaining: u64) -> Value {
    json!({"exec_info": {"queue_remaining": queue_remaining}})
}

/// The 200 body of `POST /prompt`.
pub fn prompt_accepted(
    prompt_id: &str,
    number: &Number,
    node_errors: &Map<String, Value>,
) -> Value {
    json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})
}

/// A queue item as `/queue` and `/history` show it:
/// `[number, prompt_id, prompt, extra_data, outputs_to_execute]` (sensitive keys already gone).
pub fn queue_item(
    number: &Number,
    prompt_id: &str,
    prompt: &Value,
    extra_data: &Value,
    outputs_to_execute: &[String],
) -> Value {
    let item = ItemParts {
        number,
        prompt_id,
        prompt,
        extra_data,
        outputs_to_execute,
    };
    serde_json::to_value(item).expect("a queue item is JSON")
}

/// `GET /queue`: `{"queue_running": [...], "queue_pending": [...]}`.
pub fn queue_response(running: Vec<Value>, pending: Vec<Value>) -> Value {
    // The items are values already: moved in, not serialized a second time.
    let mut body = Map::new();
    body.insert(QUEUE_RUNNING.into(), Value::Array(running));
    body.insert(QUEUE_PENDING.into(), Value::Array(pending));
    Value::Object(body)
}

/// `GET /queue`'s two keys (one spelling for [`queue_response`] and [`QueueBody`]).
const QUEUE_RUNNING: &str = "queue_running";
const QUEUE_PENDING: &str = "queue_pending";

/// A queue item's array, borrowed: the one definition behind [`queue_item`], [`QueueEntry`]
/// and a history item's `prompt`.
struct ItemParts<'a, J> {
    number: &'a Number,
    prompt_id: &'a str,
    prompt: &'a J,
    extra_data: &'a J,
    outputs_to_execute: &'a [String],
}

impl<J: serde::Serialize> serde::Serialize for ItemParts<'_, J> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(
            &(
                self.number,
                self.prompt_id,
                self.prompt,
                self.extra_data,
                self.outputs_to_execute,
            ),
            s,
        )
    }
}

/// A queue item's parts ([`queue_item`]'s), its prompt and workflow held as `J` (see
/// [`HistoryRecord`]).
#[derive(Debug, Clone)]
pub struct QueueEntry<J = Value> {
    pub number: Number,
    pub prompt_id: String,
    pub prompt: J,
    pub extra_data: J,
    pub outputs_to_execute: Vec<String>,
}

/// `GET /queue`, written straight from its items ([`QueueEntry`]s, or built values).
pub struct QueueBody<T = Value> {
    pub running: Vec<T>,
    pub pending: Vec<T>,
}

impl<J: serde::Serialize> serde::Serialize for QueueEntry<J> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ItemParts {
            number: &self.number,
            prompt_id: &self.prompt_id,
            prompt: &self.prompt,
            extra_data: &self.extra_data,
            outputs_to_execute: &self.outputs_to_execute,
        }
        .serialize(s)
    }
}

impl<T: serde::Serialize> serde::Serialize for QueueBody<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(QUEUE_RUNNING, &self.running)?;
        map.serialize_entry(QUEUE_PENDING, &self.pending)?;
        map.end()
    }
}

/// `status.status_str`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusStr {
    Success,
    Error,
}

impl StatusStr {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusStr::Success => "success",
            StatusStr::Error => "error",
        }
    }
}

/// A history item's `status`: success, or error (failed and interrupted alike), plus the
/// `[event, data]` messages recorded during execution (execution_start, ..._cached,
/// ..._success / ..._error / ..._interrupted).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecStatus {
    pub status_str: StatusStr,
    pub completed: bool,
    pub messages: Vec<(String, Value)>,
}

impl ExecStatus {
    pub fn to_json(&self) -> Value {
        let messages: Vec<Value> = self
            .messages
            .iter()
            .map(|(event, data)| json!([event, data]))
            .collect();
        json!({"status_str": self.status_str.as_str(), "completed": self.completed, "messages": messages})
    }
}

/// A finished prompt, as kept in history. `J` holds its prompt and workflow: a JSON value,
/// or (for a page written straight out, `J = Box<RawValue>`) the JSON text as stored, so the
/// bulk of a history is never parsed only to be written again.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRecord<J = Value> {
    /// The queue priority.
    pub number: Number,
    pub prompt_id: String,
    pub prompt: J,
    /// Without sensitive keys.
    pub extra_data: J,
    pub outputs_to_execute: Vec<String>,
    /// node id -> ui output (`{"images": [...]}`, `{"text": [...]}`, ...).
    pub outputs: Map<String, Value>,
    /// `None` renders as `"status": null`, as ComfyUI does when the worker had none.
    pub status: Option<ExecStatus>,
    /// node id -> [`meta_entry`].
    pub meta: Map<String, Value>,
}

/// One `meta` entry of a history item.
pub fn meta_entry(
    node_id: &str,
    display_node: &str,
    parent_node: Option<&str>,
    real_node_id: &str,
) -> Value {
    json!({"node_id": node_id, "display_node": display_node, "parent_node": parent_node, "real_node_id": real_node_id})
}

impl HistoryRecord {
    /// The record behind a history item as [`history_item`] renders it (`GET /history/{id}`
    /// values); `None` when `item` does not have that shape.
    pub fn from_item(prompt_id: &str, item: &Value) -> Option<HistoryRecord> {
        let p = item.get("prompt")?.as_array()?;
        let status = match item.get("status") {
            None | Some(Value::Null) => None,
            Some(s) => Some(ExecStatus {
                status_str: match s.get("status_str")?.as_str()? {
                    "success" => StatusStr::Success,
                    "error" => StatusStr::Error,
                    _ => return None,
                },
                completed: s.get("completed")?.as_bool()?,
                messages: s
                    .get("messages")?
                    .as_array()?
                    .iter()
                    .map(|m| Some((m.get(0)?.as_str()?.to_owned(), m.get(1)?.clone())))
                    .collect::<Option<_>>()?,
            }),
        };
        Some(HistoryRecord {
            number: p.first()?.as_number()?.clone(),
            prompt_id: prompt_id.to_owned(),
            prompt: p.get(2)?.clone(),
            extra_data: p.get(3)?.clone(),
            outputs_to_execute: p
                .get(4)?
                .as_array()?
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()?,
            outputs: item.get("outputs")?.as_object()?.clone(),
            status,
            meta: item
                .get("meta")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// A history item (`GET /history/{id}` values): `{"prompt", "outputs", "status", "meta"}`.
pub fn history_item(record: &HistoryRecord) -> Value {
    serde_json::to_value(HistoryItem(record)).expect("a history item is JSON")
}

/// `GET /history` as [`history_response`] renders it, written straight from the records:
/// no copy of their prompts and workflows (the bulk of a history) is made on the way.
pub struct HistoryBody<J = Value>(pub Vec<HistoryRecord<J>>);

impl<J: serde::Serialize> serde::Serialize for HistoryBody<J> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for r in &self.0 {
            map.serialize_entry(&r.prompt_id, &HistoryItem(r))?;
        }
        map.end()
    }
}

/// A history item's shape, written from its record: the one definition behind
/// [`history_item`] and [`HistoryBody`].
struct HistoryItem<'a, J>(&'a HistoryRecord<J>);

impl<J: serde::Serialize> serde::Serialize for HistoryItem<'_, J> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.0;
        let mut map = s.serialize_map(Some(4))?;
        let prompt = ItemParts {
            number: &r.number,
            prompt_id: &r.prompt_id,
            prompt: &r.prompt,
            extra_data: &r.extra_data,
            outputs_to_execute: &r.outputs_to_execute,
        };
        map.serialize_entry("prompt", &prompt)?;
        map.serialize_entry("outputs", &r.outputs)?;
        map.serialize_entry("status", &r.status.as_ref().map(ExecStatus::to_json))?;
        map.serialize_entry("meta", &r.meta)?;
        map.end()
    }
}

/// `GET /history`: `{prompt_id: item}` in the given (insertion) order.
pub fn history_response<'a>(records: impl IntoIterator<Item = &'a HistoryRecord>) -> Value {
    let mut out = Map::new();
    for r in records {
        out.insert(r.prompt_id.clone(), history_item(r));
    }
    Value::Object(out)
}

/// ComfyUI's `get_history(max_items, offset)` window over `len` items in insertion order:
/// the index range to return. With `max_items` and no (or negative) offset: the last N.
pub fn history_window(
    len: usize,
    max_items: Option<usize>,
    offset: Option<i64>,
) -> std::ops::Range<usize> {
    let offset = offset.unwrap_or(-1);
    let start = match (offset < 0, max_items) {
        (true, Some(m)) => len.saturating_sub(m),
        (true, None) => 0,
        (false, _) => (offset as usize).min(len),
    };
    let end = match max_items {
        // ComfyUI inserts before checking `len(out) >= max_items`, so 0 still yields one.
        Some(m) => start.saturating_add(m.max(1)).min(len),
        None => len,
    };
    start..end
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/comfyui/api/history_entry.json"
    ));

    pub(crate) fn fixture_record() -> HistoryRecord {
        let all: Value = serde_json::from_str(FIXTURE).unwrap();
        let (id, item) = all.as_object().unwrap().iter().next().unwrap();
        HistoryRecord::from_item(id, item).unwrap()
    }

    #[test]
    fn a_history_item_reads_back_as_its_record() {
        let r = fixture_record();
        assert_eq!(r.status.as_ref().unwrap().status_str, StatusStr::Success);
        assert_eq!(r.meta["3"], meta_entry("3", "3", None, "3"));
        let item = history_item(&r);
        assert_eq!(
            HistoryRecord::from_item(&r.prompt_id, &item),
            Some(r.clone())
        );
        let mut pending = r.clone();
        pending.status = None;
        let item = history_item(&pending);
        assert_eq!(HistoryRecord::from_item("x", &item).unwrap().status, None);
        assert_eq!(HistoryRecord::from_item("x", &json!({"prompt": 1})), None);
        let mut odd = history_item(&r);
        odd["status"]["status_str"] = json!("maybe");
        assert_eq!(HistoryRecord::from_item("x", &odd), None);
    }

    #[test]
    fn history_matches_the_capture_byte_for_byte() {
        let expected: Value = serde_json::from_str(FIXTURE).unwrap();
        let record = fixture_record();
        let got = history_response([&record]);
        assert_eq!(
            serde_json::to_string(&got).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
    }

    /// The body written straight from the records is the same text as the one built as a
    /// JSON value, entry order, nulls and numbers included.
    #[test]
    fn the_streamed_history_body_is_the_built_one() {
        let mut records = vec![fixture_record()];
        let mut second = fixture_record();
        second.prompt_id = "second".into();
        second.status = None;
        second.number = Number::from_f64(7.5).unwrap();
        second.meta = Map::new();
        records.push(second);
        let mut third = fixture_record();
        third.prompt_id = "third".into();
        third.status.as_mut().unwrap().status_str = StatusStr::Error;
        third.outputs = Map::new();
        records.push(third);
        let built = serde_json::to_string(&history_response(records.iter())).unwrap();
        let streamed = serde_json::to_string(&HistoryBody(records)).unwrap();
        assert_eq!(streamed, built);
        assert_eq!(
            serde_json::to_string(&HistoryBody::<Value>(Vec::new())).unwrap(),
            "{}"
        );
    }

    /// A page whose prompts and workflows are the stored JSON text is written as the one
    /// whose prompts and workflows are values.
    #[test]
    fn a_history_body_of_json_text_is_the_one_of_values() {
        use serde_json::value::{RawValue, to_raw_value};
        let mut records = vec![fixture_record()];
        let mut second = fixture_record();
        second.prompt_id = "second".into();
        second.extra_data = json!({"client_id": "ü ✓ \"q\"", "n": [1.5, -0.0, 1e300]});
        records.push(second);
        let text: Vec<HistoryRecord<Box<RawValue>>> = records
            .iter()
            .map(|r| HistoryRecord {
                number: r.number.clone(),
                prompt_id: r.prompt_id.clone(),
                prompt: to_raw_value(&r.prompt).unwrap(),
                extra_data: to_raw_value(&r.extra_data).unwrap(),
                outputs_to_execute: r.outputs_to_execute.clone(),
                outputs: r.outputs.clone(),
                status: r.status.clone(),
                meta: r.meta.clone(),
            })
            .collect();
        assert_eq!(
            serde_json::to_string(&HistoryBody(text)).unwrap(),
            serde_json::to_string(&HistoryBody(records)).unwrap()
        );
    }

    #[test]
    fn queue_and_prompt_shapes() {
        let item = queue_item(
            &Number::from(3),
            "id",
            &json!({}),
            &json!({"client_id": "c"}),
            &["9".to_owned()],
        );
        assert_eq!(item, json!([3, "id", {}, {"client_id": "c"}, ["9"]]));
        assert_eq!(
            serde_json::to_string(&queue_response(vec![], vec![item])).unwrap(),
            r#"{"queue_running":[],"queue_pending":[[3,"id",{},{"client_id":"c"},["9"]]]}"#
        );
        assert_eq!(prompt_info(2), json!({"exec_info": {"queue_remaining": 2}}));
        let n = Number::from_f64(7.5).unwrap();
        assert_eq!(
            serde_json::to_string(&prompt_accepted("my-own-id-123", &n, &Map::new())).unwrap(),
            r#"{"prompt_id":"my-own-id-123","number":7.5,"node_errors":{}}"#
        );
        let mut r = fixture_record();
        r.status = None;
        assert_eq!(history_item(&r)["status"], Value::Null);
    }

    /// The queue written from entries holding the stored text is the built one.
    #[test]
    fn the_queue_body_is_the_built_queue() {
        use serde_json::value::{RawValue, to_raw_value};
        let r = fixture_record();
        let entry = |id: &str, n: f64| QueueEntry {
            number: Number::from_f64(n).unwrap(),
            prompt_id: id.to_owned(),
            prompt: to_raw_value(&r.prompt).unwrap(),
            extra_data: to_raw_value(&r.extra_data).unwrap(),
            outputs_to_execute: r.outputs_to_execute.clone(),
        };
        let built = |e: &QueueEntry<Box<RawValue>>| {
            queue_item(
                &e.number,
                &e.prompt_id,
                &r.prompt,
                &r.extra_data,
                &e.outputs_to_execute,
            )
        };
        let body = QueueBody {
            running: vec![entry("a", 1.0)],
            pending: vec![entry("b", 2.5), entry("c", 3.0)],
        };
        let want = queue_response(
            body.running.iter().map(built).collect(),
            body.pending.iter().map(built).collect(),
        );
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            serde_json::to_string(&want).unwrap()
        );
        let empty = QueueBody::<Value> {
            running: vec![],
            pending: vec![],
        };
        assert_eq!(
            serde_json::to_string(&empty).unwrap(),
            r#"{"queue_running":[],"queue_pending":[]}"#
        );
    }

    #[test]
    fn history_window_follows_get_history() {
        assert_eq!(history_window(10, None, None), 0..10);
        assert_eq!(history_window(10, Some(3), None), 7..10);
        assert_eq!(history_window(10, Some(3), Some(2)), 2..5);
        assert_eq!(history_window(2, Some(5), None), 0..2);
        assert_eq!(history_window(4, None, Some(9)), 4..4);
        assert_eq!(history_window(4, Some(0), Some(1)), 1..2);
        assert_eq!(history_window(4, Some(0), None), 4..4);
    }
}
