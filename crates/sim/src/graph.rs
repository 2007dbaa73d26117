//! What a prompt asks for, read from its graph: the seed, steps and sampler of the sampler
//! behind an output node, the batch size, and a video's length, rate and size. The executor of a
//! served (external) node set has only opaque values on its links, so its placeholders are
//! stamped from here; the built-in nodes carry these along their links instead.

use serde_json::{Map, Value};
use std::collections::{HashSet, VecDeque};

/// How far lookups follow links (graphs of real workflows are far shallower).
const MAX_DEPTH: usize = 64;
/// The largest batch a placeholder is rendered for.
const MAX_BATCH: u32 = 64;

/// The sampler settings a prompt asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Asked {
    pub seed: Option<u64>,
    pub steps: Option<u32>,
    pub sampler: Option<String>,
    pub text: Option<String>,
}

impl Asked {
    /// The stamp's line: `SEED 42  STEPS 20  euler` (parts the graph does not tell are left out).
    pub fn line(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(s) = self.seed {
            parts.push(format!("SEED {s}"));
        }
        if let Some(s) = self.steps {
            parts.push(format!("STEPS {s}"));
        }
        if let Some(s) = &self.sampler {
            parts.push(s.clone());
        }
        (!parts.is_empty()).then(|| parts.join("  "))
    }
}

fn node<'p>(prompt: &'p Map<String, Value>, id: &str) -> Option<&'p Map<String, Value>> {
    prompt.get(id)?.get("inputs")?.as_object()
}

fn class<'p>(prompt: &'p Map<String, Value>, id: &str) -> &'p str {
    prompt
        .get(id)
        .and_then(|n| n.get("class_type"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The node a `["id", slot]` input links to.
fn link(v: &Value) -> Option<&str> {
    match v.as_array()?.as_slice() {
        [Value::String(id), slot] if slot.is_number() => Some(id),
        _ => None,
    }
}

/// The value of input `name`, or (when it is linked) of the primitive node behind it.
fn literal<'p>(prompt: &'p Map<String, Value>, id: &str, name: &str) -> Option<&'p Value> {
    let mut v = node(prompt, id)?.get(name)?;
    for _ in 0..MAX_DEPTH {
        let Some(from) = link(v) else {
            return Some(v);
        };
        let inputs = node(prompt, from)?;
        v = ["value", name, "seed", "noise_seed", "int", "number"]
            .iter()
            .find_map(|k| inputs.get(*k))?;
    }
    None
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

fn linked<'p>(prompt: &'p Map<String, Value>, id: &str, name: &str) -> Option<&'p str> {
    link(node(prompt, id)?.get(name)?)
}

/// Every node `from` depends on, nearest first (breadth first, each once).
fn upstream(prompt: &Map<String, Value>, from: &str) -> Vec<String> {
    let mut seen = HashSet::from([from.to_string()]);
    let mut queue = VecDeque::from([from.to_string()]);
    let mut out = Vec::new();
    while let Some(id) = queue.pop_front() {
        for v in node(prompt, &id).into_iter().flat_map(|m| m.values()) {
            if let Some(next) = link(v)
                && prompt.contains_key(next)
                && seen.insert(next.to_string())
            {
                out.push(next.to_string());
                queue.push_back(next.to_string());
            }
        }
    }
    out
}

fn is_sampler(prompt: &Map<String, Value>, id: &str) -> bool {
    class(prompt, id).contains("Sampler")
        && node(prompt, id).is_some_and(|m| m.contains_key("latent_image"))
}

/// The sampler nearest upstream of `from` (KSampler, KSamplerAdvanced, SamplerCustom,
/// SamplerCustomAdvanced, or another class named like a sampler that takes a `latent_image`).
pub fn sampler_of(prompt: &Map<String, Value>, from: &str) -> Option<String> {
    if is_sampler(prompt, from) {
        return Some(from.to_string());
    }
    upstream(prompt, from)
        .into_iter()
        .find(|id| is_sampler(prompt, id))
}

