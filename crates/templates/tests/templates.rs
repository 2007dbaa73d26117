//! Every shipped template is checked against the `object_info` captured from ComfyUI 0.11.0 and
//! against the widget rules of the pinned frontend (comfyui-frontend-package 1.37.11):
//!
//! * a node's `widgets_values` holds one entry per widget input, in `input_order` (required, then
//!   optional), whether or not that widget is linked: the frontend's `LGraphNode.serialize` writes
//!   every widget and `configure` reads them back by position;
//! * an INT (or FLOAT/COMBO) with `control_after_generate`, or an INT named `seed`/`noise_seed`
//!   without the option, is followed by its "control after generate" entry (`"randomize"`, ...);
//! * a linked widget gets an input slot carrying `"widget": {"name": ...}`; unlinked widgets need
//!   no slot (the frontend's `compressWidgetInputSlots` drops them too).

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};

const OBJECT_INFO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/comfyui/api/object_info.json"
);

/// Inputs that list files of a model folder. The captured `object_info` comes from a CPU server
/// with empty model folders, so these lists hold no model files at all (`VAELoader` lists only its
/// pseudo-entry `pixel_space`). A template value for them must look like a model file; once a
/// capture lists real files, it must be one of them.
const MODEL_FILE_INPUTS: &[(&str, &str, &str)] = &[
    ("UNETLoader", "unet_name", "diffusion_models"),
    ("CLIPLoader", "clip_name", "text_encoders"),
    ("VAELoader", "vae_name", "vae"),
    ("CheckpointLoaderSimple", "ckpt_name", "checkpoints"),
    ("LTXAVTextEncoderLoader", "text_encoder", "text_encoders"),
    ("LTXAVTextEncoderLoader", "ckpt_name", "checkpoints"),
    ("LTXVAudioVAELoader", "ckpt_name", "checkpoints"),
    (
        "LatentUpscaleModelLoader",
        "model_name",
        "latent_upscale_models",
    ),
    ("LoraLoaderModelOnly", "lora_name", "loras"),
];

const MODEL_EXTENSIONS: &[&str] = &[".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".gguf"];

const CONTROL_VALUES: &[&str] = &["fixed", "increment", "decrement", "randomize"];

/// Nodes that only the frontend defines (virtual nodes, never sent to the server), with the
/// definitions the 1.37.11 bundle registers for them.
fn frontend_only_defs() -> HashMap<&'static str, Value> {
    let note = json!({
        "input": {"required": {"text": ["STRING", {"multiline": true}]}},
        "input_order": {"required": ["text"]},
        "output": [],
        "output_name": []
    });
    HashMap::from([("Note", note.clone()), ("MarkdownNote", note)])
}

fn object_info() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(OBJECT_INFO)
        .unwrap_or_else(|e| panic!("cannot read {OBJECT_INFO}: {e}"));
    match serde_json::from_str(&text).expect("object_info.json parses") {
        Value::Object(m) => m,
        _ => panic!("object_info.json is not an object"),
    }
}

struct Defs {
    server: serde_json::Map<String, Value>,
    frontend: HashMap<&'static str, Value>,
}

impl Defs {
    fn load() -> Self {
        Defs {
            server: object_info(),
            frontend: frontend_only_defs(),
        }
    }

    fn get(&self, node_type: &str) -> Option<&Value> {
        self.server
            .get(node_type)
            .or_else(|| self.frontend.get(node_type))
    }
}

/// One input of a node definition, in the frontend's order.
struct InputSpec<'a> {
    name: &'a str,
    /// `spec[0]`: a type name, or (legacy combo) the list of choices.
    kind: &'a Value,
    opts: Option<&'a serde_json::Map<String, Value>>,
    optional: bool,
}

