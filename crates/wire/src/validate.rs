//! `POST /prompt` validation, reproducing ComfyUI 0.11.0's `execution.validate_prompt` /
//! `validate_inputs` and its error bodies.
//!
//! Where ComfyUI's Python would crash (a 500 from an uncaught exception) or recurse forever,
//! this module answers with a ComfyUI-shaped 400 instead:
//! * a `prompt` that is not an object: `invalid_prompt`;
//! * a node that is not an object, or a `class_type` that is not a string: the usual
//!   "missing the class_type property" / "does not exist" errors;
//! * a non-numeric `number`, a non-object `extra_data`, or a `partial_execution_targets`
//!   that cannot be searched: `invalid_prompt`;
//! * a dependency cycle: ComfyUI's later `dependency_cycle` error (0.11.0 hits RecursionError).
//!
//! `traceback` in exception errors is always `[]` (there is no Python stack to show).
//! Output nodes are validated in sorted id order (ComfyUI iterates a `set`, whose order is
//! arbitrary), which also fixes the order of `dependent_outputs` and `outputs_to_execute`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use serde_json::{Map, Number, Value, json};

use crate::object_info::{FileKind, ObjectInfo, UserFiles, patch_spec, upload_kind};
use crate::py::{
    PyExc, PyVal, obj_get, py_contains, py_eq, py_float, py_getitem, py_index, py_int, py_repr,
    py_str, truthy, type_name,
};
use crate::sensitive::split_sensitive;

/// A rejected `POST /prompt`, rendered exactly like ComfyUI's 400 body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {}", self.0.error_type, self.0.message)]
pub struct PromptError(Box<ErrorParts>);

#[derive(Debug, Clone, PartialEq)]
struct ErrorParts {
    error_type: String,
    message: String,
    details: String,
    extra_info: Value,
    node_errors: Map<String, Value>,
}

impl PromptError {
    fn new(error_type: &str, message: impl Into<String>, details: impl Into<String>) -> Self {
        PromptError(Box::new(ErrorParts {
            error_type: error_type.to_owned(),
            message: message.into(),
            details: details.into(),
            extra_info: Value::Object(Map::new()),
            node_errors: Map::new(),
        }))
    }

    /// `error.type`, e.g. `prompt_outputs_failed_validation`.
    pub fn error_type(&self) -> &str {
        &self.0.error_type
    }

    pub fn message(&self) -> &str {
        &self.0.message
    }

    pub fn details(&self) -> &str {
        &self.0.details
    }

    pub fn extra_info(&self) -> &Value {
        &self.0.extra_info
    }

    /// node id -> `{"errors", "dependent_outputs", "class_type"}`.
    pub fn node_errors(&self) -> &Map<String, Value> {
        &self.0.node_errors
    }

    /// Our own rejection (queue caps, quotas, ...) in ComfyUI's shape, so the stock
    /// frontend shows `message`/`details` like any validation failure.
    pub fn rejected(error_type: &str, message: &str, details: &str) -> Self {
        Self::new(error_type, message, details)
    }

    /// HTTP status: always 400, as ComfyUI.
    pub fn status(&self) -> u16 {
        400
    }

    /// `{"error": {"type","message","details","extra_info"}, "node_errors": {...}}`.
    pub fn body(&self) -> Value {
        let p = &self.0;
        json!({
            "error": {
                "type": p.error_type,
                "message": p.message,
                "details": p.details,
                "extra_info": p.extra_info,
            },
            "node_errors": p.node_errors,
        })
    }
}

/// An accepted `POST /prompt`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPrompt {
    /// The prompt after ComfyUI's in-place conversions (INT/FLOAT/STRING/BOOLEAN values
    /// converted, `{"__value__": v}` unwrapped).
    pub prompt: Value,
    /// Output node ids that passed validation, sorted.
    pub outputs_to_execute: Vec<String>,
    /// Errors of outputs that were dropped (ComfyUI still answers 200 with these).
    pub node_errors: Map<String, Value>,
    /// `client_id` when it is a string: the socket that receives execution messages.
    pub client_id: Option<String>,
    /// `extra_data` with `client_id` merged in and sensitive keys removed. ComfyUI also adds
    /// `create_time` (epoch ms) at queue time: see [`ValidPrompt::stamp_create_time`].
    pub extra_data: Map<String, Value>,
    /// The keys removed from `extra_data` ([`crate::sensitive::SENSITIVE_EXTRA_DATA_KEYS`]).
    pub sensitive: Map<String, Value>,
    /// `float(body["number"])` when given.
    pub number: Option<f64>,
    /// `bool(body["front"])`; only matters when `number` is absent.
    pub front: bool,
    /// `str(body["prompt_id"])` when given (the server picks a uuid4 otherwise).
    pub prompt_id: Option<String>,
}

impl ValidPrompt {
    /// The queue priority: the given `number` (a float, as ComfyUI makes it), else the
    /// server counter, negated when `front` is truthy. The caller increments its counter
    /// whenever [`uses_server_counter`] is true, even for rejected prompts.
    pub fn priority(&self, counter: i64) -> Number {
        match self.number {
            Some(n) => Number::from_f64(n).unwrap_or_else(|| Number::from(0)),
            None if self.front => Number::from(-counter),
            None => Number::from(counter),
        }
    }

