//! `GET /object_info`: typed access to node class definitions, and the per-participant
//! view in which file-loading inputs list only that participant's own files.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::py::obj_get;

/// Error for [`ObjectInfo::from_value`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectInfoError {
    #[error("object_info must be a JSON object of node class -> info, got {0}")]
    NotAnObject(&'static str),
}

/// The `/object_info` document: node class name -> node info.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObjectInfo {
    classes: Map<String, Value>,
}

/// Which section of a node's `input` an input sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputCategory {
    Required,
    Optional,
    Hidden,
}

/// Numeric widget options (`INT`/`FLOAT`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NumberSpec {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub step: Option<f64>,
    pub default: Option<f64>,
}

/// What an input accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum InputKind {
    Int(NumberSpec),
    Float(NumberSpec),
    String {
        default: Option<String>,
        multiline: bool,
    },
    Boolean {
        default: Option<bool>,
    },
    /// A choice list, from either `[[choices...], {opts}]` or `["COMBO", {"options": [...]}]`.
    /// `remote` combos (choices fetched by the frontend) have no choices here.
    Combo {
        choices: Vec<Value>,
        default: Option<Value>,
        remote: bool,
    },
    /// A hidden input (`PROMPT`, `EXTRA_PNGINFO`, `UNIQUE_ID`, ...).
    Hidden(String),
    /// Anything else: a socket type such as `IMAGE`, `IMAGE,MASK`, `*`, or a v3 dynamic type.
    Other(String),
}

/// One input of a node class.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub category: InputCategory,
    pub kind: InputKind,
    /// The options object (second element of the spec), empty when absent.
    pub options: Map<String, Value>,
    /// Set when this input names one of the participant's uploaded files.
    pub upload: Option<FileKind>,
    /// The spec exactly as in object_info.
    pub raw: Value,
}

/// The kind of input file a file-loading input refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Image,
    Video,
    Audio,
    /// 3D models under `3d/` (Load3D).
    Model3d,
    /// `.latent` files (LoadLatent).
    Latent,
    /// An unknown `*_upload` flag: any of the participant's files.
    Any,
}

/// A participant's own input files, names relative to their input dir ("up.png", "sub/x.png").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserFiles {
    pub images: Vec<String>,
    pub videos: Vec<String>,
    pub audio: Vec<String>,
    pub all: Vec<String>,
    /// Their output files, relative to their output dir ("ComfyUI_00001_.png",
    /// "video/clip.mp4"): a file input may name one as `video/clip.mp4 [output]` (a result
    /// reused as an input). Never listed in the node definitions, as in ComfyUI.
    pub outputs: Vec<String>,
}

const MODEL_3D_EXTENSIONS: [&str; 9] = [
    ".gltf", ".glb", ".obj", ".fbx", ".stl", ".spz", ".splat", ".ply", ".ksplat",
];

impl UserFiles {
    /// The files an input of `kind` may name, sorted like ComfyUI's `sorted(files)`.
    pub fn for_kind(&self, kind: FileKind) -> Vec<String> {
        let mut out: Vec<String> = match kind {
            FileKind::Image => self.images.clone(),
            FileKind::Video => self.videos.clone(),
            FileKind::Audio => self.audio.clone(),
            FileKind::Any => self.all.clone(),
            FileKind::Model3d => self
                .all
                .iter()
                .filter(|f| {
                    let lower = f.to_lowercase();
                    lower.starts_with("3d/")
                        && MODEL_3D_EXTENSIONS.iter().any(|e| lower.ends_with(e))
                })
                .cloned()
                .collect(),
            FileKind::Latent => self
                .all
                .iter()
                .filter(|f| f.ends_with(".latent"))
                .cloned()
                .collect(),
        };
        out.sort();
        out.dedup();
        out
    }
}

/// The file kind of a file-loading input, by class/input name or by its `*_upload` flag.
pub fn upload_kind(
    class: &str,
    input: &str,
    options: Option<&Map<String, Value>>,
) -> Option<FileKind> {
    match (class, input) {
        ("LoadImage" | "LoadImageMask" | "LoadImageOutput" | "WebcamCapture", "image") => {
            return Some(FileKind::Image);
        }
        ("LoadVideo", "file") => return Some(FileKind::Video),
        ("LoadAudio", "audio") => return Some(FileKind::Audio),
        ("Load3D", "model_file") => return Some(FileKind::Model3d),
        ("LoadLatent", "latent") => return Some(FileKind::Latent),
        _ => {}
    }
    let options = options?;
    let mut found = None;
    for (flag, on) in options {
        if on != &Value::Bool(true) || !flag.ends_with("_upload") {
            continue;
        }
        let kind = match flag.as_str() {
            "image_upload" | "animated_image_upload" => FileKind::Image,
            "video_upload" => FileKind::Video,
            "audio_upload" => FileKind::Audio,
            "3d_upload" | "file_upload" | "model_upload" | "mesh_upload" => FileKind::Model3d,
            _ => FileKind::Any,
        };
        // A specific flag wins over an unknown one.
        if found.is_none() || found == Some(FileKind::Any) {
            found = Some(kind);
        }
    }
    found
}