impl InputSpec<'_> {
    fn type_name(&self) -> &str {
        match self.kind {
            Value::Array(_) => "COMBO",
            Value::String(s) => s,
            other => panic!("input {}: unexpected spec {other}", self.name),
        }
    }

    fn opt(&self, key: &str) -> Option<&Value> {
        self.opts.and_then(|o| o.get(key))
    }

    fn is_widget(&self) -> bool {
        if self.opt("forceInput") == Some(&Value::Bool(true)) {
            return false;
        }
        matches!(
            self.type_name(),
            "INT" | "FLOAT" | "STRING" | "BOOLEAN" | "COMBO"
        )
    }

    /// The frontend adds a "control after generate" widget right after this one.
    fn has_control_widget(&self) -> bool {
        match self.opt("control_after_generate") {
            Some(v) => v.as_bool().unwrap_or(true),
            None => self.type_name() == "INT" && matches!(self.name, "seed" | "noise_seed"),
        }
    }

    fn combo_options(&self) -> &[Value] {
        match self.kind {
            Value::Array(list) => list,
            _ => self
                .opt("options")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_else(|| panic!("COMBO input {} without options", self.name)),
        }
    }
}

fn input_specs(def: &Value) -> Vec<InputSpec<'_>> {
    let mut specs = Vec::new();
    for (section, optional) in [("required", false), ("optional", true)] {
        let Some(order) = def["input_order"][section].as_array() else {
            continue;
        };
        for name in order {
            let name = name.as_str().expect("input_order holds names");
            let spec = &def["input"][section][name];
            let arr = spec
                .as_array()
                .unwrap_or_else(|| panic!("input {name}: spec is not a list"));
            specs.push(InputSpec {
                name,
                kind: &arr[0],
                opts: arr.get(1).and_then(Value::as_object),
                optional,
            });
        }
    }
    specs
}

/// LiteGraph's `isValidConnection`: equal types (ignoring case), a wildcard, or comma-separated
/// alternatives that share a type.
fn types_compatible(output: &str, input: &str) -> bool {
    if output == "*" || input == "*" || output.is_empty() || input.is_empty() {
        return true;
    }
    let outs: Vec<String> = output.split(',').map(|t| t.trim().to_lowercase()).collect();
    input
        .split(',')
        .map(|t| t.trim().to_lowercase())
        .any(|t| outs.contains(&t))
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
}

fn number_in_range(value: &Value, spec: &InputSpec, integer: bool) -> Result<(), String> {
    let ok_kind = if integer {
        value.is_i64() || value.is_u64()
    } else {
        value.is_number()
    };
    if !ok_kind {
        let kind = if integer { "an integer" } else { "a number" };
        return Err(format!("{value} is not {kind}"));
    }
    let x = value.as_f64().expect("numbers convert to f64");
    if let Some(min) = spec.opt("min").and_then(Value::as_f64)
        && x < min
    {
        return Err(format!("{value} is below min {min}"));
    }
    if let Some(max) = spec.opt("max").and_then(Value::as_f64)
        && x > max
    {
        return Err(format!("{value} is above max {max}"));
    }
    Ok(())
}

fn looks_like_model_file(s: &str) -> bool {
    MODEL_EXTENSIONS.iter().any(|ext| s.ends_with(ext))
}

fn check_widget_value(node_type: &str, spec: &InputSpec, value: &Value) -> Result<(), String> {
    match spec.type_name() {
        "INT" => number_in_range(value, spec, true),
        "FLOAT" => number_in_range(value, spec, false),
        "BOOLEAN" => value
            .is_boolean()
            .then_some(())
            .ok_or_else(|| format!("{value} is not a boolean")),
        "STRING" => value
            .is_string()
            .then_some(())
            .ok_or_else(|| format!("{value} is not a string")),
        "COMBO" => {
            let options = spec.combo_options();
            if options.contains(value) {
                return Ok(());
            }
            let is_model_input = MODEL_FILE_INPUTS
                .iter()
                .any(|(n, i, _)| *n == node_type && *i == spec.name);
            let list_has_models = options
                .iter()
                .any(|o| o.as_str().is_some_and(looks_like_model_file));
            match value.as_str() {
                Some(s) if is_model_input && !list_has_models && looks_like_model_file(s) => Ok(()),
                _ => Err(format!("{value} is not one of {}", Value::from(options))),
            }
        }
        other => Err(format!("no widget rule for type {other}")),
    }
}

