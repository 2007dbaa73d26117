//! The node set the simulator serves: `/object_info` plus the lookups validation and execution need.

use comfyume_wire::shapes::to_python_json;
use comfyume_wire::{ObjectInfo, PromptError, UserFiles, ValidPrompt, validate_prompt_with_files};
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::SimError;

/// Input specs copied from ComfyUI v0.11.0's `/object_info` by `tools/extract_object_info.py`.
const BUILTIN_OBJECT_INFO: &str = include_str!("data/builtin_object_info.json");

/// Model files the simulated server pretends to have (the capture had none).
/// Placeholders named like the workshop templates' models, so the templates validate.
const UNET_FILES: &[&str] = &[
    "flux-2-klein-4b.safetensors",
    "flux-2-klein-9b.safetensors",
    "flux-2-klein-base-9b.safetensors",
];
const CLIP_FILES: &[&str] = &[
    "qwen_3_4b.safetensors",
    "qwen_3_8b.safetensors",
    "qwen_3_8b_fp8mixed.safetensors",
    "gemma_3_12B_it.safetensors",
    "gemma_3_12B_it_fp4_mixed.safetensors",
];
const VAE_FILES: &[&str] = &["flux2-vae.safetensors", "ltx-2-vae.safetensors"];
const CKPT_FILES: &[&str] = &[
    "ltx-2-19b-dev-fp8.safetensors",
    "ltx-2-19b-distilled-fp8.safetensors",
    "ltx-2-19b-dev.safetensors",
    "ltx-2-19b-distilled.safetensors",
    // What the stock frontend's default graph loads.
    "v1-5-pruned-emaonly-fp16.safetensors",
];
const LORA_FILES: &[&str] = &["ltx-2-19b-distilled-lora-384.safetensors"];

/// `(class, input)` pairs whose choices are model files. A file name that is not listed is still
/// accepted there when it looks like a model file: the simulator has no real models, and the
/// workshop templates may name files this list does not know.
const MODEL_INPUTS: &[(&str, &str)] = &[
    ("UNETLoader", "unet_name"),
    ("CLIPLoader", "clip_name"),
    ("VAELoader", "vae_name"),
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("LTXAVTextEncoderLoader", "text_encoder"),
    ("LTXAVTextEncoderLoader", "ckpt_name"),
    ("LTXVAudioVAELoader", "ckpt_name"),
    ("LoraLoader", "lora_name"),
];

#[derive(Debug)]
pub struct Catalog {
    /// `true` for the simulator's own node set (full validation, real node behaviour).
    pub builtin: bool,
    /// `"builtin"` or the path of the served file.
    pub source: String,
    info: Map<String, Value>,
    /// What `POST /prompt` is validated against (see [`Catalog::validation_view`]).
    validation: ObjectInfo,
    /// External documents can be large; serialise them once.
    cached_text: Option<String>,
}