    /// Adds `extra_data.create_time` as ComfyUI does when it queues the prompt.
    pub fn stamp_create_time(&mut self, epoch_ms: u64) {
        self.extra_data
            .insert("create_time".into(), Value::from(epoch_ms));
    }

    /// The 200 body: `{"prompt_id", "number", "node_errors"}`.
    pub fn response(&self, prompt_id: &str, number: &Number) -> Value {
        json!({"prompt_id": prompt_id, "number": number, "node_errors": self.node_errors})
    }
}

/// True when the body has no `number`, i.e. ComfyUI takes (and increments) its counter.
/// ComfyUI increments before validating, so this holds for rejected prompts too.
pub fn uses_server_counter(body: &Value) -> bool {
    obj_get(body, "number").is_none()
}

/// Validates a full `POST /prompt` body against `info`.
///
/// File-loading inputs (LoadImage, LoadVideo, ...) are checked against the choice lists in
/// `info`, so pass a participant view ([`crate::object_info::participant_view`]), or use
/// [`validate_prompt_with_files`], which does the same without building one.
pub fn validate_prompt(body: &Value, info: &ObjectInfo) -> Result<ValidPrompt, PromptError> {
    run(body, info, None)
}

/// [`validate_prompt`] against `info` as `files`' owner sees it: equivalent to validating
/// against `participant_view(info, files)`, without cloning the document.
pub fn validate_prompt_with_files(
    body: &Value,
    info: &ObjectInfo,
    files: &UserFiles,
) -> Result<ValidPrompt, PromptError> {
    run(body, info, Some(files))
}

fn invalid_prompt(message: &str, details: String) -> PromptError {
    PromptError::new("invalid_prompt", message, details)
}

fn run(
    body: &Value,
    info: &ObjectInfo,
    files: Option<&UserFiles>,
) -> Result<ValidPrompt, PromptError> {
    let no_prompt = || PromptError::new("no_prompt", "No prompt provided", "No prompt provided");
    let Some(body) = body.as_object() else {
        return Err(no_prompt());
    };
    let number = match body.get("number") {
        None => None,
        Some(v) => match py_float(v) {
            Ok(n) if n.is_finite() => Some(n),
            Ok(n) => {
                return Err(invalid_prompt(
                    "Invalid prompt number",
                    format!("number must be finite, got {}", crate::py::float_repr(n)),
                ));
            }
            Err(e) => return Err(invalid_prompt("Invalid prompt number", e.message)),
        },
    };
    let front = body.get("front").is_some_and(truthy);
    let Some(prompt) = body.get("prompt") else {
        return Err(no_prompt());
    };
    let prompt_id = body.get("prompt_id").map(py_str);
    let partial = body
        .get("partial_execution_targets")
        .filter(|v| !v.is_null());

    let mut prompt = prompt.clone();
    let (outputs_to_execute, node_errors) = validate_graph(&mut prompt, partial, info, files)?;

    let mut extra = match body.get("extra_data") {
        None => Value::Object(Map::new()),
        Some(Value::Object(m)) => Value::Object(m.clone()),
        Some(other) => {
            return Err(invalid_prompt(
                "Invalid extra_data",
                format!("extra_data must be an object, not {}", type_name(other)),
            ));
        }
    };
    let client = body.get("client_id");
    if let (Some(c), Value::Object(m)) = (client, &mut extra) {
        m.insert("client_id".into(), c.clone());
    }
    let sensitive = split_sensitive(&mut extra);
    let Value::Object(extra_data) = extra else {
        unreachable!("extra is built as an object above")
    };
    Ok(ValidPrompt {
        prompt,
        outputs_to_execute,
        node_errors,
        client_id: client.and_then(Value::as_str).map(str::to_owned),
        extra_data,
        sensitive,
        number,
        front,
        prompt_id,
    })
}

fn error(
    kind: &str,
    message: impl Into<String>,
    details: impl Into<String>,
    extra_info: Value,
) -> Value {
    json!({"type": kind, "message": message.into(), "details": details.into(), "extra_info": extra_info})
}

