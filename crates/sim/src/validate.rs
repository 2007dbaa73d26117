//! `POST /prompt` validation, following ComfyUI's `execution.validate_prompt`/`validate_inputs`
//! (error types, messages, `node_errors` layout, and the in-place conversion of widget values).

use serde_json::{Map, Value, json};
use std::collections::HashSet;

use crate::catalog::{Catalog, InputCategory};
use crate::pyjson::{py_repr, py_str, repr_str};

/// A Python exception raised during validation (turned into `exception_during_*` errors).
#[derive(Debug, Clone)]
struct PyExc {
    ty: &'static str,
    msg: String,
}

impl PyExc {
    fn new(ty: &'static str, msg: impl Into<String>) -> Self {
        Self {
            ty,
            msg: msg.into(),
        }
    }
}

/// A prompt that passed: the output nodes to execute and the (possibly non-empty) `node_errors`
/// of outputs that were dropped.
#[derive(Debug)]
pub struct Accepted {
    pub outputs: Vec<String>,
    pub node_errors: Value,
}

/// A prompt that failed: body of the 400 answer.
#[derive(Debug)]
pub struct Rejected {
    pub error: Value,
    pub node_errors: Value,
}

impl Rejected {
    pub fn body(&self) -> Value {
        json!({"error": self.error, "node_errors": self.node_errors})
    }
}

fn top_error(ty: &str, message: &str, details: &str) -> Value {
    json!({"type": ty, "message": message, "details": details, "extra_info": {}})
}

pub fn no_prompt() -> Rejected {
    Rejected {
        error: top_error("no_prompt", "No prompt provided", "No prompt provided"),
        node_errors: json!({}),
    }
}

/// Results per node in insertion order (Python dict semantics: re-setting keeps the position).
#[derive(Default)]
struct Validated(Vec<(String, bool, Vec<Value>)>);

impl Validated {
    fn get(&self, id: &str) -> Option<(bool, &Vec<Value>)> {
        self.0
            .iter()
            .find(|(k, _, _)| k == id)
            .map(|(_, ok, r)| (*ok, r))
    }
    fn set(&mut self, id: &str, ok: bool, reasons: Vec<Value>) {
        match self.0.iter_mut().find(|(k, _, _)| k == id) {
            Some(slot) => {
                slot.1 = ok;
                slot.2 = reasons;
            }
            None => self.0.push((id.to_string(), ok, reasons)),
        }
    }
}

struct Ctx<'a> {
    cat: &'a Catalog,
    image_exists: &'a dyn Fn(&str) -> bool,
    validated: Validated,
    in_progress: HashSet<String>,
}

fn sim_traceback(what: &str) -> Value {
    json!([format!(
        "  File \"comfyume-sim\", in {what} (simulated server; no Python traceback)\n"
    )])
}