/// Steps of a SIGMAS source: a scheduler's `steps`, ManualSigmas' list, or what it was split from.
fn sigma_steps(prompt: &Map<String, Value>, id: &str, depth: usize) -> Option<u32> {
    if depth > MAX_DEPTH {
        return None;
    }
    if let Some(s) = literal(prompt, id, "steps").and_then(as_u64) {
        return u32::try_from(s).ok();
    }
    if let Some(text) = literal(prompt, id, "sigmas").and_then(Value::as_str) {
        let n = text
            .split(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e')))
            .filter(|t| t.parse::<f64>().is_ok())
            .count() as u32;
        return Some(n.saturating_sub(1));
    }
    let from = node(prompt, id)?.values().find_map(link)?;
    sigma_steps(prompt, from, depth + 1)
}

/// The prompt text behind a conditioning or guider input.
fn text_of(prompt: &Map<String, Value>, id: &str, depth: usize) -> Option<String> {
    if depth > MAX_DEPTH {
        return None;
    }
    for key in ["text", "prompt", "text_g"] {
        if let Some(Value::String(t)) = literal(prompt, id, key) {
            return Some(t.clone());
        }
    }
    for key in [
        "positive",
        "conditioning",
        "conditioning_1",
        "conditioning_to",
    ] {
        if let Some(from) = linked(prompt, id, key)
            && let Some(t) = text_of(prompt, from, depth + 1)
        {
            return Some(t);
        }
    }
    None
}

/// The settings of sampler node `id` as the prompt gives them.
pub fn asked(prompt: &Map<String, Value>, id: &str) -> Asked {
    let seed = ["seed", "noise_seed"]
        .iter()
        .find_map(|k| literal(prompt, id, k).and_then(as_u64))
        .or_else(|| {
            let noise = linked(prompt, id, "noise")?;
            ["noise_seed", "seed"]
                .iter()
                .find_map(|k| literal(prompt, noise, k).and_then(as_u64))
        });
    let steps = literal(prompt, id, "steps")
        .and_then(as_u64)
        .and_then(|s| u32::try_from(s).ok())
        .or_else(|| sigma_steps(prompt, linked(prompt, id, "sigmas")?, 0));
    let sampler = literal(prompt, id, "sampler_name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            let s = linked(prompt, id, "sampler")?;
            Some(
                literal(prompt, s, "sampler_name")
                    .and_then(Value::as_str)
                    .unwrap_or(class(prompt, s))
                    .to_string(),
            )
        });
    let text = ["positive", "guider"]
        .iter()
        .find_map(|k| text_of(prompt, linked(prompt, id, k)?, 0));
    Asked {
        seed,
        steps,
        sampler,
        text,
    }
}

/// The first of `names` set on `from` or (nearest first) upstream of it.
fn nearest<'p>(prompt: &'p Map<String, Value>, from: &str, names: &[&str]) -> Option<&'p Value> {
    std::iter::once(from.to_string())
        .chain(upstream(prompt, from))
        .find_map(|id| names.iter().find_map(|n| literal(prompt, &id, n)))
}

/// How many images reach `from`: the nearest `batch_size` upstream (1 when there is none).
pub fn batch_size(prompt: &Map<String, Value>, from: &str) -> u32 {
    nearest(prompt, from, &["batch_size"])
        .and_then(as_u64)
        .map_or(1, |b| b.clamp(1, u64::from(MAX_BATCH)) as u32)
}

/// A video's frame count, rate and size as the nodes upstream of `from` ask for them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoShape {
    pub frames: u32,
    pub fps: f64,
    pub width: u32,
    pub height: u32,
}