/// Where the validated graph stands: ComfyUI's `validated` dict, in insertion order.
#[derive(Default)]
struct Validated {
    entries: Vec<(String, NodeResult)>,
    index: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
struct NodeResult {
    valid: bool,
    errors: Vec<Value>,
}

impl Validated {
    fn get(&self, id: &str) -> Option<&NodeResult> {
        self.index.get(id).map(|&i| &self.entries[i].1)
    }
    /// Like a Python dict assignment: an existing key keeps its position.
    fn set(&mut self, id: &str, result: NodeResult) {
        match self.index.get(id) {
            Some(&i) => self.entries[i].1 = result,
            None => {
                self.index.insert(id.to_owned(), self.entries.len());
                self.entries.push((id.to_owned(), result));
            }
        }
    }
}

/// Classes with a custom `VALIDATE_INPUTS`/`validate_inputs` over one file argument.
struct FileValidator {
    arg: &'static str,
    qualname: &'static str,
    message: &'static str,
}

fn file_validator(class: &str) -> Option<FileValidator> {
    let (arg, qualname, message) = match class {
        "LoadImage" => ("image", "LoadImage.VALIDATE_INPUTS", "Invalid image file: "),
        "LoadImageMask" => (
            "image",
            "LoadImageMask.VALIDATE_INPUTS",
            "Invalid image file: ",
        ),
        // Both inherit LoadImage's validator.
        "LoadImageOutput" | "WebcamCapture" => {
            ("image", "LoadImage.VALIDATE_INPUTS", "Invalid image file: ")
        }
        "LoadAudio" => ("audio", "LoadAudio.validate_inputs", "Invalid audio file: "),
        "LoadVideo" => ("file", "LoadVideo.validate_inputs", "Invalid video file: "),
        "LoadLatent" => (
            "latent",
            "LoadLatent.VALIDATE_INPUTS",
            "Invalid latent file: ",
        ),
        _ => return None,
    };
    Some(FileValidator {
        arg,
        qualname,
        message,
    })
}

/// `folder_paths.exists_annotated_filepath`, restricted to the participant's own files: an
/// `[output]` annotation names one of their outputs (ComfyUI cuts the 9 characters
/// ` [output]` off), `[temp]` is refused, anything else names one of `allowed`.
fn file_allowed(name: &str, allowed: &[String], outputs: &[String]) -> bool {
    if name.ends_with("[output]") {
        let n = name.chars().count();
        let base: String = name.chars().take(n.saturating_sub(9)).collect();
        return outputs.contains(&base);
    }
    if name.ends_with("[temp]") {
        return false;
    }
    let base: Cow<str> = if name.ends_with("[input]") {
        let n = name.chars().count();
        Cow::Owned(name.chars().take(n.saturating_sub(8)).collect())
    } else {
        Cow::Borrowed(name)
    };
    allowed.iter().any(|a| a == base.as_ref())
}

/// `comfy_execution.graph_utils.is_link`.
fn is_link(v: &Value) -> bool {
    match v.as_array().map(Vec::as_slice) {
        Some([a, b]) => a.is_string() && (b.is_number() || b.is_boolean()),
        _ => false,
    }
}

/// `comfy_execution.validation.validate_node_input` (non-strict), with "*" as any type.
fn types_match(received: &Value, input: &Value) -> bool {
    if py_eq(received, input) {
        return true;
    }
    const ANY: &str = "*";
    const MATCH: &str = "COMFY_MATCHTYPE_V3";
    let is = |v: &Value, s: &str| v.as_str() == Some(s);
    if is(received, ANY) || is(input, ANY) || is(received, MATCH) || is(input, MATCH) {
        return true;
    }
    if received.is_array() && is(input, "COMBO") {
        return true;
    }
    let (Some(r), Some(i)) = (received.as_str(), input.as_str()) else {
        return false;
    };
    let rs: HashSet<&str> = r.split(',').map(str::trim).collect();
    let is_: HashSet<&str> = i.split(',').map(str::trim).collect();
    if rs.contains(ANY) || is_.contains(ANY) {
        return true;
    }
    !rs.is_disjoint(&is_)
}

struct Entry<'a> {
    name: String,
    required: bool,
    spec: Cow<'a, Value>,
}

/// `get_finalized_class_inputs` output: required then optional, in insertion order.
#[derive(Default)]
struct Expansion<'a> {
    entries: Vec<Entry<'a>>,
    index: HashMap<String, usize>,
    dynamic: bool,
}

impl<'a> Expansion<'a> {
    fn insert(&mut self, name: String, required: bool, spec: &'a Value) {
        if let Some(&i) = self.index.get(&name) {
            // Python dicts keep the first position; required/optional are separate dicts,
            // but a name never sits in both in practice, so the later category wins.
            self.entries[i].required = required;
            self.entries[i].spec = Cow::Borrowed(spec);
            return;
        }
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(Entry {
            name,
            required,
            spec: Cow::Borrowed(spec),
        });
    }

    fn ordered(self) -> (Vec<Entry<'a>>, bool) {
        let (mut req, opt): (Vec<_>, Vec<_>) = self.entries.into_iter().partition(|e| e.required);
        req.extend(opt);
        (req, self.dynamic)
    }
}

const DYNAMIC_TYPES: [&str; 3] = [
    "COMFY_AUTOGROW_V3",
    "COMFY_DYNAMICCOMBO_V3",
    "COMFY_DYNAMICSLOT_V3",
];

static EMPTY_OBJECT: std::sync::LazyLock<Value> =
    std::sync::LazyLock::new(|| Value::Object(Map::new()));

fn spec_type(spec: &Value) -> &Value {
    spec.as_array().and_then(|a| a.first()).unwrap_or(spec)
}

fn spec_extra(spec: &Value) -> &Value {
    static EMPTY: Value = Value::Null;
    spec.as_array().and_then(|a| a.get(1)).unwrap_or(&EMPTY)
}