impl Catalog {
    pub fn builtin() -> Self {
        let mut info: Map<String, Value> = serde_json::from_str(BUILTIN_OBJECT_INFO)
            .expect("embedded builtin_object_info.json is valid JSON");
        set_choices(&mut info, "UNETLoader", "unet_name", UNET_FILES);
        set_choices(&mut info, "CLIPLoader", "clip_name", CLIP_FILES);
        let mut vae: Vec<&str> = VAE_FILES.to_vec();
        vae.push("pixel_space");
        set_choices(&mut info, "VAELoader", "vae_name", &vae);
        set_choices(&mut info, "CheckpointLoaderSimple", "ckpt_name", CKPT_FILES);
        set_choices(
            &mut info,
            "LTXAVTextEncoderLoader",
            "text_encoder",
            CLIP_FILES,
        );
        set_choices(&mut info, "LTXAVTextEncoderLoader", "ckpt_name", CKPT_FILES);
        set_choices(&mut info, "LTXVAudioVAELoader", "ckpt_name", CKPT_FILES);
        set_choices(&mut info, "LoraLoader", "lora_name", LORA_FILES);
        Self {
            builtin: true,
            source: "builtin".into(),
            validation: ObjectInfo::from_map(info.clone()),
            info,
            cached_text: None,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::ObjectInfo {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| SimError::ObjectInfo {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let Value::Object(info) = value else {
            return Err(SimError::ObjectInfo {
                path: path.to_path_buf(),
                reason: "not a JSON object of node classes".into(),
            });
        };
        let cached_text = Some(to_python_json(&Value::Object(info.clone())));
        Ok(Self {
            builtin: false,
            source: path.display().to_string(),
            validation: ObjectInfo::from_map(any_inputs(&info)),
            info,
            cached_text,
        })
    }

    /// The model files the simulated server has in a model folder (`/models/{folder}`); a served
    /// node set has none that the simulator knows of.
    pub fn model_files(&self, folder: &str) -> Vec<&'static str> {
        if !self.builtin {
            return Vec::new();
        }
        match folder {
            "diffusion_models" => UNET_FILES.to_vec(),
            "text_encoders" => CLIP_FILES.to_vec(),
            "vae" => VAE_FILES.to_vec(),
            "checkpoints" => CKPT_FILES.to_vec(),
            "loras" => LORA_FILES.to_vec(),
            _ => Vec::new(),
        }
    }

    pub fn load(path: Option<&PathBuf>) -> Result<Self, SimError> {
        match path {
            Some(p) => Self::from_file(p),
            None => Ok(Self::builtin()),
        }
    }

    #[cfg(test)]
    pub fn has(&self, class: &str) -> bool {
        self.info.contains_key(class)
    }

    pub fn class(&self, class: &str) -> Option<&Map<String, Value>> {
        self.info.get(class).and_then(Value::as_object)
    }

    pub fn is_output(&self, class: &str) -> bool {
        self.class(class)
            .and_then(|c| c.get("output_node"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The `RETURN_TYPES`; a list-valued type (a combo output) reads as `"COMBO"`.
    pub fn output_types(&self, class: &str) -> Vec<String> {
        self.class(class)
            .and_then(|c| c.get("output"))
            .and_then(Value::as_array)
            .map(|outs| {
                outs.iter()
                    .map(|o| o.as_str().unwrap_or("COMBO").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[cfg(test)]
    pub fn input_spec(&self, class: &str, name: &str) -> Option<Value> {
        let input = self.class(class)?.get("input")?;
        ["required", "optional"]
            .iter()
            .find_map(|cat| input.get(*cat)?.get(name).cloned())
    }

    /// The node set `POST /prompt` is validated against (the input files for LoadImage and
    /// friends come separately, see [`Catalog::validate`]), adjusted for the simulator's own acceptance rules:
    /// * built-in set: an unlisted model-looking file name at a [`MODEL_INPUTS`] input is
    ///   added to that input's choices (the simulator has no real models);
    /// * served file: every input is an optional `*`, so any prompt whose classes exist and
    ///   whose links resolve is accepted (the simulator cannot know those nodes' rules).
    fn validation_view(&self, prompt: Option<&Value>) -> Cow<'_, ObjectInfo> {
        if !self.builtin {
            return Cow::Borrowed(&self.validation);
        }
        let mut extra: Vec<(&str, &str, &str)> = Vec::new();
        for node in prompt
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.values())
        {
            let Some(class) = node.get("class_type").and_then(Value::as_str) else {
                continue;
            };
            let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
                continue;
            };
            for (c, input) in MODEL_INPUTS.iter().filter(|(c, _)| *c == class) {
                if let Some(file) = inputs.get(*input).and_then(Value::as_str)
                    && looks_like_model(file)
                    && !self.has_choice(c, input, file)
                {
                    extra.push((c, input, file));
                }
            }
        }
        if extra.is_empty() {
            return Cow::Borrowed(&self.validation);
        }
        let mut info = self.info.clone();
        for (class, input, file) in extra {
            add_choice(&mut info, class, input, file);
        }
        Cow::Owned(ObjectInfo::from_map(info))
    }

    /// `POST /prompt` validation as the gateway does it, against [`Catalog::validation_view`],
    /// with `input_files` (names relative to `input/`) as what file-loading nodes may name.
    pub fn validate(
        &self,
        body: &Value,
        input_files: Vec<String>,
    ) -> Result<ValidPrompt, PromptError> {
        // The simulator does not sort files by kind: every input file counts for every loader,
        // as its LoadImage list shows them all.
        let files = UserFiles {
            outputs: Vec::new(),
            images: input_files.clone(),
            videos: input_files.clone(),
            audio: input_files.clone(),
            all: input_files,
        };
        let view = self.validation_view(body.get("prompt"));
        validate_prompt_with_files(body, &view, &files)
    }

    fn has_choice(&self, class: &str, input: &str, file: &str) -> bool {
        self.input_choices(class, input)
            .is_some_and(|c| c.iter().any(|v| v.as_str() == Some(file)))
    }

    fn input_choices(&self, class: &str, input: &str) -> Option<&Vec<Value>> {
        let spec = ["required", "optional"].iter().find_map(|cat| {
            self.class(class)?
                .get("input")?
                .get(*cat)?
                .get(input)?
                .as_array()
        })?;
        match spec.first()? {
            Value::Array(choices) => Some(choices),
            Value::String(t) if t == "COMBO" => spec.get(1)?.get("options")?.as_array(),
            _ => None,
        }
    }

    /// The `/object_info` document as JSON text. The built-in `LoadImage` lists the current
    /// input files, like ComfyUI does.
    pub fn object_info_text(&self, input_files: &[String]) -> String {
        if let Some(text) = &self.cached_text {
            return text.clone();
        }
        to_python_json(&Value::Object(self.object_info_map(input_files)))
    }

    fn object_info_map(&self, input_files: &[String]) -> Map<String, Value> {
        let mut info = self.info.clone();
        if self.builtin {
            let files: Vec<&str> = input_files.iter().map(String::as_str).collect();
            set_choices(&mut info, "LoadImage", "image", &files);
        }
        info
    }

    /// `/object_info/{class}`: `{class: info}`, or `{}` for an unknown class.
    pub fn object_info_one(&self, class: &str, input_files: &[String]) -> Value {
        let mut out = Map::new();
        if let Some(v) = self.object_info_map_one(class, input_files) {
            out.insert(class.to_string(), v);
        }
        Value::Object(out)
    }

    fn object_info_map_one(&self, class: &str, input_files: &[String]) -> Option<Value> {
        let v = self.info.get(class)?;
        if self.builtin && class == "LoadImage" {
            return self.object_info_map(input_files).remove(class);
        }
        Some(v.clone())
    }

    pub fn len(&self) -> usize {
        self.info.len()
    }
}

fn looks_like_model(file: &str) -> bool {
    comfyume_wire::models::is_weights(file)
}

/// Append `choice` to a combo input's list.
fn add_choice(info: &mut Map<String, Value>, class: &str, input: &str, choice: &str) {
    edit_choices(info, class, input, |list| {
        list.push(Value::String(choice.to_string()))
    });
}

/// A served node set with every input turned into an optional `["*", {}]`: validation then
/// only checks that classes exist, links resolve and outputs are reached.
fn any_inputs(info: &Map<String, Value>) -> Map<String, Value> {
    let mut out = info.clone();
    for node in out.values_mut() {
        let Some(input) = node.get_mut("input").and_then(Value::as_object_mut) else {
            continue;
        };
        let mut any = Map::new();
        for cat in ["required", "optional"] {
            if let Some(section) = input.get(cat).and_then(Value::as_object) {
                for name in section.keys() {
                    any.insert(name.clone(), json!(["*", {}]));
                }
            }
        }
        input.remove("required");
        input.insert("optional".into(), Value::Object(any));
    }
    out
}

/// Replace the choice list of a combo input.
fn set_choices(info: &mut Map<String, Value>, class: &str, input: &str, choices: &[&str]) {
    edit_choices(info, class, input, |list| {
        *list = choices
            .iter()
            .map(|s| Value::String(s.to_string()))
            .collect();
    });
}

/// Apply `edit` to the choice list of a combo input, whichever of ComfyUI's two spellings it
/// uses: `[[choices], {...}]` or `["COMBO", {"options": [choices], ...}]`.
fn edit_choices(
    info: &mut Map<String, Value>,
    class: &str,
    input: &str,
    mut edit: impl FnMut(&mut Vec<Value>),
) {
    let Some(node_inputs) = info
        .get_mut(class)
        .and_then(|c| c.get_mut("input"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    for cat in ["required", "optional"] {
        let Some(spec) = node_inputs
            .get_mut(cat)
            .and_then(|m| m.get_mut(input))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        let list = match spec.first_mut() {
            Some(Value::Array(list)) => Some(list),
            Some(Value::String(t)) if t == "COMBO" => spec
                .get_mut(1)
                .and_then(Value::as_object_mut)
                .and_then(|o| {
                    o.entry("options")
                        .or_insert_with(|| Value::Array(Vec::new()))
                        .as_array_mut()
                }),
            _ => None,
        };
        if let Some(list) = list {
            edit(list);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builtin_has_every_template_node() {
        let c = Catalog::builtin();
        assert_eq!(c.len(), 45);
        for n in [
            "UNETLoader",
            "CLIPLoader",
            "SamplerCustomAdvanced",
            "SaveVideo",
            "LoadImage",
            "ImageScale",
            "KSampler",
            "EmptyLatentImage",
            "PreviewAny",
        ] {
            assert!(c.has(n), "{n}");
        }
        assert!(c.is_output("SaveImage"));
        assert!(!c.is_output("VAEDecode"));
        assert_eq!(
            c.output_types("CheckpointLoaderSimple"),
            ["MODEL", "CLIP", "VAE"]
        );
        let clip_types = c.input_spec("CLIPLoader", "type").unwrap();
        let types = clip_types[0].as_array().unwrap();
        assert!(types.contains(&Value::from("flux2")) && types.contains(&Value::from("ltxv")));
        let unet = c.input_spec("UNETLoader", "unet_name").unwrap();
        assert!(
            unet[0]
                .as_array()
                .unwrap()
                .contains(&Value::from("flux-2-klein-9b.safetensors"))
        );
        let te = c
            .input_spec("LTXAVTextEncoderLoader", "text_encoder")
            .unwrap();
        assert!(!te[1]["options"].as_array().unwrap().is_empty());
        let lora = c.input_spec("LoraLoader", "lora_name").unwrap();
        assert!(!lora[0].as_array().unwrap().is_empty());
        assert!(c.is_output("PreviewAny"));
        assert_eq!(c.output_types("KSampler"), ["LATENT"]);
    }

    #[test]
    fn load_image_lists_input_files() {
        let c = Catalog::builtin();
        let one = c.object_info_one("LoadImage", &["a.png".into()]);
        assert_eq!(
            one["LoadImage"]["input"]["required"]["image"][0],
            serde_json::json!(["a.png"])
        );
        assert_eq!(c.object_info_one("NoSuchNode", &[]), serde_json::json!({}));
    }

    fn flux(unet: &str, vae: &str) -> Value {
        json!({"prompt": {
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
            "2": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
            "4": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["3", 0]}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}
        }})
    }

    #[test]
    fn model_files_are_lenient_but_other_combos_are_not() {
        let c = Catalog::builtin();
        assert!(
            c.validate(&flux("a.safetensors", "other.SFT"), vec![])
                .is_ok()
        );
        // Node 1 is not reachable from the output, so it is not validated.
        assert!(
            c.validate(&flux("notes.txt", "flux2-vae.safetensors"), vec![])
                .is_ok()
        );
        let e = c
            .validate(&flux("a.safetensors", "notes.txt"), vec![])
            .unwrap_err();
        assert_eq!(
            e.node_errors()["3"]["errors"][0]["type"],
            "value_not_in_list"
        );
        assert_eq!(
            e.node_errors()["3"]["errors"][0]["details"],
            "vae_name: 'notes.txt' not in ['flux2-vae.safetensors', 'ltx-2-vae.safetensors', 'pixel_space']"
        );
        // The extra choice is only in the validation view, never in what /object_info serves.
        assert!(!c.has_choice("VAELoader", "vae_name", "other.SFT"));
    }

    #[test]
    fn load_image_checks_the_input_files() {
        let c = Catalog::builtin();
        let body = json!({"prompt": {
            "1": {"class_type": "LoadImage", "inputs": {"image": "up.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }});
        assert!(c.validate(&body, vec!["up.png".into()]).is_ok());
        let e = c.validate(&body, vec!["other.png".into()]).unwrap_err();
        assert_eq!(
            e.node_errors()["1"]["errors"][0],
            json!({"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": "image - Invalid image file: up.png", "extra_info": {"input_name": "image"}})
        );
    }

    #[test]
    fn served_node_sets_only_need_existing_classes_and_links() {
        let mut info = Map::new();
        info.insert(
            "Gen".into(),
            json!({"input": {"required": {"steps": ["INT", {"min": 1}], "mode": [["a", "b"], {}]}}, "output": ["IMAGE"], "output_node": false}),
        );
        info.insert(
            "Out".into(),
            json!({"input": {"required": {"images": ["IMAGE", {}], "prefix": ["STRING", {}]}}, "output": [], "output_node": true}),
        );
        let c = Catalog {
            builtin: false,
            source: "test".into(),
            validation: ObjectInfo::from_map(any_inputs(&info)),
            info,
            cached_text: None,
        };
        let ok = json!({"prompt": {
            "1": {"class_type": "Gen", "inputs": {"steps": 0, "mode": "zzz"}},
            "2": {"class_type": "Out", "inputs": {"images": ["1", 0]}}
        }});
        let valid = c.validate(&ok, vec![]).unwrap();
        assert_eq!(valid.outputs_to_execute, ["2"]);
        let unknown = json!({"prompt": {"1": {"class_type": "Nope", "inputs": {}}}});
        assert_eq!(
            c.validate(&unknown, vec![]).unwrap_err().error_type(),
            "invalid_prompt"
        );
        let bad_slot = json!({"prompt": {
            "1": {"class_type": "Gen", "inputs": {}},
            "2": {"class_type": "Out", "inputs": {"images": ["1", 3]}}
        }});
        let e = c.validate(&bad_slot, vec![]).unwrap_err();
        assert_eq!(
            e.node_errors()["2"]["errors"][0]["type"],
            "exception_during_validation"
        );
    }
}