/// Checks one template; returns every problem found, so a failure lists them all at once.
fn check_template(defs: &Defs, file_name: &str, json: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let mut err = |msg: String| errors.push(format!("{file_name}: {msg}"));

    let wf: Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => {
            err(format!("does not parse: {e}"));
            return errors;
        }
    };

    // Top level, as the frontend saves it.
    let id = wf["id"].as_str().unwrap_or_default();
    let hyphen_at: Vec<usize> = id.match_indices('-').map(|(i, _)| i).collect();
    if id.len() != 36 || hyphen_at != [8, 13, 18, 23] {
        err(format!("id {id:?} is not a UUID"));
    }
    if wf["revision"] != json!(0) {
        err("revision is not 0".into());
    }
    if wf["version"] != json!(0.4) {
        err(format!("version {} is not 0.4", wf["version"]));
    }
    if !wf["groups"].is_array() || !wf["config"].is_object() {
        err("groups must be a list and config an object".into());
    }
    if !wf["extra"]["ds"]["scale"].is_number() || !wf["extra"]["ds"]["offset"].is_array() {
        err("extra.ds must hold scale and offset".into());
    }
    let (Some(nodes), Some(links)) = (wf["nodes"].as_array(), wf["links"].as_array()) else {
        err("nodes and links must be lists".into());
        return errors;
    };

    // Unique ids and last_*_id bookkeeping.
    let mut node_by_id: HashMap<u64, &Value> = HashMap::new();
    for node in nodes {
        match node["id"].as_u64() {
            Some(id) if node_by_id.insert(id, node).is_none() => {}
            Some(id) => err(format!("duplicate node id {id}")),
            None => err(format!("node without an integer id: {}", node["id"])),
        }
    }
    let mut link_by_id: HashMap<u64, &Vec<Value>> = HashMap::new();
    for link in links {
        let Some(l) = link.as_array().filter(|l| l.len() == 6) else {
            err(format!(
                "link {link} is not [id, from, from_slot, to, to_slot, type]"
            ));
            continue;
        };
        match as_u64(&l[0]) {
            Some(id) if link_by_id.insert(id, l).is_none() => {}
            Some(id) => err(format!("duplicate link id {id}")),
            None => err(format!("link without an integer id: {link}")),
        }
    }
    let max_node = node_by_id.keys().max().copied().unwrap_or(0);
    let max_link = link_by_id.keys().max().copied().unwrap_or(0);
    if wf["last_node_id"].as_u64().is_none_or(|n| n < max_node) {
        err(format!("last_node_id {} < {max_node}", wf["last_node_id"]));
    }
    if wf["last_link_id"].as_u64().is_none_or(|n| n < max_link) {
        err(format!("last_link_id {} < {max_link}", wf["last_link_id"]));
    }

    // Nodes: type, slots and widget values.
    for node in nodes {
        let nid = node["id"].clone();
        let node_type = node["type"].as_str().unwrap_or_default();
        let Some(def) = defs.get(node_type) else {
            err(format!("node {nid}: unknown node type {node_type:?}"));
            continue;
        };
        let at = format!("node {nid} ({node_type})");
        for key in ["pos", "size"] {
            let ok = node[key]
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(Value::is_number));
            if !ok {
                err(format!("{at}: {key} is not [x, y]"));
            }
        }
        if !node["flags"].is_object() || !node["order"].is_u64() || node["mode"] != json!(0) {
            err(format!("{at}: needs flags {{}}, an order and mode 0"));
        }
        if node_type != "Note"
            && node_type != "MarkdownNote"
            && node["properties"]["Node name for S&R"] != json!(node_type)
        {
            err(format!("{at}: properties lack \"Node name for S&R\""));
        }
        let specs = input_specs(def);
        if let Some(s) = specs.iter().find(|s| {
            s.type_name().starts_with("COMFY_")
                || ["image_upload", "video_upload", "audio_upload"]
                    .iter()
                    .any(|k| s.opt(k).is_some())
        }) {
            err(format!(
                "{at}: input {} needs widget rules this test does not know",
                s.name
            ));
            continue;
        }

        // Outputs: exactly the definition's, in order.
        let outputs = node["outputs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let def_types = def["output"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let def_names = def["output_name"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if outputs.len() != def_types.len() {
            err(format!(
                "{at}: {} outputs, definition has {}",
                outputs.len(),
                def_types.len()
            ));
        }
        for (i, (out, (ty, name))) in outputs
            .iter()
            .zip(def_types.iter().zip(def_names))
            .enumerate()
        {
            if &out["type"] != ty || &out["name"] != name {
                err(format!(
                    "{at}: output {i} is {}/{}, definition says {name}/{ty}",
                    out["name"], out["type"]
                ));
            }
            if !out["slot_index"].is_null() && out["slot_index"] != json!(i) {
                err(format!(
                    "{at}: output {i} has slot_index {}",
                    out["slot_index"]
                ));
            }
        }

        // Inputs: sockets of the definition, or linked widgets marked as such.
        let inputs = node["inputs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let mut seen = HashSet::new();
        for (i, slot) in inputs.iter().enumerate() {
            let name = slot["name"].as_str().unwrap_or_default();
            if !seen.insert(name) {
                err(format!("{at}: input {name:?} appears twice"));
            }
            let Some(spec) = specs.iter().find(|s| s.name == name) else {
                err(format!("{at}: input {i} {name:?} is not in the definition"));
                continue;
            };
            if slot["type"] != json!(spec.type_name()) {
                err(format!(
                    "{at}: input {name} has type {}, definition says {}",
                    slot["type"],
                    spec.type_name()
                ));
            }
            if spec.is_widget() {
                if slot["widget"]["name"] != json!(name) {
                    err(format!(
                        "{at}: widget input {name} lacks \"widget\": {{\"name\"}}"
                    ));
                }
                if slot["link"].is_null() {
                    err(format!("{at}: widget input {name} has a slot but no link"));
                }
            }
        }
        for spec in specs.iter().filter(|s| !s.is_widget() && !s.optional) {
            let linked = inputs
                .iter()
                .any(|s| s["name"] == json!(spec.name) && !s["link"].is_null());
            if !linked {
                err(format!(
                    "{at}: required input {} is not connected",
                    spec.name
                ));
            }
        }

        // widgets_values, in widget order, each checked against its spec.
        let empty = Vec::new();
        let values = match &node["widgets_values"] {
            Value::Array(v) => v,
            Value::Null => &empty,
            other => {
                err(format!("{at}: widgets_values is not a list: {other}"));
                continue;
            }
        };
        let mut expected = Vec::new();
        for spec in specs.iter().filter(|s| s.is_widget()) {
            expected.push((spec, false));
            if spec.has_control_widget() {
                expected.push((spec, true));
            }
        }
        if values.len() != expected.len() {
            let names: Vec<String> = expected
                .iter()
                .map(|(s, control)| {
                    if *control {
                        format!("{}:control_after_generate", s.name)
                    } else {
                        s.name.to_string()
                    }
                })
                .collect();
            err(format!(
                "{at}: {} widgets_values, the widgets are {names:?}",
                values.len()
            ));
        }
        for ((spec, control), value) in expected.iter().zip(values) {
            let result = if *control {
                value
                    .as_str()
                    .filter(|v| CONTROL_VALUES.contains(v))
                    .map(|_| ())
                    .ok_or_else(|| format!("{value} is not one of {CONTROL_VALUES:?}"))
            } else {
                check_widget_value(node_type, spec, value)
            };
            if let Err(e) = result {
                let what = if *control {
                    "control_after_generate of "
                } else {
                    ""
                };
                err(format!("{at}: widget {what}{}: {e}", spec.name));
            }
        }
    }

    // Links: both ends exist, agree with the link table, and carry compatible types.
    for (id, l) in &link_by_id {
        let (from, from_slot, to, to_slot) =
            (as_u64(&l[1]), l[2].as_u64(), as_u64(&l[3]), l[4].as_u64());
        let (Some(from), Some(from_slot), Some(to), Some(to_slot)) = (from, from_slot, to, to_slot)
        else {
            err(format!("link {id}: ids and slots must be integers"));
            continue;
        };
        let out = node_by_id
            .get(&from)
            .and_then(|n| n["outputs"].get(from_slot as usize));
        let inp = node_by_id
            .get(&to)
            .and_then(|n| n["inputs"].get(to_slot as usize));
        let (Some(out), Some(inp)) = (out, inp) else {
            err(format!(
                "link {id}: {from}:{from_slot} -> {to}:{to_slot} has a missing end"
            ));
            continue;
        };
        let listed = out["links"]
            .as_array()
            .is_some_and(|ls| ls.contains(&json!(id)));
        if !listed {
            err(format!(
                "link {id}: not listed in node {from} output {from_slot}"
            ));
        }
        if inp["link"] != json!(id) {
            err(format!(
                "link {id}: node {to} input {to_slot} names link {}",
                inp["link"]
            ));
        }
        let out_type = out["type"].as_str().unwrap_or_default();
        let in_type = inp["type"].as_str().unwrap_or_default();
        if l[5] != json!(out_type) {
            err(format!(
                "link {id}: type {} but the output is {out_type}",
                l[5]
            ));
        }
        if !types_compatible(out_type, in_type) {
            err(format!(
                "link {id}: {out_type} output of node {from} into {in_type} input {} of node {to}",
                inp["name"]
            ));
        }
    }
    // And the reverse: every slot's link points back at that slot.
    for node in nodes {
        let nid = node["id"].as_u64().unwrap_or(u64::MAX);
        for (i, slot) in node["inputs"].as_array().into_iter().flatten().enumerate() {
            if let Some(lid) = slot["link"].as_u64() {
                let back = link_by_id
                    .get(&lid)
                    .is_some_and(|l| as_u64(&l[3]) == Some(nid) && l[4].as_u64() == Some(i as u64));
                if !back {
                    err(format!(
                        "node {nid} input {i}: link {lid} does not end here"
                    ));
                }
            }
        }
        for (i, out) in node["outputs"].as_array().into_iter().flatten().enumerate() {
            for lid in out["links"].as_array().into_iter().flatten() {
                let back = lid
                    .as_u64()
                    .and_then(|lid| link_by_id.get(&lid))
                    .is_some_and(|l| as_u64(&l[1]) == Some(nid) && l[2].as_u64() == Some(i as u64));
                if !back {
                    err(format!(
                        "node {nid} output {i}: link {lid} does not start here"
                    ));
                }
            }
        }
    }
    errors
}