/// `comfy_api.latest._io.parse_class_inputs`.
fn parse_class_inputs<'a>(
    out: &mut Expansion<'a>,
    live: &Value,
    dict: &'a Value,
    prefix: &[String],
) -> Result<(), PyExc> {
    let Some(dict) = dict.as_object() else {
        return Ok(());
    };
    for (category, inner) in dict {
        let required = match category.as_str() {
            "required" => true,
            "optional" => false,
            _ => continue,
        };
        let Some(inner) = inner.as_object() else {
            continue;
        };
        for (id, value) in inner {
            let io_type = spec_type(value).as_str().unwrap_or_default();
            if DYNAMIC_TYPES.contains(&io_type) {
                let mut new_prefix = prefix.to_vec();
                new_prefix.push(id.clone());
                expand_dynamic(out, live, value, io_type, required, &new_prefix)?;
            } else {
                let mut parts = prefix.to_vec();
                parts.push(id.clone());
                out.insert(parts.join("."), required, value);
                if !prefix.is_empty() {
                    out.dynamic = true;
                }
            }
        }
    }
    Ok(())
}

fn expand_dynamic<'a>(
    out: &mut Expansion<'a>,
    live: &Value,
    value: &'a Value,
    io_type: &str,
    required: bool,
    prefix: &[String],
) -> Result<(), PyExc> {
    let extra = spec_extra(value);
    let finalized = prefix.join(".");
    match io_type {
        "COMFY_AUTOGROW_V3" => {
            let Some(template) = obj_get(extra, "template") else {
                return Ok(());
            };
            let min = obj_get(template, "min")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize;
            let names: Vec<String> =
                if let Some(names) = obj_get(template, "names").and_then(Value::as_array) {
                    names.iter().map(py_str).collect()
                } else if let Some(p) = obj_get(template, "prefix") {
                    let max = obj_get(template, "max")
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        .min(100);
                    (0..max).map(|i| format!("{}{i}", py_str(p))).collect()
                } else {
                    return Ok(());
                };
            let mut template_input = None;
            if let Some(input) = obj_get(template, "input").and_then(Value::as_object) {
                for (cat, d) in input {
                    if let Some((_, first)) = d.as_object().and_then(|d| d.iter().next()) {
                        template_input = Some((first, cat == "required"));
                        break;
                    }
                }
            }
            let Some((template_input, template_required)) = template_input else {
                return Err(PyExc::new(
                    "Exception",
                    "template_input could not be determined from required or optional; this should never happen.",
                ));
            };
            for (i, name) in names.iter().enumerate() {
                let expected = format!("{finalized}.{name}");
                out.insert(
                    expected.clone(),
                    i < min && template_required,
                    template_input,
                );
                // Only for its exceptions: live slots keep the names inserted here, and both
                // the live and the empty case record a dynamic path.
                py_contains(live, &Value::String(expected))?;
            }
            out.dynamic = true;
        }
        "COMFY_DYNAMICCOMBO_V3" => {
            if py_contains(live, &Value::String(finalized.clone()))? {
                let key = py_getitem(live, &finalized)?;
                let options = obj_get(extra, "options").and_then(Value::as_array);
                let selected = options
                    .into_iter()
                    .flatten()
                    .find(|o| obj_get(o, "key").is_some_and(|k| py_eq(k, key)));
                if let Some(option) = selected {
                    if let Some(inputs) = obj_get(option, "inputs") {
                        parse_class_inputs(out, live, inputs, prefix)?;
                    }
                    out.insert(finalized, required, value);
                    out.dynamic = true;
                }
            }
        }
        _ => {
            if py_contains(live, &Value::String(finalized.clone()))? {
                if let Some(inputs) = obj_get(extra, "inputs") {
                    parse_class_inputs(out, live, inputs, prefix)?;
                }
                out.insert(finalized, required, value);
                out.dynamic = true;
            }
        }
    }
    Ok(())
}

struct Pending {
    input: String,
    config: Value,
    link: Value,
}

/// One `validate_inputs` call in progress.
struct Frame<'a> {
    id: String,
    class: &'a str,
    inputs: Vec<Entry<'a>>,
    dynamic: bool,
    pos: usize,
    errors: Vec<Value>,
    valid: bool,
    pending: Option<Pending>,
}

enum Step {
    Recurse(String),
    Done(NodeResult),
}

struct Ctx<'a, 'p> {
    info: &'a ObjectInfo,
    files: Option<&'a UserFiles>,
    file_lists: HashMap<FileKind, Vec<String>>,
    prompt: &'p mut Map<String, Value>,
    validated: Validated,
}

