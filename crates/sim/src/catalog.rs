//! The node set the simulator serves: `/object_info` plus the lookups validation and execution need.

use serde_json::{Map, Value};
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
const MODEL_EXTENSIONS: &[&str] = &[
    ".safetensors",
    ".sft",
    ".ckpt",
    ".pt",
    ".pt2",
    ".pth",
    ".bin",
    ".gguf",
];

/// Which half of an input spec a name was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputCategory {
    Required,
    Optional,
}

#[derive(Debug)]
pub struct Catalog {
    /// `true` for the simulator's own node set (full validation, real node behaviour).
    pub builtin: bool,
    /// `"builtin"` or the path of the served file.
    pub source: String,
    info: Map<String, Value>,
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
        let cached_text = Some(crate::pyjson::to_string(&Value::Object(info.clone())));
        Ok(Self {
            builtin: false,
            source: path.display().to_string(),
            info,
            cached_text,
        })
    }

    pub fn load(path: Option<&PathBuf>) -> Result<Self, SimError> {
        match path {
            Some(p) => Self::from_file(p),
            None => Ok(Self::builtin()),
        }
    }

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

    /// Required and optional input names with their specs, in ComfyUI's iteration order
    /// (required first, then optional).
    pub fn inputs(&self, class: &str) -> Vec<(String, InputCategory, Value)> {
        let mut out = Vec::new();
        let Some(input) = self
            .class(class)
            .and_then(|c| c.get("input"))
            .and_then(Value::as_object)
        else {
            return out;
        };
        for (key, cat) in [
            ("required", InputCategory::Required),
            ("optional", InputCategory::Optional),
        ] {
            if let Some(map) = input.get(key).and_then(Value::as_object) {
                for (name, spec) in map {
                    out.push((name.clone(), cat, spec.clone()));
                }
            }
        }
        out
    }

    #[cfg(test)]
    pub fn input_spec(&self, class: &str, name: &str) -> Option<Value> {
        self.inputs(class)
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s)
    }

    /// True where an unlisted model-looking file name is still accepted (see [`MODEL_INPUTS`]).
    pub fn lenient_model_choice(&self, class: &str, input: &str, value: &Value) -> bool {
        self.builtin
            && MODEL_INPUTS.contains(&(class, input))
            && value.as_str().is_some_and(|s| {
                let lower = s.to_ascii_lowercase();
                MODEL_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
            })
    }

    /// The `/object_info` document as JSON text. The built-in `LoadImage` lists the current
    /// input files, like ComfyUI does.
    pub fn object_info_text(&self, input_files: &[String]) -> String {
        if let Some(text) = &self.cached_text {
            return text.clone();
        }
        crate::pyjson::to_string(&Value::Object(self.object_info_map(input_files)))
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

/// Replace the choice list of a combo input, whichever of ComfyUI's two spellings it uses:
/// `[[choices], {...}]` or `["COMBO", {"options": [choices], ...}]`.
fn set_choices(info: &mut Map<String, Value>, class: &str, input: &str, choices: &[&str]) {
    let list = Value::Array(
        choices
            .iter()
            .map(|s| Value::String(s.to_string()))
            .collect(),
    );
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
        if spec.first().is_some_and(Value::is_array) {
            spec[0] = list.clone();
        } else if spec.first().and_then(Value::as_str) == Some("COMBO")
            && let Some(opts) = spec.get_mut(1).and_then(Value::as_object_mut)
        {
            opts.insert("options".into(), list.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
