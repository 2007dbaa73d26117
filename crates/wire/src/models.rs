//! The model files the GPU servers have, read from the node definitions: each loader's
//! choices, by ComfyUI's model folder (`UNETLoader.unet_name` -> `diffusion_models`, ...).
//! The Model Library (`/models/{folder}`, `/experiment/models/{folder}`) lists them, and a
//! model dragged onto the canvas becomes the loader the frontend registers for its folder.

use std::collections::BTreeMap;

use crate::object_info::{InputKind, ObjectInfo};

/// ComfyUI's model folder keys, in the order `GET /models` lists them.
pub const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "latent_upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

/// (folder, loader class, input): whose choices are that folder's files. The first of each
/// folder are the frontend 1.37.11's own registrations (its `useModelToNodeStore`); the rest
/// are ComfyUI's other loaders of the same folders.
pub const MODEL_LOADERS: &[(&str, &str, &str)] = &[
    ("checkpoints", "CheckpointLoaderSimple", "ckpt_name"),
    ("checkpoints", "ImageOnlyCheckpointLoader", "ckpt_name"),
    ("checkpoints", "CheckpointLoader", "ckpt_name"),
    ("checkpoints", "unCLIPCheckpointLoader", "ckpt_name"),
    ("checkpoints", "LTXAVTextEncoderLoader", "ckpt_name"),
    ("checkpoints", "LTXVAudioVAELoader", "ckpt_name"),
    ("configs", "CheckpointLoader", "config_name"),
    ("loras", "LoraLoader", "lora_name"),
    ("loras", "LoraLoaderModelOnly", "lora_name"),
    ("vae", "VAELoader", "vae_name"),
    ("controlnet", "ControlNetLoader", "control_net_name"),
    ("controlnet", "DiffControlNetLoader", "control_net_name"),
    ("diffusion_models", "UNETLoader", "unet_name"),
    ("upscale_models", "UpscaleModelLoader", "model_name"),
    ("style_models", "StyleModelLoader", "style_model_name"),
    ("gligen", "GLIGENLoader", "gligen_name"),
    ("clip_vision", "CLIPVisionLoader", "clip_name"),
    ("text_encoders", "CLIPLoader", "clip_name"),
    ("text_encoders", "DualCLIPLoader", "clip_name1"),
    ("text_encoders", "DualCLIPLoader", "clip_name2"),
    ("text_encoders", "TripleCLIPLoader", "clip_name1"),
    ("text_encoders", "TripleCLIPLoader", "clip_name2"),
    ("text_encoders", "TripleCLIPLoader", "clip_name3"),
    ("text_encoders", "QuadrupleCLIPLoader", "clip_name1"),
    ("text_encoders", "QuadrupleCLIPLoader", "clip_name2"),
    ("text_encoders", "QuadrupleCLIPLoader", "clip_name3"),
    ("text_encoders", "QuadrupleCLIPLoader", "clip_name4"),
    ("text_encoders", "LTXAVTextEncoderLoader", "text_encoder"),
    ("audio_encoders", "AudioEncoderLoader", "audio_encoder_name"),
    ("model_patches", "ModelPatchLoader", "name"),
    (
        "latent_upscale_models",
        "LatentUpscaleModelLoader",
        "model_name",
    ),
    ("hypernetworks", "HypernetworkLoader", "hypernetwork_name"),
    ("photomaker", "PhotoMakerLoader", "photomaker_model_name"),
];

/// File endings of model weights.
pub const WEIGHT_EXTENSIONS: &[&str] = &[
    ".safetensors",
    ".sft",
    ".ckpt",
    ".pt",
    ".pt2",
    ".pth",
    ".bin",
    ".gguf",
];

/// Model files that are not weights but live in model folders too.
const CONFIG_EXTENSIONS: &[&str] = &[".onnx", ".yaml", ".json"];

/// Whether `name` is a model's weights (by its ending, any case).
pub fn is_weights(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    WEIGHT_EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

/// Whether `name` is a file a model folder holds: weights or a config. Loader lists also
/// hold entries that are no files (`VAELoader`'s `pixel_space`, `taesd`): those are not.
fn is_model_file(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    is_weights(name) || CONFIG_EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

/// Every folder's model files (sorted, each once) from the loaders' choices in `info`.
/// Folders without any file are absent.
pub fn model_files(info: &ObjectInfo) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (folder, class, input) in MODEL_LOADERS {
        let Some(spec) = info.input_spec(class, input) else {
            continue;
        };
        let InputKind::Combo { choices, .. } = spec.kind else {
            continue;
        };
        let files = choices
            .iter()
            .filter_map(|c| c.as_str())
            .filter(|c| is_model_file(c))
            .map(str::to_owned);
        out.entry((*folder).to_owned()).or_default().extend(files);
    }
    for files in out.values_mut() {
        files.sort();
        files.dedup();
    }
    out.retain(|_, files| !files.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn loader_choices_become_folders() {
        let info = ObjectInfo::from_value(json!({
            "UNETLoader": {"input": {"required": {
                "unet_name": [["flux-2-klein-4b.safetensors", "a.gguf"]],
                "weight_dtype": [["default", "fp8_e4m3fn"]]}}},
            "VAELoader": {"input": {"required": {"vae_name": [["pixel_space", "taesd", "flux2-vae.safetensors"]]}}},
            "DualCLIPLoader": {"input": {"required": {
                "clip_name1": [["t5.safetensors", "clip_l.safetensors"]],
                "clip_name2": [["clip_l.safetensors"]]}}},
            "CLIPLoader": {"input": {"required": {"clip_name": [["t5.safetensors"]]}}},
            // The v3 COMBO form.
            "LTXVAudioVAELoader": {"input": {"required": {
                "ckpt_name": ["COMBO", {"options": ["ltx-2.safetensors"]}]}}},
            "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [[]]}}},
            "LoraLoader": {"input": {"required": {"lora_name": "not a spec"}}},
        }))
        .unwrap();
        let m = model_files(&info);
        assert_eq!(
            m["diffusion_models"],
            ["a.gguf", "flux-2-klein-4b.safetensors"]
        );
        assert_eq!(m["vae"], ["flux2-vae.safetensors"]);
        assert_eq!(m["text_encoders"], ["clip_l.safetensors", "t5.safetensors"]);
        assert_eq!(m["checkpoints"], ["ltx-2.safetensors"]);
        assert!(!m.contains_key("loras"), "no files, no folder");
        assert!(m.keys().all(|f| MODEL_FOLDERS.contains(&f.as_str())));
    }

    #[test]
    fn every_loader_folder_is_a_comfyui_folder() {
        for (folder, _, _) in MODEL_LOADERS {
            assert!(MODEL_FOLDERS.contains(folder), "{folder}");
        }
    }
}