impl<'a> Ctx<'a, '_> {
    fn files_for(&mut self, kind: FileKind) -> Option<&[String]> {
        let files = self.files?;
        Some(
            self.file_lists
                .entry(kind)
                .or_insert_with(|| files.for_kind(kind)),
        )
    }

    fn class_of(&self, id: &str) -> &str {
        self.prompt
            .get(id)
            .and_then(|n| obj_get(n, "class_type"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    fn node_inputs(&self, id: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.prompt
            .get(id)
            .and_then(|n| obj_get(n, "inputs"))
            .unwrap_or(&NULL)
    }

    fn node_inputs_mut(&mut self, id: &str) -> Option<&mut Map<String, Value>> {
        self.prompt.get_mut(id)?.get_mut("inputs")?.as_object_mut()
    }

    fn new_frame(&mut self, id: &str) -> Result<Frame<'a>, PyExc> {
        let class_type = self.class_of(id).to_owned();
        let info = self.info;
        let (class, node_info) = info
            .as_map()
            .get_key_value(&class_type)
            .ok_or_else(|| PyExc::key_error(&Value::String(class_type.clone())))?;
        let node = self
            .prompt
            .get(id)
            .ok_or_else(|| PyExc::key_error(&Value::String(id.into())))?;
        let live = py_getitem(node, "inputs")?;
        let mut expansion = Expansion::default();
        let input = obj_get(node_info, "input");
        if info.is_v3(class) {
            for cat in ["required", "optional"] {
                if let Some(section) = input.and_then(|i| obj_get(i, cat)) {
                    expand_section(&mut expansion, live, section, cat == "required")?;
                }
            }
        } else {
            for (cat, required) in [("required", true), ("optional", false)] {
                if let Some(section) = input
                    .and_then(|i| obj_get(i, cat))
                    .and_then(Value::as_object)
                {
                    for (name, spec) in section {
                        if required || !expansion.index.contains_key(name) {
                            expansion.insert(name.clone(), required, spec);
                        }
                    }
                }
            }
        }
        let (mut inputs, dynamic) = expansion.ordered();
        if self.files.is_some() {
            for entry in &mut inputs {
                let options = spec_extra(&entry.spec).as_object();
                if let Some(kind) = upload_kind(class, &entry.name, options) {
                    let list = self.files_for(kind).unwrap_or_default().to_vec();
                    if let Some(patched) = patch_spec(&entry.spec, &list) {
                        entry.spec = Cow::Owned(patched);
                    }
                }
            }
        }
        Ok(Frame {
            id: id.to_owned(),
            class,
            inputs,
            dynamic,
            pos: 0,
            errors: Vec::new(),
            valid: true,
            pending: None,
        })
    }
}

/// One `{"required": {...}}` / `{"optional": {...}}` section of a v3 node.
fn expand_section<'a>(
    out: &mut Expansion<'a>,
    live: &Value,
    section: &'a Value,
    required: bool,
) -> Result<(), PyExc> {
    let Some(section) = section.as_object() else {
        return Ok(());
    };
    for (id, value) in section {
        let io_type = spec_type(value).as_str().unwrap_or_default();
        if DYNAMIC_TYPES.contains(&io_type) {
            expand_dynamic(
                out,
                live,
                value,
                io_type,
                required,
                std::slice::from_ref(id),
            )?;
        } else {
            out.insert(id.clone(), required, value);
        }
    }
    Ok(())
}