/// Validate `prompt` in place (widget values are converted like ComfyUI does before queueing).
pub fn validate_prompt(
    cat: &Catalog,
    prompt: &mut Map<String, Value>,
    partial: Option<&[String]>,
    image_exists: &dyn Fn(&str) -> bool,
) -> Result<Accepted, Box<Rejected>> {
    let mut outputs = Vec::new();
    for (id, node) in prompt.iter() {
        let Some(class) = node.as_object().and_then(|n| n.get("class_type")) else {
            return Err(Box::new(Rejected {
                error: top_error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: json!({}),
            }));
        };
        let class_name = class.as_str().unwrap_or_default();
        if class.as_str().is_none() || !cat.has(class_name) {
            return Err(Box::new(Rejected {
                error: top_error(
                    "invalid_prompt",
                    &format!(
                        "Cannot execute because node {} does not exist.",
                        py_str(class)
                    ),
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: json!({}),
            }));
        }
        if cat.is_output(class_name) && partial.is_none_or(|p| p.iter().any(|t| t == id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Err(Box::new(Rejected {
            error: top_error("prompt_no_outputs", "Prompt has no outputs", ""),
            node_errors: json!({}),
        }));
    }

    let mut ctx = Ctx {
        cat,
        image_exists,
        validated: Validated::default(),
        in_progress: HashSet::new(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<Value>)> = Vec::new();
    let mut node_errors = Map::new();
    for o in &outputs {
        let (valid, reasons) = match validate_inputs(&mut ctx, prompt, o) {
            Ok(v) => (
                v,
                ctx.validated
                    .get(o)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_default(),
            ),
            Err(ex) => {
                let reasons = vec![json!({
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": ex.msg,
                    "extra_info": {"exception_type": ex.ty, "traceback": sim_traceback("validate_prompt")},
                })];
                ctx.validated.set(o, false, reasons.clone());
                (false, reasons)
            }
        };
        if valid {
            good.push(o.clone());
            continue;
        }
        failed.push((o.clone(), reasons));
        for (node_id, ok, reasons) in &ctx.validated.0 {
            // Downstream nodes of a failed node are invalid without reasons; ComfyUI leaves them out.
            if *ok || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(node_id.clone()).or_insert_with(|| {
                json!({
                    "errors": reasons,
                    "dependent_outputs": [],
                    "class_type": prompt.get(node_id).and_then(|n| n.get("class_type")).cloned().unwrap_or(Value::Null),
                })
            });
            if let Some(deps) = entry
                .get_mut("dependent_outputs")
                .and_then(Value::as_array_mut)
            {
                deps.push(Value::String(o.clone()));
            }
        }
    }
    if good.is_empty() {
        let lines: Vec<String> = failed
            .iter()
            .flat_map(|(_, reasons)| reasons.iter())
            .map(|r| {
                format!(
                    "{}: {}",
                    r["message"].as_str().unwrap_or_default(),
                    r["details"].as_str().unwrap_or_default()
                )
            })
            .collect();
        return Err(Box::new(Rejected {
            error: top_error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                &lines.join("\n"),
            ),
            node_errors: Value::Object(node_errors),
        }));
    }
    Ok(Accepted {
        outputs: good,
        node_errors: Value::Object(node_errors),
    })
}

fn input_error(ty: &str, message: String, details: String, extra: Value) -> Value {
    json!({"type": ty, "message": message, "details": details, "extra_info": extra})
}

/// ComfyUI's `validate_node_input`, loosened where the simulator cannot know better: combo inputs
/// accept any link and `*` matches everything.
fn types_match(received: &str, input_type: &Value) -> bool {
    let Some(input) = input_type.as_str() else {
        return true;
    };
    if input == "COMBO" || received == "*" || input == "*" || received == input {
        return true;
    }
    let r: HashSet<&str> = received.split(',').map(str::trim).collect();
    input.split(',').map(str::trim).any(|t| r.contains(t))
}

fn py_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn validate_inputs(
    ctx: &mut Ctx<'_>,
    prompt: &mut Map<String, Value>,
    id: &str,
) -> Result<bool, PyExc> {
    if let Some((ok, _)) = ctx.validated.get(id) {
        return Ok(ok);
    }
    if !ctx.in_progress.insert(id.to_string()) {
        return Err(PyExc::new(
            "RecursionError",
            "maximum recursion depth exceeded",
        ));
    }
    let result = validate_node(ctx, prompt, id);
    ctx.in_progress.remove(id);
    let (ok, errors) = result?;
    ctx.validated.set(id, ok, errors);
    Ok(ok)
}

fn validate_node(
    ctx: &mut Ctx<'_>,
    prompt: &mut Map<String, Value>,
    id: &str,
) -> Result<(bool, Vec<Value>), PyExc> {
    let node = prompt
        .get(id)
        .ok_or_else(|| PyExc::new("KeyError", repr_str(id)))?;
    let class = node
        .get("class_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut inputs = match node.get("inputs") {
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            return Err(PyExc::new(
                "TypeError",
                format!("argument of type '{}' is not iterable", py_type_name(other)),
            ));
        }
        None => return Err(PyExc::new("KeyError", "'inputs'")),
    };
    let lenient = !ctx.cat.builtin;
    let custom_validated = ctx.cat.builtin && class == "LoadImage";
    let mut errors = Vec::new();
    let mut valid = true;

    for (x, category, spec) in ctx.cat.inputs(&class) {
        let input_type = spec.get(0).cloned().unwrap_or(Value::Null);
        let extra = spec
            .get(1)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let info = json!([input_type, extra]);
        let Some(val) = inputs.get(&x).cloned() else {
            if category == InputCategory::Required && !lenient {
                errors.push(input_error(
                    "required_input_missing",
                    "Required input is missing".into(),
                    x.clone(),
                    json!({"input_name": x}),
                ));
            }
            continue;
        };

        if let Value::Array(link) = &val {
            if link.len() != 2 {
                if !lenient {
                    errors.push(input_error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]".into(),
                        x.clone(),
                        json!({"input_name": x, "input_config": info, "received_value": val}),
                    ));
                }
                continue;
            }
            let o_id = match &link[0] {
                Value::String(s) if prompt.contains_key(s) => s.clone(),
                other => return Err(PyExc::new("KeyError", py_repr(other))),
            };
            let o_class = prompt[&o_id]
                .get("class_type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let returns = ctx.cat.output_types(&o_class);
            let slot = match &link[1] {
                Value::Number(n) if n.is_i64() || n.is_u64() => n.as_i64().unwrap_or(i64::MAX),
                other => {
                    return Err(PyExc::new(
                        "TypeError",
                        format!(
                            "tuple indices must be integers or slices, not {}",
                            py_type_name(other)
                        ),
                    ));
                }
            };
            // Python indexing: negative counts from the end.
            let idx = if slot < 0 {
                returns.len() as i64 + slot
            } else {
                slot
            };
            let Some(received) = usize::try_from(idx).ok().and_then(|i| returns.get(i)) else {
                return Err(PyExc::new("IndexError", "tuple index out of range"));
            };
            if !lenient && !types_match(received, &input_type) {
                errors.push(input_error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes".into(),
                    format!(
                        "{x}, received_type({received}) mismatch input_type({})",
                        py_str(&input_type)
                    ),
                    json!({"input_name": x, "input_config": info, "received_type": received, "linked_node": val}),
                ));
                continue;
            }
            match validate_inputs(ctx, prompt, &o_id) {
                Ok(true) => {}
                Ok(false) => valid = false,
                Err(ex) => {
                    valid = false;
                    let reasons = vec![json!({
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": ex.msg,
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "exception_message": ex.msg,
                            "exception_type": ex.ty,
                            "traceback": sim_traceback("validate_inputs"),
                            "linked_node": val,
                        },
                    })];
                    ctx.validated.set(&o_id, false, reasons);
                }
            }
            continue;
        }

        if lenient {
            continue;
        }
        let mut val = match val {
            Value::Object(mut m) if m.contains_key("__value__") => {
                m.remove("__value__").unwrap_or(Value::Null)
            }
            other => other,
        };
        let converted = match input_type.as_str() {
            Some("INT") => Some(py_int(&val)),
            Some("FLOAT") => Some(py_float(&val)),
            Some("STRING") => Some(Ok(Value::String(py_str(&val)))),
            Some("BOOLEAN") => Some(Ok(Value::Bool(py_truthy(&val)))),
            _ => None,
        };
        match converted {
            Some(Ok(v)) => val = v,
            Some(Err(ex)) => {
                errors.push(input_error(
                    "invalid_input_type",
                    format!(
                        "Failed to convert an input value to a {} value",
                        py_str(&input_type)
                    ),
                    format!("{x}, {}, {}", py_str(&val), ex.msg),
                    json!({"input_name": x, "input_config": info, "received_value": val, "exception_message": ex.msg}),
                ));
                continue;
            }
            None => {}
        }
        inputs.insert(x.clone(), val.clone());

        if custom_validated && x == "image" {
            // LoadImage has VALIDATE_INPUTS(image): the combo list is not checked, the file is.
            continue;
        }
        if let Some(min) = extra.get("min")
            && num_cmp(&val, min).is_some_and(|o| o.is_lt())
        {
            errors.push(input_error(
                "value_smaller_than_min",
                format!("Value {} smaller than min of {}", py_str(&val), py_str(min)),
                x.clone(),
                json!({"input_name": x, "input_config": info, "received_value": val}),
            ));
            continue;
        }
        if let Some(max) = extra.get("max")
            && num_cmp(&val, max).is_some_and(|o| o.is_gt())
        {
            errors.push(input_error(
                "value_bigger_than_max",
                format!("Value {} bigger than max of {}", py_str(&val), py_str(max)),
                x.clone(),
                json!({"input_name": x, "input_config": info, "received_value": val}),
            ));
            continue;
        }
        let options = match &input_type {
            Value::Array(opts) => Some(opts.clone()),
            Value::String(t) if t == "COMBO" => Some(
                extra
                    .get("options")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            ),
            _ => None,
        };
        if let Some(options) = options
            && !options.iter().any(|o| py_eq(o, &val))
            && !ctx.cat.lenient_model_choice(&class, &x, &val)
        {
            let (list_info, config) = if options.len() > 20 {
                (format!("(list of length {})", options.len()), Value::Null)
            } else {
                (py_repr(&Value::Array(options.clone())), info.clone())
            };
            errors.push(input_error(
                "value_not_in_list",
                "Value not in list".into(),
                format!("{x}: '{}' not in {list_info}", py_str(&val)),
                json!({"input_name": x, "input_config": config, "received_value": val}),
            ));
            continue;
        }
    }

    if custom_validated && let Some(image) = inputs.get("image").filter(|v| !v.is_array()) {
        let name = py_str(image);
        if !(ctx.image_exists)(&name) {
            errors.push(input_error(
                "custom_validation_failed",
                "Custom validation failed for node".into(),
                format!("image - Invalid image file: {name}"),
                json!({"input_name": "image"}),
            ));
        }
    }

    if let Some(Value::Object(node)) = prompt.get_mut(id) {
        node.insert("inputs".into(), Value::Object(inputs));
    }
    Ok((errors.is_empty() && valid, errors))
}