/// Where the choices of a combo spec live.
fn spec_choices(spec: &Value) -> Option<&Vec<Value>> {
    let arr = spec.as_array()?;
    match arr.first()? {
        Value::Array(choices) => Some(choices),
        Value::String(t) if t == "COMBO" => obj_get(arr.get(1)?, "options")?.as_array(),
        _ => None,
    }
}

/// `spec` with its choice list replaced by `files`; `None` if it has no choice list
/// (e.g. a remote combo such as LoadImageOutput, whose list the frontend fetches itself).
pub(crate) fn patch_spec(spec: &Value, files: &[String]) -> Option<Value> {
    spec_choices(spec)?;
    let list = Value::Array(files.iter().cloned().map(Value::String).collect());
    let mut out = spec.clone();
    let arr = out.as_array_mut()?;
    if arr.first()?.is_array() {
        arr[0] = list;
    } else {
        arr.get_mut(1)?
            .as_object_mut()?
            .insert("options".into(), list);
    }
    Some(out)
}

fn spec_options(spec: &Value) -> Option<&Map<String, Value>> {
    spec.as_array()?.get(1)?.as_object()
}

/// The node's file-loading inputs that have a choice list: (category, input name, kind).
fn file_inputs<'a>(class: &str, node: &'a Value) -> Vec<(&'static str, &'a str, FileKind)> {
    let mut out = Vec::new();
    for cat in ["required", "optional"] {
        let Some(section) = obj_get(node, "input")
            .and_then(|i| obj_get(i, cat))
            .and_then(Value::as_object)
        else {
            continue;
        };
        for (name, spec) in section {
            if let Some(kind) = upload_kind(class, name, spec_options(spec))
                && spec_choices(spec).is_some()
            {
                out.push((cat, name.as_str(), kind));
            }
        }
    }
    out
}

/// The participant's copy of one node class, or `None` when the class has no file inputs
/// (the base entry is then already correct for everyone).
pub fn participant_node(class: &str, node: &Value, files: &UserFiles) -> Option<Value> {
    let targets = file_inputs(class, node);
    if targets.is_empty() {
        return None;
    }
    let mut out = node.clone();
    for (cat, name, kind) in targets {
        let list = files.for_kind(kind);
        let slot = out
            .get_mut("input")
            .and_then(|i| i.get_mut(cat))
            .and_then(|s| s.get_mut(name));
        if let Some(slot) = slot
            && let Some(patched) = patch_spec(slot, &list)
        {
            *slot = patched;
        }
    }
    Some(out)
}

/// The `/object_info` a participant sees: every file-loading input (LoadImage, LoadImageMask,
/// LoadVideo, LoadAudio, Load3D, LoadLatent, and any input flagged `*_upload`) lists only
/// that participant's files of the matching kind, in whichever list form the base uses.
///
/// Cost: one deep clone of `base` (O(document size): every node of the 740 KB document is
/// copied) plus re-patching the handful of affected classes (6 of 592 in the captured
/// document). For the per-request hot path prefer [`ViewTemplate::render`], which copies
/// pre-rendered text and only serializes the patched classes.
pub fn participant_view(base: &Value, files: &UserFiles) -> Value {
    let Some(classes) = base.as_object() else {
        return base.clone();
    };
    let mut out = Map::with_capacity(classes.len());
    for (class, node) in classes {
        let node = participant_node(class, node, files).unwrap_or_else(|| node.clone());
        out.insert(class.clone(), node);
    }
    Value::Object(out)
}

#[derive(Debug, Clone)]
enum Segment {
    Text(String),
    Node { class: String, node: Value },
}

/// The base `/object_info` pre-serialized once, with holes where the file-loading classes go.
/// [`ViewTemplate::render`] yields exactly `serde_json::to_string(&participant_view(base, files))`
/// at the cost of a memcpy of the document plus serializing the few patched classes.
#[derive(Debug, Clone)]
pub struct ViewTemplate {
    segments: Vec<Segment>,
    len_hint: usize,
}