fn step<'a>(frame: &mut Frame<'a>, ctx: &mut Ctx<'a, '_>) -> Result<Step, PyExc> {
    let validator = file_validator(frame.class);
    while frame.pos < frame.inputs.len() {
        let i = frame.pos;
        frame.pos += 1;
        let entry = &frame.inputs[i];
        let x = entry.name.clone();
        let required = entry.required;
        let input_type = spec_type(&entry.spec);
        let extra = match spec_extra(&entry.spec) {
            Value::Null => &*EMPTY_OBJECT,
            other => other,
        };
        // `input_config`, built only when an error or a pending link needs it.
        let config = || Value::Array(vec![input_type.clone(), extra.clone()]);
        let live = ctx.node_inputs(&frame.id);
        if !py_contains(live, &Value::String(x.clone()))? {
            if required {
                let details = if frame.dynamic {
                    x.rsplit('.').next().unwrap_or(&x).to_owned()
                } else {
                    x.clone()
                };
                frame.errors.push(error(
                    "required_input_missing",
                    "Required input is missing",
                    details,
                    json!({"input_name": x}),
                ));
            }
            continue;
        }
        let val = py_getitem(live, &x)?.clone();
        if let Value::Array(link) = &val {
            if link.len() != 2 {
                frame.errors.push(error(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    x.clone(),
                    json!({"input_name": x, "input_config": config(), "received_value": val}),
                ));
                continue;
            }
            let o_id = match &link[0] {
                Value::String(s) if ctx.prompt.contains_key(s) => s.clone(),
                Value::Array(_) | Value::Object(_) => {
                    return Err(PyExc::type_error(format!(
                        "unhashable type: '{}'",
                        type_name(&link[0])
                    )));
                }
                other => return Err(PyExc::key_error(other)),
            };
            let o_class = ctx.class_of(&o_id).to_owned();
            let returns = ctx.info.raw_output_types(&o_class);
            let seq = if ctx.info.is_v3(&o_class) {
                "list"
            } else {
                "tuple"
            };
            let slot = py_index(seq, returns.len(), &link[1])?;
            let received = returns[slot].clone();
            if !types_match(&received, input_type) {
                let details = format!(
                    "{x}, received_type({}) mismatch input_type({})",
                    py_str(&received),
                    py_str(input_type)
                );
                frame.errors.push(error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    details,
                    json!({"input_name": x, "input_config": config(), "received_type": received, "linked_node": val}),
                ));
                continue;
            }
            if let Some(done) = ctx.validated.get(&o_id) {
                if !done.valid {
                    frame.valid = false;
                }
                continue;
            }
            frame.pending = Some(Pending {
                input: x,
                config: config(),
                link: val,
            });
            return Ok(Step::Recurse(o_id));
        }

        let mut val = val;
        if let Some(inner) = obj_get(&val, "__value__") {
            val = inner.clone();
            if let Some(m) = ctx.node_inputs_mut(&frame.id) {
                m.insert(x.clone(), val.clone());
            }
        }
        let type_str = input_type.as_str().unwrap_or_default();
        let converted = match type_str {
            "INT" => py_int(&val).map(PyVal::Int),
            "FLOAT" => py_float(&val).map(PyVal::Float),
            "STRING" => Ok(PyVal::Json(Value::String(py_str(&val)))),
            "BOOLEAN" => Ok(PyVal::Json(Value::Bool(truthy(&val)))),
            _ => Ok(PyVal::Json(val.clone())),
        };
        let converted = match converted {
            Ok(c) => c,
            Err(ex) => {
                frame.errors.push(error(
                    "invalid_input_type",
                    format!("Failed to convert an input value to a {type_str} value"),
                    format!("{x}, {}, {}", py_str(&val), ex.message),
                    json!({"input_name": x, "input_config": config(), "received_value": val, "exception_message": ex.message}),
                ));
                continue;
            }
        };
        if matches!(type_str, "INT" | "FLOAT" | "STRING" | "BOOLEAN") {
            let stored = converted.stored(&val);
            if let Some(m) = ctx.node_inputs_mut(&frame.id) {
                m.insert(x.clone(), stored);
            }
        }
        if validator.as_ref().is_some_and(|v| v.arg == x) {
            continue;
        }
        let mut out_of_range = false;
        for (key, less, kind, word) in [
            ("min", true, "value_smaller_than_min", "smaller than min"),
            ("max", false, "value_bigger_than_max", "bigger than max"),
        ] {
            let Some(bound) = obj_get(extra, key) else {
                continue;
            };
            if converted.compare(bound, less)? {
                frame.errors.push(error(
                    kind,
                    format!("Value {} {word} of {}", converted.py_str(), py_str(bound)),
                    x.clone(),
                    json!({"input_name": x, "input_config": config(), "received_value": converted.to_json()}),
                ));
                out_of_range = true;
                break;
            }
        }
        if out_of_range {
            continue;
        }
        let options: Option<Cow<Value>> = match input_type {
            Value::Array(_) => Some(Cow::Borrowed(input_type)),
            Value::String(t) if t == "COMBO" => {
                Some(match extra.as_object().and_then(|m| m.get("options")) {
                    Some(o) => Cow::Borrowed(o),
                    None => Cow::Owned(Value::Array(Vec::new())),
                })
            }
            _ => None,
        };
        if let Some(options) = options
            && !py_contains(&options, &val)?
        {
            let len = match options.as_ref() {
                Value::Array(a) => a.len(),
                Value::Object(m) => m.len(),
                Value::String(s) => s.chars().count(),
                _ => 0,
            };
            let (list_info, config) = if len > 20 {
                (format!("(list of length {len})"), Value::Null)
            } else {
                (py_repr(&options), config())
            };
            frame.errors.push(error(
                "value_not_in_list",
                "Value not in list",
                format!("{x}: '{}' not in {list_info}", py_str(&val)),
                json!({"input_name": x, "input_config": config, "received_value": val}),
            ));
        }
    }

    if let Some(v) = validator {
        let arg_value = ctx
            .node_inputs(&frame.id)
            .as_object()
            .and_then(|m| m.get(v.arg))
            .cloned();
        let Some(arg_value) = arg_value else {
            return Err(PyExc::type_error(format!(
                "{}() missing 1 required positional argument: '{}'",
                v.qualname, v.arg
            )));
        };
        let arg_value = if is_link(&arg_value) {
            Value::Null
        } else {
            arg_value
        };
        let Some(name) = arg_value.as_str() else {
            return Err(PyExc::new(
                "AttributeError",
                format!(
                    "'{}' object has no attribute 'endswith'",
                    type_name(&arg_value)
                ),
            ));
        };
        let allowed: Vec<String> = if ctx.files.is_some() {
            let kind = upload_kind(frame.class, v.arg, None).unwrap_or(FileKind::Any);
            ctx.files_for(kind).unwrap_or_default().to_vec()
        } else {
            frame
                .inputs
                .iter()
                .find(|e| e.name == v.arg)
                .and_then(|e| {
                    let spec = e.spec.as_ref();
                    match spec_type(spec) {
                        Value::Array(c) => Some(c.clone()),
                        _ => obj_get(spec_extra(spec), "options")
                            .and_then(Value::as_array)
                            .cloned(),
                    }
                })
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        };
        let outputs = ctx.files.map(|f| f.outputs.as_slice()).unwrap_or_default();
        if !file_allowed(name, &allowed, outputs) {
            frame.errors.push(error(
                "custom_validation_failed",
                "Custom validation failed for node",
                format!("{} - {}{}", v.arg, v.message, name),
                json!({"input_name": v.arg}),
            ));
        }
    }
    Ok(Step::Done(NodeResult {
        valid: frame.valid && frame.errors.is_empty(),
        errors: std::mem::take(&mut frame.errors),
    }))
}