#[test]
fn every_template_matches_object_info_and_frontend_rules() {
    let defs = Defs::load();
    let mut errors = Vec::new();
    for t in comfyume_templates::all() {
        errors.extend(check_template(&defs, t.file_name, t.json));
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn templates_are_the_five_workshop_workflows() {
    let names: Vec<&str> = comfyume_templates::all().iter().map(|t| t.name()).collect();
    assert_eq!(
        names,
        [
            "Start here - empty canvas",
            "Flux.2 Klein 9B - text to image",
            "Flux.2 Klein 4B - text to image",
            "LTX-2 - text to video",
            "LTX-2 - text to video (distilled)",
        ]
    );
}

/// The workflows do what their names say: each ends in the right kind of output node and the
/// model templates load the right model files.
#[test]
fn templates_use_their_models_and_outputs() {
    let expect: &[(&str, &str, &[&str])] = &[
        (
            "Flux.2 Klein 9B - text to image.json",
            "SaveImage",
            &[
                "flux-2-klein-9b.safetensors",
                "qwen_3_8b_fp8mixed.safetensors",
                "flux2-vae.safetensors",
            ],
        ),
        (
            "Flux.2 Klein 4B - text to image.json",
            "SaveImage",
            &[
                "flux-2-klein-4b.safetensors",
                "qwen_3_4b.safetensors",
                "flux2-vae.safetensors",
            ],
        ),
        (
            "LTX-2 - text to video.json",
            "SaveVideo",
            &[
                "ltx-2-19b-dev.safetensors",
                "gemma_3_12B_it_fp4_mixed.safetensors",
            ],
        ),
        (
            "LTX-2 - text to video (distilled).json",
            "SaveVideo",
            &[
                "ltx-2-19b-distilled.safetensors",
                "gemma_3_12B_it_fp4_mixed.safetensors",
            ],
        ),
    ];
    for (file, output_node, models) in expect {
        let t = comfyume_templates::find(file).unwrap_or_else(|| panic!("{file} missing"));
        let wf: Value = serde_json::from_str(t.json).expect("parses");
        let nodes = wf["nodes"].as_array().expect("nodes");
        assert!(
            nodes.iter().any(|n| n["type"] == json!(output_node)),
            "{file}: no {output_node}"
        );
        let values: Vec<&Value> = nodes
            .iter()
            .flat_map(|n| n["widgets_values"].as_array().into_iter().flatten())
            .collect();
        for m in *models {
            assert!(values.contains(&&json!(m)), "{file}: does not load {m}");
        }
    }
    let start = comfyume_templates::find("Start here - empty canvas.json").expect("present");
    let wf: Value = serde_json::from_str(start.json).expect("parses");
    assert!(wf["links"].as_array().is_some_and(Vec::is_empty));
    assert!(
        wf["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|n| n["type"] == json!("MarkdownNote")),
        "the starter canvas holds notes only"
    );
}

/// The model-file exemption above only holds while the capture lists no model files; if a new
/// capture lists some, template values must come from it (checked by `check_widget_value`).
#[test]
fn model_file_inputs_exist_in_object_info() {
    let defs = Defs::load();
    for (node, input, folder) in MODEL_FILE_INPUTS {
        let def = defs
            .server
            .get(*node)
            .unwrap_or_else(|| panic!("{node} missing from object_info"));
        let specs = input_specs(def);
        let spec = specs
            .iter()
            .find(|s| s.name == *input)
            .unwrap_or_else(|| panic!("{node}.{input} missing"));
        assert_eq!(
            spec.type_name(),
            "COMBO",
            "{node}.{input} ({folder}) is not a combo"
        );
    }
}

type Mutation<'a> = Box<dyn Fn(&mut Value) + 'a>;

/// The checker itself must reject what the frontend would load wrongly.
#[test]
fn checker_rejects_broken_templates() {
    let defs = Defs::load();
    let good = comfyume_templates::find("Flux.2 Klein 4B - text to image.json")
        .expect("present")
        .json;
    assert!(check_template(&defs, "good", good).is_empty());

    let mutate = |f: &dyn Fn(&mut Value)| -> Vec<String> {
        let mut wf: Value = serde_json::from_str(good).expect("parses");
        f(&mut wf);
        check_template(&defs, "bad", &wf.to_string())
    };
    let node = |wf: &mut Value, ty: &str| -> usize {
        wf["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().position(|n| n["type"] == json!(ty)))
            .unwrap_or_else(|| panic!("{ty} in template"))
    };
    let cases: Vec<(&str, &str, Mutation<'_>)> = vec![
        (
            "unknown node type",
            "unknown node type \"VAEDecodeNope\"",
            Box::new(|wf| {
                let i = node(wf, "VAEDecode");
                wf["nodes"][i]["type"] = json!("VAEDecodeNope");
            }),
        ),
        (
            "seed without its control value",
            "1 widgets_values, the widgets are",
            Box::new(|wf| {
                let i = node(wf, "RandomNoise");
                wf["nodes"][i]["widgets_values"] = json!([5]);
            }),
        ),
        (
            "bad control value",
            "widget control_after_generate of noise_seed",
            Box::new(|wf| {
                let i = node(wf, "RandomNoise");
                wf["nodes"][i]["widgets_values"] = json!([5, "sometimes"]);
            }),
        ),
        (
            "INT out of range",
            "widget width: 8 is below min 16",
            Box::new(|wf| {
                let i = node(wf, "EmptyFlux2LatentImage");
                wf["nodes"][i]["widgets_values"][0] = json!(8);
            }),
        ),
        (
            "linked widget dropped from widgets_values",
            "1 widgets_values, the widgets are [\"width\", \"height\", \"batch_size\"]",
            Box::new(|wf| {
                let i = node(wf, "EmptyFlux2LatentImage");
                wf["nodes"][i]["widgets_values"] = json!([1]);
            }),
        ),
        (
            "combo value not in list",
            "widget sampler_name: \"eulerish\" is not one of",
            Box::new(|wf| {
                let i = node(wf, "KSamplerSelect");
                wf["nodes"][i]["widgets_values"] = json!(["eulerish"]);
            }),
        ),
        (
            "CLIPLoader type not in list",
            "widget type: \"flux3\" is not one of",
            Box::new(|wf| {
                let i = node(wf, "CLIPLoader");
                wf["nodes"][i]["widgets_values"][1] = json!("flux3");
            }),
        ),
        (
            "model input that is not a model file",
            "widget unet_name: \"notes.txt\" is not one of",
            Box::new(|wf| {
                let i = node(wf, "UNETLoader");
                wf["nodes"][i]["widgets_values"][0] = json!("notes.txt");
            }),
        ),
        (
            "float where an INT belongs",
            "widget steps: 4.5 is not an integer",
            Box::new(|wf| {
                let i = node(wf, "Flux2Scheduler");
                wf["nodes"][i]["widgets_values"][0] = json!(4.5);
            }),
        ),
        (
            "duplicate node id",
            "duplicate node id 1",
            Box::new(|wf| {
                let n = wf["nodes"][0].clone();
                wf["nodes"].as_array_mut().expect("list").push(n);
            }),
        ),
        (
            "link into the wrong input type",
            "VAE output of node 3 into IMAGE input",
            Box::new(|wf| {
                // Send the VAE into SaveImage's IMAGE input, keeping the tables consistent.
                let save = node(wf, "SaveImage");
                let lid = wf["nodes"][save]["inputs"][0]["link"].clone();
                for n in wf["nodes"].as_array_mut().expect("nodes") {
                    for o in n["outputs"].as_array_mut().into_iter().flatten() {
                        if let Some(ls) = o["links"].as_array_mut() {
                            ls.retain(|l| *l != lid);
                        }
                    }
                }
                let vae = node(wf, "VAELoader");
                let vae_id = wf["nodes"][vae]["id"].clone();
                for l in wf["links"].as_array_mut().expect("links") {
                    if l[0] == lid {
                        l[1] = vae_id.clone();
                        l[2] = json!(0);
                        l[5] = json!("VAE");
                    }
                }
                wf["nodes"][vae]["outputs"][0]["links"]
                    .as_array_mut()
                    .expect("links")
                    .push(lid);
            }),
        ),
        (
            "link table disagrees with the slot",
            "names link 999",
            Box::new(|wf| {
                let i = node(wf, "VAEDecode");
                wf["nodes"][i]["inputs"][0]["link"] = json!(999);
            }),
        ),
        (
            "required input unconnected",
            "required input images is not connected",
            Box::new(|wf| {
                let i = node(wf, "SaveImage");
                let lid = wf["nodes"][i]["inputs"][0]["link"].clone();
                wf["nodes"][i]["inputs"][0]["link"] = Value::Null;
                wf["links"]
                    .as_array_mut()
                    .expect("links")
                    .retain(|l| l[0] != lid);
                for n in wf["nodes"].as_array_mut().expect("nodes") {
                    for o in n["outputs"].as_array_mut().into_iter().flatten() {
                        if let Some(ls) = o["links"].as_array_mut() {
                            ls.retain(|l| *l != lid);
                        }
                    }
                }
            }),
        ),
    ];
    for (what, expected, f) in &cases {
        let errors = mutate(f.as_ref());
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{what}: expected an error containing {expected:?}, got {errors:#?}"
        );
    }
}