impl ViewTemplate {
    pub fn new(base: &ObjectInfo) -> Self {
        let mut segments = Vec::new();
        let mut text = String::from("{");
        for (i, (class, node)) in base.classes.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(&Value::String(class.clone()).to_string());
            text.push(':');
            if file_inputs(class, node).is_empty() {
                text.push_str(&node.to_string());
            } else {
                segments.push(Segment::Text(std::mem::take(&mut text)));
                segments.push(Segment::Node {
                    class: class.clone(),
                    node: node.clone(),
                });
            }
        }
        text.push('}');
        segments.push(Segment::Text(text));
        let len_hint = segments
            .iter()
            .map(|s| match s {
                Segment::Text(t) => t.len(),
                Segment::Node { node, .. } => node.to_string().len(),
            })
            .sum();
        ViewTemplate { segments, len_hint }
    }

    /// The participant's `/object_info` body.
    pub fn render(&self, files: &UserFiles) -> String {
        let mut out = String::with_capacity(self.len_hint + 1024);
        for seg in &self.segments {
            match seg {
                Segment::Text(t) => out.push_str(t),
                Segment::Node { class, node } => {
                    let patched = participant_node(class, node, files);
                    out.push_str(&patched.as_ref().unwrap_or(node).to_string());
                }
            }
        }
        out
    }

    /// Node classes that get patched per participant.
    pub fn patched_classes(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Node { class, .. } => Some(class.as_str()),
            Segment::Text(_) => None,
        })
    }
}

fn num(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64)
}

impl ObjectInfo {
    /// Wraps a parsed `/object_info` document.
    pub fn from_value(value: Value) -> Result<Self, ObjectInfoError> {
        match value {
            Value::Object(classes) => Ok(ObjectInfo { classes }),
            other => Err(ObjectInfoError::NotAnObject(crate::py::type_name(&other))),
        }
    }

    pub fn from_map(classes: Map<String, Value>) -> Self {
        ObjectInfo { classes }
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        &self.classes
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.classes)
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    pub fn classes(&self) -> impl Iterator<Item = &str> {
        self.classes.keys().map(String::as_str)
    }

    /// The info of one node class.
    pub fn get(&self, class: &str) -> Option<&Value> {
        self.classes.get(class)
    }

    /// `OUTPUT_NODE is True`.
    pub fn is_output_node(&self, class: &str) -> bool {
        self.get(class)
            .and_then(|n| obj_get(n, "output_node"))
            .is_some_and(|v| v == &Value::Bool(true))
    }

    /// v3 (`comfy_api`) nodes publish `output_matchtypes`; v1 nodes never do.
    pub(crate) fn is_v3(&self, class: &str) -> bool {
        self.get(class)
            .is_some_and(|n| obj_get(n, "output_matchtypes").is_some())
    }