fn exception_inner(ex: &PyExc, p: Option<Pending>) -> Value {
    let (input, config, link) = match p {
        Some(p) => (Value::String(p.input), p.config, p.link),
        None => (Value::Null, Value::Null, Value::Null),
    };
    error(
        "exception_during_inner_validation",
        "Exception when validating inner node",
        ex.message.clone(),
        json!({
            "input_name": input,
            "input_config": config,
            "exception_message": ex.message,
            "exception_type": ex.kind,
            "traceback": [],
            "linked_node": link,
        }),
    )
}

/// `validate_inputs(prompt, root)`, iteratively: deep graphs cannot overflow the stack.
fn validate_node(ctx: &mut Ctx<'_, '_>, root: &str) -> Result<NodeResult, PyExc> {
    if let Some(done) = ctx.validated.get(root) {
        return Ok(done.clone());
    }
    let mut stack = vec![ctx.new_frame(root)?];
    let mut on_stack: HashSet<String> = HashSet::from([root.to_owned()]);
    loop {
        let top = stack
            .last_mut()
            .expect("stack is never empty inside the loop");
        match step(top, ctx) {
            Ok(Step::Recurse(child)) => {
                if on_stack.contains(&child) {
                    mark_cycle(ctx, &stack, &child);
                    let top = stack.last_mut().expect("non-empty");
                    top.valid = false;
                    top.pending = None;
                    continue;
                }
                match ctx.new_frame(&child) {
                    Ok(frame) => {
                        on_stack.insert(child);
                        stack.push(frame);
                    }
                    Err(ex) => {
                        let top = stack.last_mut().expect("non-empty");
                        let reason = exception_inner(&ex, top.pending.take());
                        top.valid = false;
                        ctx.validated.set(
                            &child,
                            NodeResult {
                                valid: false,
                                errors: vec![reason],
                            },
                        );
                    }
                }
            }
            Ok(Step::Done(result)) => {
                let frame = stack.pop().expect("non-empty");
                on_stack.remove(&frame.id);
                // A cycle may already have put an error on this node: join it.
                let merged = match ctx.validated.get(&frame.id) {
                    Some(prev) => {
                        let mut errors = prev.errors.clone();
                        for e in result.errors {
                            if !errors.contains(&e) {
                                errors.push(e);
                            }
                        }
                        NodeResult {
                            valid: prev.valid && result.valid,
                            errors,
                        }
                    }
                    None => result,
                };
                ctx.validated.set(&frame.id, merged.clone());
                match stack.last_mut() {
                    None => return Ok(merged),
                    Some(parent) => {
                        if !merged.valid {
                            parent.valid = false;
                        }
                        parent.pending = None;
                    }
                }
            }
            Err(ex) => {
                let frame = stack.pop().expect("non-empty");
                on_stack.remove(&frame.id);
                match stack.last_mut() {
                    None => return Err(ex),
                    Some(parent) => {
                        let reason = exception_inner(&ex, parent.pending.take());
                        parent.valid = false;
                        ctx.validated.set(
                            &frame.id,
                            NodeResult {
                                valid: false,
                                errors: vec![reason],
                            },
                        );
                    }
                }
            }
        }
    }
}