/// Python `a == b` for JSON values (1 == 1.0 == True).
fn py_eq(a: &Value, b: &Value) -> bool {
    match (as_num(a), as_num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn as_num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

fn num_cmp(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    if let (Some(x), Some(y)) = (as_int(a), as_int(b)) {
        return Some(x.cmp(&y));
    }
    as_num(a)?.partial_cmp(&as_num(b)?)
}

fn as_int(v: &Value) -> Option<i128> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from)),
        Value::Bool(b) => Some(i128::from(*b)),
        _ => None,
    }
}

fn py_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
    }
}

fn int_value(i: i128) -> Value {
    if let Ok(v) = i64::try_from(i) {
        Value::from(v)
    } else if let Ok(v) = u64::try_from(i) {
        Value::from(v)
    } else {
        // Beyond 64 bits JSON numbers here are floats anyway.
        Value::from(i as f64)
    }
}

/// Python `int(v)`.
fn py_int(v: &Value) -> Result<Value, PyExc> {
    match v {
        Value::Bool(b) => Ok(Value::from(i64::from(*b))),
        Value::Number(n) if !n.is_f64() => Ok(v.clone()),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0).trunc();
            if f.abs() < 1.7e38 {
                Ok(int_value(f as i128))
            } else {
                Ok(Value::from(f))
            }
        }
        Value::String(s) => parse_py_int(s).map(int_value).ok_or_else(|| {
            PyExc::new(
                "ValueError",
                format!("invalid literal for int() with base 10: {}", repr_str(s)),
            )
        }),
        other => Err(PyExc::new(
            "TypeError",
            format!(
                "int() argument must be a string, a bytes-like object or a real number, not '{}'",
                py_type_name(other)
            ),
        )),
    }
}