    /// `RETURN_TYPES` as published (entries may be strings or, for combo outputs, lists).
    pub(crate) fn raw_output_types(&self, class: &str) -> &[Value] {
        self.get(class)
            .and_then(|n| obj_get(n, "output"))
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    /// Output socket types; a combo output (a list of choices) is reported as `"COMBO"`.
    pub fn output_types(&self, class: &str) -> Vec<String> {
        self.raw_output_types(class)
            .iter()
            .map(|t| t.as_str().unwrap_or("COMBO").to_owned())
            .collect()
    }

    /// The spec of one input, searching required, optional, then hidden.
    pub fn input_spec(&self, class: &str, name: &str) -> Option<InputSpec> {
        let input = obj_get(self.get(class)?, "input")?;
        for (cat, category) in [
            ("required", InputCategory::Required),
            ("optional", InputCategory::Optional),
            ("hidden", InputCategory::Hidden),
        ] {
            if let Some(raw) = obj_get(input, cat).and_then(|s| obj_get(s, name)) {
                return Some(Self::parse_spec(class, name, category, raw));
            }
        }
        None
    }

    fn parse_spec(class: &str, name: &str, category: InputCategory, raw: &Value) -> InputSpec {
        let options = spec_options(raw).cloned().unwrap_or_default();
        let head = raw.as_array().and_then(|a| a.first()).unwrap_or(raw);
        let kind = if category == InputCategory::Hidden {
            InputKind::Hidden(head.as_str().unwrap_or_default().to_owned())
        } else {
            let number = || NumberSpec {
                min: num(options.get("min")),
                max: num(options.get("max")),
                step: num(options.get("step")),
                default: num(options.get("default")),
            };
            match head {
                Value::Array(choices) => InputKind::Combo {
                    choices: choices.clone(),
                    default: options.get("default").cloned(),
                    remote: false,
                },
                Value::String(t) => match t.as_str() {
                    "INT" => InputKind::Int(number()),
                    "FLOAT" => InputKind::Float(number()),
                    "STRING" => InputKind::String {
                        default: options
                            .get("default")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        multiline: options.get("multiline") == Some(&Value::Bool(true)),
                    },
                    "BOOLEAN" => InputKind::Boolean {
                        default: options.get("default").and_then(Value::as_bool),
                    },
                    "COMBO" => InputKind::Combo {
                        choices: options
                            .get("options")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default(),
                        default: options.get("default").cloned(),
                        remote: options.contains_key("remote"),
                    },
                    other => InputKind::Other(other.to_owned()),
                },
                other => InputKind::Other(other.to_string()),
            }
        };
        let upload = match category {
            InputCategory::Hidden => None,
            _ => upload_kind(class, name, Some(&options)),
        };
        InputSpec {
            category,
            kind,
            options,
            upload,
            raw: raw.clone(),
        }
    }

    /// The participant's copy of one class (for `/object_info/{class}`): patched when it has
    /// file inputs, borrowed otherwise.
    pub fn participant_node(&self, class: &str, files: &UserFiles) -> Option<Cow<'_, Value>> {
        let node = self.get(class)?;
        Some(participant_node(class, node, files).map_or(Cow::Borrowed(node), Cow::Owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info() -> ObjectInfo {
        ObjectInfo::from_value(json!({
            "EmptyImage": {"input": {"required": {
                "width": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
                "flag": ["BOOLEAN", {"default": true}],
                "text": ["STRING", {"multiline": true, "default": "hi"}],
                "f": ["FLOAT"]
            }, "hidden": {"prompt": "PROMPT", "uid": ["UNIQUE_ID"]}},
            "output": ["IMAGE"], "output_node": false},
            "LoadImage": {"input": {"required": {"image": [["a.png"], {"image_upload": true}]}},
                "output": ["IMAGE", "MASK"], "output_node": false},
            "V3": {"input": {"optional": {"mode": ["COMBO", {"options": ["x", "y"], "default": "x"}]}},
                "output": [["p", "q"]], "output_node": true, "output_matchtypes": null}
        }))
        .unwrap()
    }

    #[test]
    fn specs_parse_in_both_list_forms() {
        let info = info();
        let w = info.input_spec("EmptyImage", "width").unwrap();
        assert_eq!(w.category, InputCategory::Required);
        assert_eq!(
            w.kind,
            InputKind::Int(NumberSpec {
                min: Some(1.0),
                max: Some(16384.0),
                step: Some(1.0),
                default: Some(512.0)
            })
        );
        assert_eq!(
            info.input_spec("EmptyImage", "flag").unwrap().kind,
            InputKind::Boolean {
                default: Some(true)
            }
        );
        assert_eq!(
            info.input_spec("EmptyImage", "text").unwrap().kind,
            InputKind::String {
                default: Some("hi".into()),
                multiline: true
            }
        );
        assert_eq!(
            info.input_spec("EmptyImage", "f").unwrap().kind,
            InputKind::Float(NumberSpec::default())
        );
        assert_eq!(
            info.input_spec("EmptyImage", "prompt").unwrap().kind,
            InputKind::Hidden("PROMPT".into())
        );
        assert_eq!(
            info.input_spec("EmptyImage", "uid").unwrap().kind,
            InputKind::Hidden("UNIQUE_ID".into())
        );
        let img = info.input_spec("LoadImage", "image").unwrap();
        assert_eq!(img.upload, Some(FileKind::Image));
        assert!(
            matches!(img.kind, InputKind::Combo { ref choices, .. } if choices == &[json!("a.png")])
        );
        let mode = info.input_spec("V3", "mode").unwrap();
        assert_eq!(mode.category, InputCategory::Optional);
        assert_eq!(
            mode.kind,
            InputKind::Combo {
                choices: vec![json!("x"), json!("y")],
                default: Some(json!("x")),
                remote: false
            }
        );
        assert!(info.input_spec("V3", "nope").is_none());
        assert!(info.is_output_node("V3"));
        assert!(!info.is_output_node("LoadImage"));
        assert_eq!(info.output_types("LoadImage"), ["IMAGE", "MASK"]);
        assert_eq!(info.output_types("V3"), ["COMBO"]);
        assert!(info.is_v3("V3") && !info.is_v3("LoadImage"));
    }

    #[test]
    fn user_files_by_kind_are_sorted_and_filtered() {
        let files = UserFiles {
            outputs: Vec::new(),
            images: vec!["b.png".into(), "a.png".into(), "a.png".into()],
            videos: vec![],
            audio: vec![],
            all: vec![
                "3d/m.GLB".into(),
                "x.latent".into(),
                "3d/readme.txt".into(),
                "m.glb".into(),
            ],
        };
        assert_eq!(files.for_kind(FileKind::Image), ["a.png", "b.png"]);
        assert_eq!(files.for_kind(FileKind::Model3d), ["3d/m.GLB"]);
        assert_eq!(files.for_kind(FileKind::Latent), ["x.latent"]);
    }
}