fn mark_cycle(ctx: &mut Ctx<'_, '_>, stack: &[Frame<'_>], child: &str) {
    let start = stack.iter().position(|f| f.id == child).unwrap_or(0);
    let cycle_nodes: Vec<String> = stack[start..].iter().map(|f| f.id.clone()).collect();
    let path: Vec<String> = cycle_nodes
        .iter()
        .chain(std::iter::once(&child.to_owned()))
        .map(|id| format!("{id} ({})", ctx.class_of(id)))
        .collect();
    let details = path.join(" -> ");
    for id in &cycle_nodes {
        let reason = error(
            "dependency_cycle",
            "Dependency cycle detected",
            details.clone(),
            json!({"node_id": id, "cycle_nodes": cycle_nodes}),
        );
        ctx.validated.set(
            id,
            NodeResult {
                valid: false,
                errors: vec![reason],
            },
        );
    }
}

/// `execution.validate_prompt`: the output ids to run, and the errors of dropped outputs.
fn validate_graph(
    prompt: &mut Value,
    partial: Option<&Value>,
    info: &ObjectInfo,
    files: Option<&UserFiles>,
) -> Result<(Vec<String>, Map<String, Value>), PromptError> {
    let no_outputs = || PromptError::new("prompt_no_outputs", "Prompt has no outputs", "");
    let prompt = match prompt {
        Value::Object(m) => m,
        // Iterating an empty list/str finds no outputs, exactly like ComfyUI.
        Value::Array(a) if a.is_empty() => return Err(no_outputs()),
        Value::String(s) if s.is_empty() => return Err(no_outputs()),
        other => {
            return Err(invalid_prompt(
                "Cannot execute because the prompt is not an object of node id to node.",
                format!("prompt is {}", type_name(other)),
            ));
        }
    };

    let mut outputs = Vec::new();
    for (x, node) in prompt.iter() {
        let Some(class_type) = obj_get(node, "class_type") else {
            return Err(invalid_prompt(
                "Cannot execute because a node is missing the class_type property.",
                format!("Node ID '#{x}'"),
            ));
        };
        let known = class_type.as_str().filter(|c| info.get(c).is_some());
        let Some(class) = known else {
            return Err(invalid_prompt(
                &format!(
                    "Cannot execute because node {} does not exist.",
                    py_str(class_type)
                ),
                format!("Node ID '#{x}'"),
            ));
        };
        if info.is_output_node(class) {
            let selected = match partial {
                None => true,
                Some(targets) => py_contains(targets, &Value::String(x.clone())).map_err(|e| {
                    invalid_prompt(
                        "Invalid partial_execution_targets",
                        format!(
                            "partial_execution_targets must be a list of node ids: {}",
                            e.message
                        ),
                    )
                })?,
            };
            if selected {
                outputs.push(x.clone());
            }
        }
    }
    if outputs.is_empty() {
        return Err(no_outputs());
    }
    outputs.sort();

    let mut ctx = Ctx {
        info,
        files,
        file_lists: HashMap::new(),
        prompt,
        validated: Validated::default(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<Value>)> = Vec::new();
    let mut node_errors = Map::new();
    for o in outputs {
        let (valid, reasons) = match validate_node(&mut ctx, &o) {
            Ok(r) => (r.valid, r.errors),
            Err(ex) => {
                let reasons = vec![error(
                    "exception_during_validation",
                    "Exception when validating node",
                    ex.message.clone(),
                    json!({"exception_type": ex.kind, "traceback": []}),
                )];
                ctx.validated.set(
                    &o,
                    NodeResult {
                        valid: false,
                        errors: reasons.clone(),
                    },
                );
                (false, reasons)
            }
        };
        if valid {
            good.push(o);
            continue;
        }
        // Every failing node with reasons gets this output appended, related or not
        // (ComfyUI walks the whole `validated` dict here).
        for (node_id, result) in &ctx.validated.entries {
            if result.valid || result.errors.is_empty() {
                continue;
            }
            let class_type = ctx.class_of(node_id).to_owned();
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                json!({"errors": result.errors, "dependent_outputs": [], "class_type": class_type})
            });
            if let Some(deps) = entry
                .get_mut("dependent_outputs")
                .and_then(Value::as_array_mut)
            {
                deps.push(Value::String(o.clone()));
            }
        }
        failed.push((o, reasons));
    }

    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flat_map(|(_, reasons)| reasons)
            .map(|r| {
                format!(
                    "{}: {}",
                    obj_get(r, "message").map(py_str).unwrap_or_default(),
                    obj_get(r, "details").map(py_str).unwrap_or_default()
                )
            })
            .collect();
        let mut err = PromptError::new(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            details.join("\n"),
        );
        err.0.node_errors = node_errors;
        return Err(err);
    }
    Ok((good, node_errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_matching_follows_comfyui() {
        assert!(types_match(&json!("IMAGE"), &json!("IMAGE")));
        assert!(types_match(&json!("IMAGE"), &json!("IMAGE,MASK")));
        assert!(types_match(&json!("MASK, LATENT"), &json!("IMAGE,MASK")));
        assert!(types_match(&json!("LATENT"), &json!("*")));
        assert!(types_match(&json!("*"), &json!("IMAGE")));
        assert!(types_match(&json!("INT,*"), &json!("IMAGE")));
        assert!(types_match(&json!("COMFY_MATCHTYPE_V3"), &json!("IMAGE")));
        assert!(types_match(&json!(["a", "b"]), &json!("COMBO")));
        assert!(types_match(&json!(["a"]), &json!(["a"])));
        assert!(!types_match(&json!(["a"]), &json!(["b"])));
        assert!(!types_match(&json!("LATENT"), &json!("IMAGE")));
        assert!(!types_match(&json!("STRING"), &json!(["a"])));
    }

    #[test]
    fn annotated_names_resolve_to_input_files_only() {
        let allowed = vec!["up.png".to_owned(), "sub/x.png".to_owned()];
        let outputs = ["ComfyUI_00001_.png".to_string(), "video/c.mp4".to_string()];
        assert!(file_allowed("up.png", &allowed, &[]));
        assert!(file_allowed("up.png [input]", &allowed, &[]));
        assert!(file_allowed("sub/x.png", &allowed, &[]));
        assert!(!file_allowed("up.png [output]", &allowed, &outputs));
        assert!(!file_allowed("up.png [temp]", &allowed, &[]));
        assert!(!file_allowed("../up.png", &allowed, &[]));
        assert!(!file_allowed("é[input]", &allowed, &[]));
        // A result reused as an input: only the participant's own outputs.
        assert!(file_allowed(
            "ComfyUI_00001_.png [output]",
            &allowed,
            &outputs
        ));
        assert!(file_allowed("video/c.mp4 [output]", &allowed, &outputs));
        assert!(!file_allowed("ComfyUI_00001_.png [output]", &allowed, &[]));
        assert!(!file_allowed("../video/c.mp4 [output]", &allowed, &outputs));
        assert!(!file_allowed("ComfyUI_00001_.png", &allowed, &outputs));
    }
}