fn parse_py_int(s: &str) -> Option<i128> {
    let t = s.trim();
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let n: i128 = digits.replace('_', "").parse().ok()?;
    Some(if neg { -n } else { n })
}

/// Python `float(v)`.
fn py_float(v: &Value) -> Result<Value, PyExc> {
    let f = match v {
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .ok_or_else(|| {
                PyExc::new(
                    "ValueError",
                    format!("could not convert string to float: {}", repr_str(s)),
                )
            })?,
        other => {
            return Err(PyExc::new(
                "TypeError",
                format!(
                    "float() argument must be a string or a real number, not '{}'",
                    py_type_name(other)
                ),
            ));
        }
    };
    Ok(serde_json::Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(prompt: Value) -> Result<Accepted, Box<Rejected>> {
        let cat = Catalog::builtin();
        let mut p = prompt.as_object().unwrap().clone();
        validate_prompt(&cat, &mut p, None, &|name| name == "up.png")
    }

    #[test]
    fn trace_cases() {
        let e = run(json!({"1": {"class_type": "NoSuchNode", "inputs": {}}})).unwrap_err();
        assert_eq!(
            e.body(),
            json!({"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.", "details": "Node ID '#1'", "extra_info": {}}, "node_errors": {}})
        );
        let e = run(json!({"1": {"inputs": {}}})).unwrap_err();
        assert_eq!(e.error["type"], "invalid_prompt");
        let e = run(json!({"1": {"class_type": "EmptyImage", "inputs": {}}})).unwrap_err();
        assert_eq!(e.error["type"], "prompt_no_outputs");

        // min + missing (from traces/prompt_errors.txt)
        let e = run(json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64, "batch_size": 1}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }))
        .unwrap_err();
        let expected: Value = serde_json::from_str(r#"{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}}, "node_errors": {"1": {"errors": [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "width", "extra_info": {"input_name": "width", "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "received_value": 0}}, {"type": "required_input_missing", "message": "Required input is missing", "details": "color", "extra_info": {"input_name": "color"}}], "dependent_outputs": ["2"], "class_type": "EmptyImage"}}}"#).unwrap();
        assert_eq!(e.body(), expected);

        let e = run(json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 4, "height": 4, "crop": "disabled"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
        }))
        .unwrap_err();
        assert_eq!(
            e.node_errors["2"]["errors"][0]["details"],
            "upscale_method: 'bogus' not in ['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']"
        );
        assert_eq!(e.node_errors["2"]["dependent_outputs"], json!(["3"]));

        let e = run(json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": "abc", "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }))
        .unwrap_err();
        assert_eq!(
            e.node_errors["1"]["errors"][0]["details"],
            "width, abc, invalid literal for int() with base 10: 'abc'"
        );

        let e = run(json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1"], "filename_prefix": "x"}}
        }))
        .unwrap_err();
        assert_eq!(
            e.error["details"],
            "Bad linked input, must be a length-2 list of [node_id, slot_index]: images"
        );

        let e = run(json!({
            "1": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }))
        .unwrap_err();
        assert_eq!(
            e.error["details"],
            "Return type mismatch between linked nodes: images, received_type(LATENT) mismatch input_type(IMAGE)"
        );

        let e = run(json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }))
        .unwrap_err();
        assert_eq!(
            e.node_errors["1"]["errors"][0],
            json!({"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": "image - Invalid image file: nope.png", "extra_info": {"input_name": "image"}})
        );
        assert!(
            run(json!({
                "1": {"class_type": "LoadImage", "inputs": {"image": "up.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
            }))
            .is_ok()
        );
    }

    #[test]
    fn converts_widget_values_in_place() {
        let cat = Catalog::builtin();
        let mut p = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": "64", "height": 7.9, "batch_size": 1, "color": 0}},
            "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 2}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": 5}}
        })
        .as_object()
        .unwrap()
        .clone();
        let ok = validate_prompt(&cat, &mut p, None, &|_| false).unwrap();
        assert_eq!(ok.outputs, ["3"]);
        assert_eq!(p["1"]["inputs"]["width"], json!(64));
        assert_eq!(p["1"]["inputs"]["height"], json!(7));
        assert_eq!(
            crate::pyjson::to_string(&p["2"]["inputs"]["scale_by"]),
            "2.0"
        );
        assert_eq!(p["3"]["inputs"]["filename_prefix"], json!("5"));
    }

    #[test]
    fn missing_link_target_is_an_exception() {
        let e = run(json!({
            "2": {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "x"}}
        }))
        .unwrap_err();
        assert_eq!(
            e.node_errors["2"]["errors"][0]["type"],
            "exception_during_validation"
        );
        assert_eq!(e.node_errors["2"]["errors"][0]["details"], "'99'");
    }

    #[test]
    fn model_files_are_lenient_but_other_combos_are_not() {
        let base = |unet: &str, dtype: &str| {
            json!({
                "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": dtype}},
                "2": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                "3": {"class_type": "VAELoader", "inputs": {"vae_name": "flux2-vae.safetensors"}},
                "4": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["3", 0]}},
                "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}
            })
        };
        assert!(run(base("some-other-model.safetensors", "default")).is_ok());
        // node 1 is not reachable from the output, so it is not validated
        assert!(run(base("some-other-model.txt", "default")).is_ok());
        let mut p = base("a.safetensors", "default");
        p["3"]["inputs"]["vae_name"] = json!("notes.txt");
        let e = run(p).unwrap_err();
        assert_eq!(e.node_errors["3"]["errors"][0]["type"], "value_not_in_list");
    }
}