pub fn video_shape(prompt: &Map<String, Value>, from: &str) -> VideoShape {
    let int = |names: &[&str], default: u32| {
        nearest(prompt, from, names)
            .and_then(as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(default)
    };
    VideoShape {
        frames: int(
            &["length", "frames_number", "num_frames", "video_frames"],
            25,
        ),
        fps: nearest(prompt, from, &["fps", "frame_rate"])
            .and_then(Value::as_f64)
            .filter(|f| *f > 0.0)
            .unwrap_or(25.0),
        width: int(&["width"], 512),
        height: int(&["height"], 512),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prompt(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    /// The Flux.2 Klein template as the frontend sends it (PrimitiveInt width/height).
    fn klein(seed: u64) -> Map<String, Value> {
        prompt(json!({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux-2-klein-4b.safetensors", "weight_dtype": "default"}},
            "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_3_4b.safetensors", "type": "flux2", "device": "default"}},
            "4": {"class_type": "PrimitiveInt", "inputs": {"value": 1024}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "A lighthouse", "clip": ["2", 0]}},
            "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
            "8": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": ["4", 0], "height": ["4", 0], "batch_size": 1}},
            "9": {"class_type": "Flux2Scheduler", "inputs": {"steps": 4, "width": ["4", 0], "height": ["4", 0]}},
            "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "12": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 1}},
            "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["12", 0], "sampler": ["11", 0], "sigmas": ["9", 0], "latent_image": ["8", 0]}},
            "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["3", 0]}},
            "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "flux2-klein-4b"}}
        }))
    }

    #[test]
    fn custom_sampler_reads_noise_scheduler_and_select_nodes() {
        let p = klein(701112851139362);
        assert_eq!(sampler_of(&p, "15").as_deref(), Some("13"));
        let a = asked(&p, "13");
        assert_eq!(
            a,
            Asked {
                seed: Some(701112851139362),
                steps: Some(4),
                sampler: Some("euler".into()),
                text: Some("A lighthouse".into()),
            }
        );
        assert_eq!(a.line().unwrap(), "SEED 701112851139362  STEPS 4  euler");
        assert_eq!(batch_size(&p, "15"), 1);
    }

    #[test]
    fn ksampler_widgets_and_primitive_links() {
        let p = prompt(json!({
            "1": {"class_type": "PrimitiveInt", "inputs": {"value": 156680208700286u64}},
            "3": {"class_type": "KSampler", "inputs": {"seed": ["1", 0], "steps": 20, "cfg": 8, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 3}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "bottle", "clip": ["4", 1]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
        }));
        let a = asked(&p, &sampler_of(&p, "9").unwrap());
        assert_eq!(a.seed, Some(156680208700286));
        assert_eq!(
            a.line().unwrap(),
            "SEED 156680208700286  STEPS 20  dpmpp_2m"
        );
        assert_eq!(a.text.as_deref(), Some("bottle"));
        assert_eq!(batch_size(&p, "9"), 3);
    }

    #[test]
    fn advanced_and_manual_sigmas() {
        let p = prompt(json!({
            "1": {"class_type": "KSamplerAdvanced", "inputs": {"add_noise": "enable", "noise_seed": 7, "steps": 30, "cfg": 5, "sampler_name": "euler", "scheduler": "normal", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable", "latent_image": ["2", 0]}},
            "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "ManualSigmas", "inputs": {"sigmas": "1.0, 0.9875, 0.725, 0.0"}},
            "4": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["5", 0], "sampler": ["6", 0], "sigmas": ["7", 0], "latent_image": ["2", 0]}},
            "5": {"class_type": "DisableNoise", "inputs": {}},
            "6": {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1, "s_noise": 1}},
            "7": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["3", 0], "step": 2}}
        }));
        assert_eq!(asked(&p, "1").line().unwrap(), "SEED 7  STEPS 30  euler");
        let a = asked(&p, "4");
        assert_eq!(a.seed, None);
        assert_eq!(a.steps, Some(3));
        assert_eq!(a.sampler.as_deref(), Some("SamplerEulerAncestral"));
        assert_eq!(a.line().unwrap(), "STEPS 3  SamplerEulerAncestral");
        assert_eq!(Asked::default().line(), None);
    }

    #[test]
    fn video_shape_and_hostile_graphs() {
        let p = prompt(json!({
            "4": {"class_type": "PrimitiveInt", "inputs": {"value": 97}},
            "8": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 768, "height": 512, "length": ["4", 0], "batch_size": 1}},
            "15": {"class_type": "SamplerCustomAdvanced", "inputs": {"latent_image": ["8", 0]}},
            "17": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0]}},
            "19": {"class_type": "CreateVideo", "inputs": {"images": ["17", 0], "fps": 25}},
            "20": {"class_type": "SaveVideo", "inputs": {"video": ["19", 0], "filename_prefix": "video/ltx2-distilled"}}
        }));
        assert_eq!(
            video_shape(&p, "20"),
            VideoShape {
                frames: 97,
                fps: 25.0,
                width: 768,
                height: 512
            }
        );
        // Cycles, dangling links and huge batches end, and stay bounded.
        let p = prompt(json!({
            "1": {"class_type": "KSampler", "inputs": {"seed": ["2", 0], "latent_image": ["2", 0], "steps": ["1", 0]}},
            "2": {"class_type": "Loop", "inputs": {"value": ["1", 0], "batch_size": 1_000_000}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "x": ["missing", 0]}}
        }));
        assert_eq!(sampler_of(&p, "3").as_deref(), Some("1"));
        assert_eq!(asked(&p, "1").seed, None);
        assert_eq!(batch_size(&p, "3"), MAX_BATCH);
    }
}
