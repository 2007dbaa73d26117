//! Driving one ComfyUI server: its HTTP/WebSocket client ([`client`]), one
//! job's state machine ([`run`]) and where the job's outputs are stored
//! ([`outputs`]). `comfyume serve` uses it as its `comfyui` backend; the worker
//! agent in the GPU image uses it to run the one job it is given.

mod client;
mod job;
pub mod outputs;
mod run;
mod socket;
pub mod telemetry;

pub use client::ComfyUiBackend;
pub use job::{
    BackendError, BackendEvent, EventTx, InputFile, JobSpec, Outcome, OutcomeKind, Timeouts,
};

use serde_json::Value;

/// The model files a prompt loads: string input values that name weights,
/// sorted and de-duplicated. The dispatcher prefers the backend that last ran
/// the same set (its models are still in VRAM).
pub fn model_files(prompt: &Value) -> Vec<String> {
    let mut out: Vec<String> = prompt
        .as_object()
        .into_iter()
        .flat_map(|nodes| nodes.values())
        .filter_map(|node| node.get("inputs").and_then(Value::as_object))
        .flat_map(|inputs| inputs.values())
        .filter_map(Value::as_str)
        .filter(|s| comfyume_wire::models::is_weights(s))
        .map(str::to_owned)
        .collect();
    out.sort();
    out.dedup();
    out
}
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn model_files_are_sorted_and_unique() {
        let prompt = json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "b.GGUF", "type": "flux2"}},
            "3": {"class_type": "VAELoader", "inputs": {"vae_name": "flux.safetensors"}},
            "4": {"class_type": "LoraLoader", "inputs": {"lora_name": "style.pt", "strength": 1.0, "model": ["1", 0]}},
            "5": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
            "6": {"class_type": "X", "inputs": {"a": "m.ckpt", "b": "m.pth", "c": "m.bin", "d": "m.sft", "e": "notes.txt"}}
        });
        assert_eq!(
            model_files(&prompt),
            [
                "b.GGUF",
                "flux.safetensors",
                "m.bin",
                "m.ckpt",
                "m.pth",
                "m.sft",
                "style.pt"
            ]
        );
        assert!(model_files(&json!([])).is_empty());
    }
}
