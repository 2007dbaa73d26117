//! What each node does when the simulator "executes" it.
//!
//! Image nodes do real pixel work (EmptyImage fills, ImageInvert inverts, ...). Model nodes pass
//! descriptions along; VAEDecode of a sampled latent renders a placeholder stamped "SIMULATED"
//! (blended with the encoded picture after a partial denoise, returned as is when unsampled).
//! Timing (sampler steps, slow nodes) is the executor's business, see `exec.rs`.

use image::{GrayImage, RgbImage};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::imaging::{self, MAX_BATCH_PIXELS};
use crate::{graph, h264, mp4};
use comfyume_wire::shapes::to_python_json;
use comfyume_wire::{float_repr, py_str};

/// Largest side of a rendered still placeholder; larger requests are rendered smaller.
const MAX_PLACEHOLDER_SIDE: u32 = 2048;
/// Video placeholders: longest side and frame count are capped to keep files small.
const MAX_VIDEO_SIDE: u32 = 320;
const MAX_VIDEO_FRAMES: u32 = 121;

#[derive(Debug, Clone)]
pub struct Latent {
    pub width: u32,
    pub height: u32,
    pub batch: u32,
    /// Pixel frames this latent decodes to (1 for still images).
    pub frames: u32,
    pub video: bool,
    /// The audio half of an LTX-2 audio+video latent.
    pub audio: Option<AudioInfo>,
    /// Set by a sampler: what the "generated" picture is derived from.
    pub sampled: Option<Sampled>,
    /// What lies under the noise: the pixels VAEEncode put in, or (after a partial denoise) the
    /// latent the sampler started from. Decoding shows it, or blends it in by `1 - denoise`.
    pub source: Option<Source>,
}

#[derive(Debug, Clone)]
pub enum Source {
    /// Already `width` x `height`, one per batch entry.
    Pixels(Arc<Vec<RgbImage>>),
    Latent(Arc<Latent>),
}

#[derive(Debug, Clone, Copy)]
pub struct AudioInfo {
    pub frames: u32,
    pub frame_rate: u32,
}

#[derive(Debug, Clone)]
pub struct Sampled {
    pub seed: u64,
    pub text: String,
    pub steps: u32,
    pub sampler: String,
    /// Share of the input the sampler replaced (KSampler's `denoise`); 1.0 ignores the input.
    pub denoise: f64,
}

#[derive(Debug, Clone)]
pub struct Video {
    pub frames: Arc<Vec<RgbImage>>,
    pub fps: f64,
    /// Seconds of (simulated) sound attached by CreateVideo; not written to the file.
    pub audio_seconds: Option<f64>,
}

/// A value flowing along a link.
#[derive(Debug, Clone)]
pub enum Data {
    Image(Arc<Vec<RgbImage>>),
    Mask(Arc<Vec<GrayImage>>),
    Latent(Arc<Latent>),
    Model(String),
    Clip(String),
    Vae(String),
    Conditioning {
        text: String,
        frame_rate: Option<f64>,
    },
    Sigmas(u32),
    Sampler(String),
    Noise(u64),
    Guider {
        text: String,
        cfg: f64,
    },
    Video(Video),
    /// A primitive value on a link (PrimitiveInt's INT).
    Primitive(Value),
    Audio {
        seconds: f64,
        sample_rate: u32,
    },
    /// Anything of a served (external) node set; `steps` travels along so samplers know it.
    Opaque {
        kind: String,
        steps: Option<u32>,
    },
}

impl Data {
    /// `str(value)` as ComfyUI's error report shows it (`current_inputs`).
    pub fn describe(&self) -> String {
        match self {
            Data::Image(b) => match b.first() {
                Some(i) => format!(
                    "<IMAGE batch={} {}x{} (simulated)>",
                    b.len(),
                    i.width(),
                    i.height()
                ),
                None => "<IMAGE empty (simulated)>".into(),
            },
            Data::Mask(b) => format!("<MASK batch={} (simulated)>", b.len()),
            Data::Latent(l) => format!(
                "<LATENT {}x{} batch={} frames={} (simulated)>",
                l.width, l.height, l.batch, l.frames
            ),
            Data::Model(n) => format!("<MODEL {n} (simulated)>"),
            Data::Clip(n) => format!("<CLIP {n} (simulated)>"),
            Data::Vae(n) => format!("<VAE {n} (simulated)>"),
            Data::Conditioning { .. } => "<CONDITIONING (simulated)>".into(),
            Data::Sigmas(s) => format!("<SIGMAS steps={s} (simulated)>"),
            Data::Sampler(n) => format!("<SAMPLER {n} (simulated)>"),
            Data::Noise(s) => format!("<NOISE seed={s} (simulated)>"),
            Data::Guider { cfg, .. } => format!("<GUIDER cfg={cfg} (simulated)>"),
            Data::Video(v) => format!(
                "<VIDEO frames={} fps={} (simulated)>",
                v.frames.len(),
                v.fps
            ),
            Data::Primitive(v) => py_str(v),
            Data::Audio {
                seconds,
                sample_rate,
            } => format!("<AUDIO {seconds}s {sample_rate} Hz (simulated)>"),
            Data::Opaque { kind, .. } => format!("<{kind} (simulated)>"),
        }
    }

    fn steps_hint(&self) -> Option<u32> {
        match self {
            Data::Sigmas(s) => Some(*s),
            Data::Opaque { steps, .. } => *steps,
            _ => None,
        }
    }
}

/// Why a node did not produce output.
#[derive(Debug, Clone)]
pub enum NodeError {
    /// An exception: becomes `execution_error`.
    Runtime {
        exception_type: String,
        message: String,
    },
    /// `/interrupt` took effect: becomes `execution_interrupted`.
    Interrupted,
    /// The server is dying (fault); nothing more is sent.
    Died,
}

impl NodeError {
    pub fn runtime(message: impl Into<String>) -> Self {
        Self::Runtime {
            exception_type: "RuntimeError".into(),
            message: message.into(),
        }
    }
}

/// One resolved input: a widget value or the value of a linked output.
#[derive(Debug, Clone)]
pub enum Arg {
    Lit(Value),
    Data(Data),
}

#[derive(Debug, Default, Clone)]
pub struct Args(pub Vec<(String, Arg)>);

impl Args {
    pub fn get(&self, name: &str) -> Option<&Arg> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    fn missing(name: &str) -> NodeError {
        NodeError::runtime(format!(
            "comfyume-sim: input '{name}' is missing or has the wrong type"
        ))
    }

    /// A widget value, or a primitive arriving on a link (a widget converted to an input).
    fn lit(&self, name: &str) -> Option<&Value> {
        match self.get(name) {
            Some(Arg::Lit(v)) | Some(Arg::Data(Data::Primitive(v))) => Some(v),
            _ => None,
        }
    }

    pub fn int(&self, name: &str) -> Result<i64, NodeError> {
        self.lit(name)
            .and_then(|v| {
                v.as_i64()
                    .or_else(|| v.as_u64().map(|u| u as i64))
                    .or_else(|| v.as_f64().map(|f| f as i64))
            })
            .ok_or_else(|| Self::missing(name))
    }

    pub fn u64(&self, name: &str) -> Result<u64, NodeError> {
        self.lit(name)
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_i64().map(|i| i as u64))
                    .or_else(|| v.as_f64().map(|f| f as u64))
            })
            .ok_or_else(|| Self::missing(name))
    }

    pub fn float(&self, name: &str) -> Result<f64, NodeError> {
        self.lit(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| Self::missing(name))
    }

    pub fn string(&self, name: &str) -> Result<String, NodeError> {
        self.lit(name)
            .map(py_str)
            .ok_or_else(|| Self::missing(name))
    }

    fn data(&self, name: &str) -> Result<&Data, NodeError> {
        match self.get(name) {
            Some(Arg::Data(d)) => Ok(d),
            _ => Err(Self::missing(name)),
        }
    }

    pub fn image(&self, name: &str) -> Result<Arc<Vec<RgbImage>>, NodeError> {
        match self.data(name)? {
            Data::Image(b) => Ok(b.clone()),
            _ => Err(Self::missing(name)),
        }
    }

    pub fn latent(&self, name: &str) -> Result<Arc<Latent>, NodeError> {
        match self.data(name)? {
            Data::Latent(l) => Ok(l.clone()),
            _ => Err(Self::missing(name)),
        }
    }

    fn text(&self, name: &str) -> Result<(String, Option<f64>), NodeError> {
        match self.data(name)? {
            Data::Conditioning { text, frame_rate } => Ok((text.clone(), *frame_rate)),
            _ => Err(Self::missing(name)),
        }
    }

    /// The largest step count among linked inputs (SIGMAS, or an external node's `steps`).
    pub fn steps_hint(&self) -> Option<u32> {
        self.0
            .iter()
            .filter_map(|(_, a)| match a {
                Arg::Data(d) => d.steps_hint(),
                Arg::Lit(_) => None,
            })
            .max()
    }

    /// `current_inputs` of an `execution_error`: `{name: [value]}`.
    pub fn formatted(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (name, arg) in &self.0 {
            let v = match arg {
                Arg::Lit(
                    v @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_)),
                ) => v.clone(),
                Arg::Lit(v) => Value::String(py_str(v)),
                Arg::Data(d) => Value::String(d.describe()),
            };
            m.insert(name.clone(), json!([v]));
        }
        Value::Object(m)
    }
}

/// A node's result: one value per output slot and the `ui` dict of output nodes.
#[derive(Debug, Default)]
pub struct NodeOut {
    pub values: Vec<Data>,
    pub ui: Option<Value>,
}

/// What a node needs to know about the job it runs in.
#[derive(Debug, Clone)]
pub struct NodeCtx {
    pub node_id: String,
    pub class_type: String,
    pub output_dir: PathBuf,
    pub temp_dir: PathBuf,
    pub input_dir: PathBuf,
    /// PNG text chunks (`prompt`, `workflow`, ...), already serialised.
    pub png_text: Vec<(String, String)>,
    /// The whole prompt, for what a node of a served node set cannot see on its links.
    pub prompt: Arc<serde_json::Map<String, Value>>,
}

/// The key of the PNG text chunk that says who made the file.
pub const NOTE_KEY: &str = "comfyume-sim";

/// What the PNG note of an output of `ctx`'s node says: that it is simulated, and the sampler
/// settings the workflow asked for.
fn note(ctx: &NodeCtx) -> (String, String) {
    let mut text = "SIMULATED by comfyume-sim (no GPU, nothing was generated)".to_string();
    if let Some(line) = graph::sampler_of(&ctx.prompt, &ctx.node_id)
        .and_then(|s| graph::asked(&ctx.prompt, &s).line())
    {
        text.push_str(": ");
        text.push_str(&line);
    }
    (NOTE_KEY.to_string(), text)
}

fn check_budget(w: u32, h: u32, n: u32) -> Result<(), NodeError> {
    let px = u64::from(w) * u64::from(h) * u64::from(n);
    if px > MAX_BATCH_PIXELS {
        return Err(NodeError::runtime(format!(
            "comfyume-sim: an IMAGE of {n} x {w}x{h} pixels is more than the simulator renders ({MAX_BATCH_PIXELS} pixels)"
        )));
    }
    Ok(())
}

fn u32_of(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// Scale (w, h) down so the long side is at most `max`.
fn fit(w: u32, h: u32, max: u32) -> (u32, u32) {
    let long = w.max(h).max(1);
    if long <= max {
        return (w.max(1), h.max(1));
    }
    let s = f64::from(max) / f64::from(long);
    (
        ((f64::from(w) * s).round() as u32).max(1),
        ((f64::from(h) * s).round() as u32).max(1),
    )
}

/// What a sampler will do: the latent it returns and the picture its previews converge to.
pub struct SamplerPlan {
    pub steps: u32,
    pub latent: Latent,
    pub preview_base: RgbImage,
}

/// Preview resolution, like ComfyUI's latent previews (1/8 of the image, at most 512).
fn preview_size(l: &Latent) -> (u32, u32) {
    fit((l.width / 8).max(8), (l.height / 8).max(8), 512)
}

/// `class` decides how many of the steps run: KSampler's `denoise` and KSamplerAdvanced's
/// `start_at_step`/`end_at_step` slice ComfyUI's sigmas. With no step left the input comes back
/// unchanged (`steps` 0), as ComfyUI returns `latent_image` for an empty schedule.
pub fn sampler_plan(
    class: &str,
    args: &Args,
    steps_default: u32,
) -> Result<SamplerPlan, NodeError> {
    let input = match args.get("latent_image") {
        Some(Arg::Data(Data::Latent(l))) => (**l).clone(),
        _ => Latent {
            width: 512,
            height: 512,
            batch: 1,
            frames: 1,
            video: false,
            audio: None,
            sampled: None,
            source: None,
        },
    };
    let (text, seed, sampler) = {
        let text = match args.get("guider") {
            Some(Arg::Data(Data::Guider { text, .. })) => text.clone(),
            _ => match args.get("positive") {
                Some(Arg::Data(Data::Conditioning { text, .. })) => text.clone(),
                _ => String::new(),
            },
        };
        let seed = match args.get("noise") {
            Some(Arg::Data(Data::Noise(s))) => *s,
            _ => args
                .u64("seed")
                .or_else(|_| args.u64("noise_seed"))
                .unwrap_or(0),
        };
        let sampler = match args.get("sampler") {
            Some(Arg::Data(Data::Sampler(s))) => s.clone(),
            _ => args
                .string("sampler_name")
                .unwrap_or_else(|_| "euler".into()),
        };
        (text, seed, sampler)
    };
    let scheduled = args
        .int("steps")
        .ok()
        .map(u32_of)
        .or_else(|| args.steps_hint())
        .unwrap_or(steps_default)
        .max(1);
    let (steps, denoise) = match class {
        "KSampler" => match args.float("denoise").unwrap_or(1.0) {
            // ComfyUI: denoise <= 0 gives an empty schedule.
            d if d <= 0.0 => (0, 0.0),
            // A partial denoise still runs `steps` steps, over the tail of a longer schedule.
            d => (scheduled, d.min(1.0)),
        },
        "KSamplerAdvanced" => {
            let start = u32_of(args.int("start_at_step").unwrap_or(0));
            let last = u32_of(args.int("end_at_step").unwrap_or(i64::MAX)).min(scheduled);
            // Starting late skips the noisiest part of the schedule: some input survives.
            (
                last.saturating_sub(start),
                f64::from(scheduled.saturating_sub(start)) / f64::from(scheduled),
            )
        }
        _ => (scheduled, 1.0),
    };
    let (pw, ph) = preview_size(&input);
    let preview_base = imaging::placeholder(pw, ph, seed, &[]);
    if steps == 0 {
        return Ok(SamplerPlan {
            steps,
            latent: input,
            preview_base,
        });
    }
    let source = (denoise < 1.0 && (input.sampled.is_some() || input.source.is_some()))
        .then(|| Source::Latent(Arc::new(input.clone())));
    let sampled = Sampled {
        seed,
        text,
        steps,
        sampler,
        denoise,
    };
    Ok(SamplerPlan {
        steps,
        latent: Latent {
            sampled: Some(sampled),
            source,
            ..input
        },
        preview_base,
    })
}

fn decode_latent(l: &Latent) -> Result<Vec<RgbImage>, NodeError> {
    if l.width == 0 || l.height == 0 {
        return Err(NodeError::runtime(
            "comfyume-sim: this latent has no picture (an audio latent?); VAEDecode needs a video or image latent",
        ));
    }
    // Encoded pixels come back as they went in (a VAE round trip is nearly lossless).
    match (&l.sampled, &l.source) {
        (None, Some(Source::Pixels(p))) => {
            check_budget(l.width, l.height, p.len() as u32)?;
            return Ok(p.to_vec());
        }
        (None, Some(Source::Latent(inner))) => return decode_latent(inner),
        _ => {}
    }
    let (w, h, frames) = if l.video {
        let (w, h) = fit(l.width, l.height, MAX_VIDEO_SIDE);
        (w, h, l.frames.clamp(1, MAX_VIDEO_FRAMES))
    } else {
        let (w, h) = fit(l.width, l.height, MAX_PLACEHOLDER_SIDE);
        (w, h, 1)
    };
    let count = l.batch.max(1).saturating_mul(frames);
    check_budget(w, h, count)?;
    let mut out = Vec::with_capacity(count as usize);
    for b in 0..l.batch.max(1) {
        let mut lines = vec!["COMFYUME-SIM  -  NO GPU, NOT GENERATED".to_string()];
        let seed = match &l.sampled {
            Some(s) => {
                let mut line = format!("SEED {}  STEPS {}  {}", s.seed, s.steps, s.sampler);
                if s.denoise < 1.0 {
                    line.push_str(&format!("  DENOISE {:.2}", s.denoise));
                }
                lines.push(line);
                if !s.text.trim().is_empty() {
                    lines.push(s.text.split_whitespace().collect::<Vec<_>>().join(" "));
                }
                s.seed.wrapping_add(u64::from(b))
            }
            None => {
                lines.push("UNSAMPLED LATENT".into());
                u64::from(b)
            }
        };
        if l.video {
            out.extend(imaging::placeholder_frames(
                w,
                h,
                seed,
                &lines,
                frames,
                |f| format!("FRAME {}/{}", f + 1, frames),
            ));
        } else {
            out.push(imaging::placeholder(w, h, seed, &lines));
        }
    }
    // A partial denoise keeps `1 - denoise` of what the sampler started from.
    if let (Some(s), Some(src)) = (&l.sampled, &l.source)
        && s.denoise < 1.0
    {
        let under = match src {
            Source::Pixels(p) => p.to_vec(),
            Source::Latent(inner) => decode_latent(inner)?,
        };
        if !under.is_empty() {
            for (i, img) in out.iter_mut().enumerate() {
                let base = &under[i % under.len()];
                let base = if base.dimensions() == (w, h) {
                    std::borrow::Cow::Borrowed(base)
                } else {
                    std::borrow::Cow::Owned(imaging::upscale(base, w, h, "bilinear", false))
                };
                *img = imaging::blend(&base, img, s.denoise as f32);
            }
        }
    }
    Ok(out)
}

/// The same latent at another size; encoded pixels are resized with it.
fn resize_latent(
    l: &Latent,
    width: u32,
    height: u32,
    method: &str,
    crop: bool,
) -> Result<Latent, NodeError> {
    let source = match &l.source {
        None => None,
        Some(Source::Pixels(p)) => {
            check_budget(width, height, p.len() as u32)?;
            Some(Source::Pixels(Arc::new(
                p.iter()
                    .map(|i| imaging::upscale(i, width, height, method, crop))
                    .collect(),
            )))
        }
        Some(Source::Latent(inner)) => Some(Source::Latent(Arc::new(resize_latent(
            inner, width, height, method, crop,
        )?))),
    };
    Ok(Latent {
        width,
        height,
        source,
        ..l.clone()
    })
}

/// A latent's size in latent pixels (ComfyUI's SD latents are 1/8 of the image).
fn latent_dims(l: &Latent) -> Result<(u32, u32), NodeError> {
    let (w, h) = (l.width / 8, l.height / 8);
    if w == 0 || h == 0 {
        return Err(NodeError::runtime(
            "comfyume-sim: this latent has no picture (an audio latent?) to upscale",
        ));
    }
    Ok((w, h))
}

/// ComfyUI's `get_save_image_path`: prefix may hold a subfolder; the counter continues after the
/// highest existing `<name>_NNNNN_` file.
pub fn save_path(
    base: &Path,
    prefix: &str,
    width: u32,
    height: u32,
) -> Result<(PathBuf, String, u32, String), NodeError> {
    let mut prefix = prefix.to_string();
    if prefix.contains('%') {
        prefix = prefix
            .replace("%width%", &width.to_string())
            .replace("%height%", &height.to_string());
    }
    let norm = prefix.replace('\\', "/");
    let (subfolder, filename) = match norm.rsplit_once('/') {
        Some((dir, name)) => (dir.trim_matches('/').to_string(), name.to_string()),
        None => (String::new(), norm.clone()),
    };
    let escapes = subfolder
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .try_fold(0i32, |depth, c| {
            let d = if c == ".." { depth - 1 } else { depth + 1 };
            (d >= 0).then_some(d)
        })
        .is_none();
    if escapes || norm.starts_with('/') {
        return Err(NodeError::Runtime {
            exception_type: "Exception".into(),
            message: format!(
                "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}",
                base.join(&subfolder).display(),
                base.display()
            ),
        });
    }
    let folder = base.join(&subfolder);
    std::fs::create_dir_all(&folder)
        .map_err(|e| NodeError::runtime(format!("cannot create {}: {e}", folder.display())))?;
    let mut counter = 0u32;
    if let Ok(entries) = std::fs::read_dir(&folder) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(rest) = name
                .strip_prefix(&filename)
                .and_then(|r| r.strip_prefix('_'))
                && let Some(digits) = rest.split('_').next()
                && let Ok(n) = digits.parse::<u32>()
            {
                counter = counter.max(n);
            }
        }
    }
    Ok((folder, filename, counter + 1, subfolder))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    std::fs::write(path, bytes)
        .map_err(|e| NodeError::runtime(format!("cannot write {}: {e}", path.display())))
}

/// SaveImage / PreviewImage: one PNG per batch entry.
fn save_images(
    ctx: &NodeCtx,
    images: &[RgbImage],
    prefix: &str,
    folder_type: &str,
) -> Result<Vec<Value>, NodeError> {
    let base = if folder_type == "temp" {
        &ctx.temp_dir
    } else {
        &ctx.output_dir
    };
    let (w, h) = images.first().map(RgbImage::dimensions).unwrap_or((0, 0));
    let (folder, filename, mut counter, subfolder) = save_path(base, prefix, w, h)?;
    let mut text = ctx.png_text.clone();
    text.push(note(ctx));
    let mut results = Vec::with_capacity(images.len());
    for (batch, img) in images.iter().enumerate() {
        let name = filename.replace("%batch_num%", &batch.to_string());
        let file = format!("{name}_{counter:05}_.png");
        write_file(&folder.join(&file), &imaging::png_with_text(img, &text))?;
        results.push(json!({"filename": file, "subfolder": subfolder, "type": folder_type}));
        counter += 1;
    }
    Ok(results)
}

/// SaveVideo: an H.264 MP4 (`format` and `codec` "auto" are mp4 and h264 in ComfyUI too),
/// announced the way ComfyUI's `PreviewVideo` does, under `images` with `animated: [true]`.
fn save_video(
    ctx: &NodeCtx,
    frames: &[RgbImage],
    fps: f64,
    prefix: &str,
) -> Result<NodeOut, NodeError> {
    let (w, h) = frames.first().map(RgbImage::dimensions).unwrap_or((0, 0));
    let (folder, filename, counter, subfolder) = save_path(&ctx.output_dir, prefix, w, h)?;
    let file = format!("{filename}_{counter:05}_.mp4");
    let (stream, stats) = h264::encode(frames, fps);
    let bytes = mp4::mux(&stream, fps);
    tracing::debug!(
        node = %ctx.node_id,
        frames = frames.len(),
        bytes = bytes.len(),
        pcm = stats.pcm,
        copied = stats.inter + stats.skip,
        "video written"
    );
    write_file(&folder.join(&file), &bytes)?;
    Ok(NodeOut {
        values: vec![],
        ui: Some(
            json!({"images": [{"filename": file, "subfolder": subfolder, "type": "output"}], "animated": [true]}),
        ),
    })
}

fn random_letters(n: usize) -> String {
    // Same alphabet as ComfyUI's PreviewImage (including its doubled 'p', missing 'w').
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstupvxyz";
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    bytes
        .iter()
        .take(n)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn annotated(input_dir: &Path, output_dir: &Path, temp_dir: &Path, name: &str) -> PathBuf {
    for (suffix, dir) in [
        (" [output]", output_dir),
        (" [input]", input_dir),
        (" [temp]", temp_dir),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            return dir.join(base);
        }
    }
    input_dir.join(name)
}

fn load_image(ctx: &NodeCtx, name: &str) -> Result<NodeOut, NodeError> {
    let path = annotated(&ctx.input_dir, &ctx.output_dir, &ctx.temp_dir, name);
    let bytes = std::fs::read(&path).map_err(|e| NodeError::Runtime {
        exception_type: "FileNotFoundError".into(),
        message: format!(
            "[Errno 2] No such file or directory: '{}' ({e})",
            path.display()
        ),
    })?;
    let img = image::load_from_memory(&bytes).map_err(|e| NodeError::Runtime {
        exception_type: "PIL.UnidentifiedImageError".into(),
        message: format!("cannot identify image file '{}' ({e})", path.display()),
    })?;
    let mask = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        // ComfyUI: mask = 1 - alpha
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([255 - rgba.get_pixel(x, y).0[3]])
        })
    } else {
        GrayImage::new(64, 64)
    };
    Ok(NodeOut {
        values: vec![
            Data::Image(Arc::new(vec![img.to_rgb8()])),
            Data::Mask(Arc::new(vec![mask])),
        ],
        ui: None,
    })
}

fn scale_all(
    images: &[RgbImage],
    f: impl Fn(&RgbImage) -> Result<RgbImage, NodeError>,
) -> Result<Vec<RgbImage>, NodeError> {
    images.iter().map(f).collect()
}

fn interpolate_error(img: &RgbImage, w: i64, h: i64) -> NodeError {
    sizes_error(img.width(), img.height(), w, h)
}

/// What `torch.nn.functional.interpolate` raises for an empty target size.
fn sizes_error(in_w: u32, in_h: u32, w: i64, h: i64) -> NodeError {
    NodeError::runtime(format!(
        "Input and output sizes should be greater than 0, but got input (H: {in_h}, W: {in_w}) output (H: {h}, W: {w})"
    ))
}

/// Run one node of the built-in set (everything except the sampler's step loop and the time a
/// slow node takes, which the executor simulates).
pub fn run_builtin(ctx: &NodeCtx, class: &str, args: &Args) -> Result<NodeOut, NodeError> {
    let one = |d: Data| {
        Ok(NodeOut {
            values: vec![d],
            ui: None,
        })
    };
    match class {
        "UNETLoader" => one(Data::Model(args.string("unet_name")?)),
        "CLIPLoader" => one(Data::Clip(args.string("clip_name")?)),
        "VAELoader" => one(Data::Vae(args.string("vae_name")?)),
        "LTXAVTextEncoderLoader" => one(Data::Clip(args.string("text_encoder")?)),
        "CheckpointLoaderSimple" => {
            let name = args.string("ckpt_name")?;
            Ok(NodeOut {
                values: vec![
                    Data::Model(name.clone()),
                    Data::Clip(name.clone()),
                    Data::Vae(name),
                ],
                ui: None,
            })
        }
        "CLIPTextEncode" => one(Data::Conditioning {
            text: args.string("text")?,
            frame_rate: None,
        }),
        "LoraLoader" => {
            let model = match args.data("model")? {
                Data::Model(m) => m.clone(),
                _ => return Err(Args::missing("model")),
            };
            let clip = match args.data("clip")? {
                Data::Clip(c) => c.clone(),
                _ => return Err(Args::missing("clip")),
            };
            let lora = args.string("lora_name")?;
            let (sm, sc) = (args.float("strength_model")?, args.float("strength_clip")?);
            // ComfyUI does not even open the file when both strengths are 0.
            let (model, clip) = if sm == 0.0 && sc == 0.0 {
                (model, clip)
            } else {
                (
                    format!("{model} + {lora} @ {}", float_repr(sm)),
                    format!("{clip} + {lora} @ {}", float_repr(sc)),
                )
            };
            Ok(NodeOut {
                values: vec![Data::Model(model), Data::Clip(clip)],
                ui: None,
            })
        }
        // Clip skip changes the embedding a real model computes; the simulator has none.
        "CLIPSetLastLayer" => match args.data("clip")? {
            Data::Clip(c) => one(Data::Clip(c.clone())),
            _ => Err(Args::missing("clip")),
        },
        "ConditioningCombine" => {
            let (a, rate_a) = args.text("conditioning_1")?;
            let (b, rate_b) = args.text("conditioning_2")?;
            let text = match (a.trim().is_empty(), b.trim().is_empty()) {
                (true, _) => b,
                (_, true) => a,
                _ => format!("{a} + {b}"),
            };
            one(Data::Conditioning {
                text,
                frame_rate: rate_a.or(rate_b),
            })
        }
        "LTXVConditioning" => {
            let rate = args.float("frame_rate")?;
            let (pos, _) = args.text("positive")?;
            let (neg, _) = args.text("negative")?;
            Ok(NodeOut {
                values: vec![
                    Data::Conditioning {
                        text: pos,
                        frame_rate: Some(rate),
                    },
                    Data::Conditioning {
                        text: neg,
                        frame_rate: Some(rate),
                    },
                ],
                ui: None,
            })
        }
        "EmptyFlux2LatentImage" => one(Data::Latent(Arc::new(Latent {
            width: u32_of(args.int("width")?),
            height: u32_of(args.int("height")?),
            batch: u32_of(args.int("batch_size")?),
            frames: 1,
            video: false,
            audio: None,
            sampled: None,
            source: None,
        }))),
        // torch.zeros([batch, 4, height // 8, width // 8]): it decodes to multiples of 8 pixels.
        "EmptyLatentImage" => one(Data::Latent(Arc::new(Latent {
            width: u32_of(args.int("width")? / 8 * 8),
            height: u32_of(args.int("height")? / 8 * 8),
            batch: u32_of(args.int("batch_size")?),
            frames: 1,
            video: false,
            audio: None,
            sampled: None,
            source: None,
        }))),
        "VAEEncode" => {
            let images = args.image("pixels")?;
            let first = images
                .first()
                .ok_or_else(|| NodeError::runtime("empty IMAGE batch"))?;
            let (w, h) = first.dimensions();
            // `vae_encode_crop_pixels`: centre crop to whole latent pixels.
            let (cw, ch) = (w / 8 * 8, h / 8 * 8);
            if cw == 0 || ch == 0 {
                return Err(NodeError::runtime(format!(
                    "comfyume-sim: VAEEncode needs at least 8x8 pixels, got {w}x{h}"
                )));
            }
            let (ox, oy) = ((w % 8) / 2, (h % 8) / 2);
            let pixels: Vec<RgbImage> = images
                .iter()
                .map(|i| {
                    if (cw, ch) == i.dimensions() {
                        i.clone()
                    } else {
                        image::imageops::crop_imm(i, ox, oy, cw, ch).to_image()
                    }
                })
                .collect();
            one(Data::Latent(Arc::new(Latent {
                width: cw,
                height: ch,
                batch: pixels.len() as u32,
                frames: 1,
                video: false,
                audio: None,
                sampled: None,
                source: Some(Source::Pixels(Arc::new(pixels))),
            })))
        }
        "LatentUpscale" => {
            let latent = args.latent("samples")?;
            let method = args.string("upscale_method")?;
            let crop = args.string("crop")? == "center";
            let (w, h) = (args.int("width")?, args.int("height")?);
            if w == 0 && h == 0 {
                return one(Data::Latent(latent));
            }
            let (lw, lh) = latent_dims(&latent)?;
            let (lw, lh) = (f64::from(lw), f64::from(lh));
            let (w, h) = if w == 0 {
                let h = h.max(64);
                (imaging::py_round(lw * h as f64 / lh).max(64), h)
            } else if h == 0 {
                let w = w.max(64);
                (w, imaging::py_round(lh * w as f64 / lw).max(64))
            } else {
                (w.max(64), h.max(64))
            };
            // Resized to width // 8 x height // 8 latent pixels.
            let resized =
                resize_latent(&latent, u32_of(w / 8 * 8), u32_of(h / 8 * 8), &method, crop)?;
            one(Data::Latent(Arc::new(resized)))
        }
        "LatentUpscaleBy" => {
            let latent = args.latent("samples")?;
            let method = args.string("upscale_method")?;
            let by = args.float("scale_by")?;
            let (lw, lh) = latent_dims(&latent)?;
            let w = imaging::py_round(f64::from(lw) * by);
            let h = imaging::py_round(f64::from(lh) * by);
            if w <= 0 || h <= 0 {
                return Err(sizes_error(lw, lh, w, h));
            }
            let resized = resize_latent(&latent, u32_of(w * 8), u32_of(h * 8), &method, false)?;
            one(Data::Latent(Arc::new(resized)))
        }
        "EmptyLTXVLatentVideo" => one(Data::Latent(Arc::new(Latent {
            width: u32_of(args.int("width")?),
            height: u32_of(args.int("height")?),
            batch: u32_of(args.int("batch_size")?),
            frames: u32_of(args.int("length")?),
            video: true,
            audio: None,
            sampled: None,
            source: None,
        }))),
        "LTXVEmptyLatentAudio" => one(Data::Latent(Arc::new(Latent {
            width: 0,
            height: 0,
            batch: u32_of(args.int("batch_size")?),
            frames: 0,
            video: false,
            audio: Some(AudioInfo {
                frames: u32_of(args.int("frames_number")?),
                frame_rate: u32_of(args.int("frame_rate")?),
            }),
            sampled: None,
            source: None,
        }))),
        "LTXVConcatAVLatent" => {
            let video = args.latent("video_latent")?;
            let audio = args.latent("audio_latent")?;
            one(Data::Latent(Arc::new(Latent {
                audio: audio.audio,
                ..(*video).clone()
            })))
        }
        "LTXVSeparateAVLatent" => {
            let av = args.latent("av_latent")?;
            let audio = Latent {
                width: 0,
                height: 0,
                frames: 0,
                video: false,
                ..(*av).clone()
            };
            Ok(NodeOut {
                values: vec![
                    Data::Latent(Arc::new(Latent {
                        audio: None,
                        ..(*av).clone()
                    })),
                    Data::Latent(Arc::new(audio)),
                ],
                ui: None,
            })
        }
        "LTXVAudioVAELoader" => one(Data::Vae(args.string("ckpt_name")?)),
        "LTXVAudioVAEDecode" => {
            let latent = args.latent("samples")?;
            let info = latent.audio.ok_or_else(|| {
                NodeError::runtime("comfyume-sim: LTXVAudioVAEDecode needs an audio latent")
            })?;
            one(Data::Audio {
                seconds: f64::from(info.frames) / f64::from(info.frame_rate.max(1)),
                sample_rate: 44_100,
            })
        }
        "PrimitiveInt" => one(Data::Primitive(json!(args.int("value")?))),
        "ConditioningZeroOut" => match args.data("conditioning")? {
            Data::Conditioning { frame_rate, .. } => one(Data::Conditioning {
                text: String::new(),
                frame_rate: *frame_rate,
            }),
            _ => Err(Args::missing("conditioning")),
        },
        "ManualSigmas" => {
            // ComfyUI takes every number in the text; a sampler runs one step per interval.
            let text = args.string("sigmas")?;
            let count = text
                .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
                .filter(|t| t.parse::<f64>().is_ok())
                .count() as u32;
            one(Data::Sigmas(count.saturating_sub(1)))
        }
        "Flux2Scheduler" | "LTXVScheduler" => one(Data::Sigmas(u32_of(args.int("steps")?))),
        "KSamplerSelect" => one(Data::Sampler(args.string("sampler_name")?)),
        "RandomNoise" => one(Data::Noise(args.u64("noise_seed")?)),
        "CFGGuider" => {
            let (text, _) = args.text("positive")?;
            one(Data::Guider {
                text,
                cfg: args.float("cfg")?,
            })
        }
        "VAEDecode" => {
            let latent = args.latent("samples")?;
            one(Data::Image(Arc::new(decode_latent(&latent)?)))
        }
        "SaveImage" => {
            let images = args.image("images")?;
            let prefix = args
                .string("filename_prefix")
                .unwrap_or_else(|_| "ComfyUI".into());
            let results = save_images(ctx, &images, &prefix, "output")?;
            Ok(NodeOut {
                values: vec![],
                ui: Some(json!({"images": results})),
            })
        }
        "PreviewImage" => {
            let images = args.image("images")?;
            let prefix = format!("ComfyUI_temp_{}", random_letters(5));
            let results = save_images(ctx, &images, &prefix, "temp")?;
            Ok(NodeOut {
                values: vec![],
                ui: Some(json!({"images": results})),
            })
        }
        "PreviewAny" => {
            // nodes_preview_any: str for scalars, json.dumps for containers, else str(obj).
            let text = match args.get("source") {
                None => "None".to_string(),
                Some(Arg::Lit(v) | Arg::Data(Data::Primitive(v))) => match v {
                    Value::Array(_) | Value::Object(_) => to_python_json(v),
                    scalar => py_str(scalar),
                },
                Some(Arg::Data(d)) => d.describe(),
            };
            Ok(NodeOut {
                values: vec![],
                ui: Some(json!({"text": [text]})),
            })
        }
        "CreateVideo" => {
            let images = args.image("images")?;
            let audio_seconds = match args.get("audio") {
                Some(Arg::Data(Data::Audio { seconds, .. })) => Some(*seconds),
                _ => None,
            };
            one(Data::Video(Video {
                frames: images,
                fps: args.float("fps")?,
                audio_seconds,
            }))
        }
        "SaveVideo" => {
            let video = match args.get("video") {
                Some(Arg::Data(Data::Video(v))) => v.clone(),
                _ => return Err(Args::missing("video")),
            };
            let prefix = args
                .string("filename_prefix")
                .unwrap_or_else(|_| "video/ComfyUI".into());
            if let Some(seconds) = video.audio_seconds {
                tracing::info!(
                    node = %ctx.node_id,
                    "simulated video: its {seconds:.2} s of simulated audio are not written"
                );
            }
            save_video(ctx, &video.frames, video.fps, &prefix)
        }
        "LoadImage" => load_image(ctx, &args.string("image")?),
        "EmptyImage" => {
            let (w, h, n) = (
                u32_of(args.int("width")?),
                u32_of(args.int("height")?),
                u32_of(args.int("batch_size")?),
            );
            check_budget(w, h, n)?;
            let img = imaging::fill(w, h, u32_of(args.int("color")?));
            one(Data::Image(Arc::new(vec![img; n.max(1) as usize])))
        }
        "ImageInvert" => {
            let images = args.image("image")?;
            one(Data::Image(Arc::new(
                images.iter().map(imaging::invert).collect(),
            )))
        }
        "ImageBlur" => {
            let images = args.image("image")?;
            let radius = u32_of(args.int("blur_radius")?);
            let sigma = args.float("sigma")? as f32;
            one(Data::Image(Arc::new(
                images
                    .iter()
                    .map(|i| imaging::blur(i, radius, sigma))
                    .collect(),
            )))
        }
        "ImageScaleBy" => {
            let images = args.image("image")?;
            let method = args.string("upscale_method")?;
            let by = args.float("scale_by")?;
            let out = scale_all(&images, |img| {
                let w = imaging::py_round(f64::from(img.width()) * by);
                let h = imaging::py_round(f64::from(img.height()) * by);
                if w <= 0 || h <= 0 {
                    return Err(interpolate_error(img, w, h));
                }
                check_budget(u32_of(w), u32_of(h), images.len() as u32)?;
                Ok(imaging::upscale(img, u32_of(w), u32_of(h), &method, false))
            })?;
            one(Data::Image(Arc::new(out)))
        }
        "ImageScale" => {
            let images = args.image("image")?;
            let method = args.string("upscale_method")?;
            let (mut w, mut h) = (args.int("width")?, args.int("height")?);
            let crop = args.string("crop")? == "center";
            if w == 0 && h == 0 {
                return one(Data::Image(images));
            }
            let first = images
                .first()
                .ok_or_else(|| NodeError::runtime("empty IMAGE batch"))?;
            if w == 0 {
                w = imaging::py_round(
                    f64::from(first.width()) * h as f64 / f64::from(first.height()),
                )
                .max(1);
            } else if h == 0 {
                h = imaging::py_round(
                    f64::from(first.height()) * w as f64 / f64::from(first.width()),
                )
                .max(1);
            }
            check_budget(u32_of(w), u32_of(h), images.len() as u32)?;
            let out = scale_all(&images, |img| {
                Ok(imaging::upscale(img, u32_of(w), u32_of(h), &method, crop))
            })?;
            one(Data::Image(Arc::new(out)))
        }
        "ImageScaleToTotalPixels" => {
            let images = args.image("image")?;
            let method = args.string("upscale_method")?;
            let total = args.float("megapixels")? * 1024.0 * 1024.0;
            let step = args.int("resolution_steps")?.max(1);
            let first = images
                .first()
                .ok_or_else(|| NodeError::runtime("empty IMAGE batch"))?;
            let (ow, oh) = (f64::from(first.width()), f64::from(first.height()));
            let scale_by = (total / (ow * oh)).sqrt();
            let w = imaging::py_round(ow * scale_by / step as f64) * step;
            let h = imaging::py_round(oh * scale_by / step as f64) * step;
            if w <= 0 || h <= 0 {
                return Err(interpolate_error(first, w, h));
            }
            check_budget(u32_of(w), u32_of(h), images.len() as u32)?;
            let out = scale_all(&images, |img| {
                Ok(imaging::upscale(img, u32_of(w), u32_of(h), &method, false))
            })?;
            one(Data::Image(Arc::new(out)))
        }
        other => Err(NodeError::runtime(format!(
            "comfyume-sim has no implementation for {other}"
        ))),
    }
}

/// Simulated time of a non-sampler node, in units of `step_ms`.
pub fn slow_units(class: &str, args: &Args) -> u64 {
    match class {
        // Real ComfyUI spends seconds here on large images; the trace's interrupt happened in it.
        "ImageBlur" => args
            .int("blur_radius")
            .map(|r| r.max(0) as u64)
            .unwrap_or(1),
        _ => 0,
    }
}

/// Whether a node runs a step loop (progress, previews, interrupt at each step).
/// In a served node set: a class named like a sampler that returns a LATENT (KSampler,
/// SamplerCustom...), not the ones that only build a SAMPLER object.
pub fn is_sampler(builtin: bool, class: &str, output_types: &[String]) -> bool {
    if builtin {
        matches!(
            class,
            "SamplerCustomAdvanced" | "KSampler" | "KSamplerAdvanced"
        )
    } else {
        class.contains("Sampler") && output_types.iter().any(|t| t == "LATENT")
    }
}

/// A node of a served (external) node set: output nodes write a placeholder PNG stamped with
/// the node's name; other nodes pass opaque values along.
pub fn run_generic(
    ctx: &NodeCtx,
    output_types: &[String],
    is_output: bool,
    args: &Args,
    sampled: Option<&Latent>,
) -> Result<NodeOut, NodeError> {
    let steps = args
        .int("steps")
        .ok()
        .map(u32_of)
        .or_else(|| args.steps_hint());
    let values: Vec<Data> = output_types
        .iter()
        .map(|t| match (t.as_str(), sampled) {
            ("LATENT", Some(l)) => Data::Latent(Arc::new(l.clone())),
            _ => Data::Opaque {
                kind: t.clone(),
                steps,
            },
        })
        .collect();
    if !is_output {
        return Ok(NodeOut { values, ui: None });
    }
    // The stamp tells what the workflow asked for, read from the prompt's graph.
    let asked = graph::sampler_of(&ctx.prompt, &ctx.node_id)
        .map(|s| graph::asked(&ctx.prompt, &s))
        .unwrap_or_default();
    let mut lines = vec![
        format!("{} #{}", ctx.class_type, ctx.node_id),
        "COMFYUME-SIM  -  NO GPU, NOT GENERATED".to_string(),
    ];
    lines.extend(asked.line());
    if let Some(text) = asked.text.as_deref().filter(|t| !t.trim().is_empty()) {
        lines.push(text.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    let seed = asked.seed.unwrap_or_else(|| {
        ctx.node_id
            .bytes()
            .fold(ctx.class_type.len() as u64, |a, b| {
                a.wrapping_mul(31).wrapping_add(u64::from(b))
            })
    });
    let prefix = args
        .get("filename_prefix")
        .and_then(|a| match a {
            Arg::Lit(Value::String(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "ComfyUI".into());
    let shape = graph::video_shape(&ctx.prompt, &ctx.node_id);
    if ctx.class_type == "SaveVideo" {
        let (w, h) = fit(shape.width, shape.height, MAX_VIDEO_SIDE);
        let frames = shape.frames.clamp(1, MAX_VIDEO_FRAMES);
        let images = imaging::placeholder_frames(w, h, seed, &lines, frames, |f| {
            format!("FRAME {}/{frames}", f + 1)
        });
        let out = save_video(ctx, &images, shape.fps, &prefix)?;
        return Ok(NodeOut { values, ..out });
    }
    // One picture per batch entry, as ComfyUI saves them.
    let (w, h) = fit(shape.width, shape.height, MAX_PLACEHOLDER_SIDE);
    let batch = graph::batch_size(&ctx.prompt, &ctx.node_id);
    check_budget(w, h, batch)?;
    let images: Vec<RgbImage> = (0..batch)
        .map(|b| imaging::placeholder(w, h, seed.wrapping_add(u64::from(b)), &lines))
        .collect();
    let results = save_images(ctx, &images, &prefix, "output")?;
    Ok(NodeOut {
        values,
        ui: Some(json!({"images": results})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(dir: &Path) -> NodeCtx {
        NodeCtx {
            node_id: "3".into(),
            class_type: "SaveImage".into(),
            output_dir: dir.join("output"),
            temp_dir: dir.join("temp"),
            input_dir: dir.join("input"),
            png_text: vec![],
            prompt: Arc::default(),
        }
    }

    #[test]
    fn save_counter_continues() {
        let dir = std::env::temp_dir().join(format!("sim-nodes-{}", uuid::Uuid::new_v4()));
        let c = ctx(&dir);
        let img = imaging::fill(2, 2, 0);
        let a = save_images(&c, &[img.clone(), img.clone()], "nomodel", "output").unwrap();
        assert_eq!(a[0]["filename"], "nomodel_00001_.png");
        assert_eq!(a[1]["filename"], "nomodel_00002_.png");
        let b = save_images(&c, std::slice::from_ref(&img), "nomodel", "output").unwrap();
        assert_eq!(b[0]["filename"], "nomodel_00003_.png");
        let v = save_images(&c, std::slice::from_ref(&img), "video/clip", "output").unwrap();
        assert_eq!(
            v[0],
            json!({"filename": "clip_00001_.png", "subfolder": "video", "type": "output"})
        );
        assert!(save_images(&c, &[img], "../../etc/x", "output").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn scale_by_to_zero_fails_like_torch() {
        let c = ctx(Path::new("/nonexistent"));
        let args = Args(vec![
            (
                "image".into(),
                Arg::Data(Data::Image(Arc::new(vec![imaging::fill(1, 1, 0)]))),
            ),
            ("upscale_method".into(), Arg::Lit(json!("bilinear"))),
            ("scale_by".into(), Arg::Lit(json!(0.01))),
        ]);
        match run_builtin(&c, "ImageScaleBy", &args) {
            Err(NodeError::Runtime {
                exception_type,
                message,
            }) => {
                assert_eq!(exception_type, "RuntimeError");
                assert!(message.starts_with("Input and output sizes should be greater than 0"));
            }
            other => panic!("{other:?}"),
        }
    }

    fn lit(name: &str, v: Value) -> (String, Arg) {
        (name.into(), Arg::Lit(v))
    }

    fn data(name: &str, d: Data) -> (String, Arg) {
        (name.into(), Arg::Data(d))
    }

    fn latent_of(out: NodeOut) -> Arc<Latent> {
        match out.values.into_iter().next() {
            Some(Data::Latent(l)) => l,
            other => panic!("{other:?}"),
        }
    }

    fn images_of(out: NodeOut) -> Arc<Vec<RgbImage>> {
        match out.values.into_iter().next() {
            Some(Data::Image(i)) => i,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sampler_steps_follow_comfyui_schedules() {
        let steps = |class: &str, extra: Vec<(String, Arg)>| {
            let mut args = vec![lit("steps", json!(20))];
            args.extend(extra);
            sampler_plan(class, &Args(args), 20).unwrap()
        };
        let full = steps("KSampler", vec![lit("denoise", json!(1.0))]);
        assert_eq!(full.steps, 20);
        assert_eq!(full.latent.sampled.as_ref().unwrap().denoise, 1.0);
        // A partial denoise still runs every step; denoise 0 runs none and changes nothing.
        assert_eq!(
            steps("KSampler", vec![lit("denoise", json!(0.4))]).steps,
            20
        );
        let none = steps("KSampler", vec![lit("denoise", json!(0.0))]);
        assert_eq!(none.steps, 0);
        assert!(none.latent.sampled.is_none());
        let adv = |start: i64, end: i64| {
            steps(
                "KSamplerAdvanced",
                vec![
                    lit("start_at_step", json!(start)),
                    lit("end_at_step", json!(end)),
                ],
            )
            .steps
        };
        assert_eq!(adv(0, 10000), 20);
        assert_eq!(adv(5, 15), 10);
        assert_eq!(adv(12, 10000), 8);
        assert_eq!(adv(20, 10000), 0);
        assert_eq!(adv(10, 4), 0);
        assert_eq!(steps("SamplerCustomAdvanced", vec![]).steps, 20);
    }

    #[test]
    fn stamp_shows_the_workflows_seed_steps_and_sampler() {
        // Flux.2 Klein's sampler: RandomNoise, KSamplerSelect and Flux2Scheduler on links.
        let c = ctx(Path::new("/nonexistent"));
        let one = |class: &str, args: Vec<(String, Arg)>| {
            run_builtin(&c, class, &Args(args))
                .unwrap()
                .values
                .remove(0)
        };
        let plan = sampler_plan(
            "SamplerCustomAdvanced",
            &Args(vec![
                data(
                    "noise",
                    one(
                        "RandomNoise",
                        vec![lit("noise_seed", json!(701112851139362u64))],
                    ),
                ),
                data(
                    "sampler",
                    one("KSamplerSelect", vec![lit("sampler_name", json!("euler"))]),
                ),
                data(
                    "sigmas",
                    one(
                        "Flux2Scheduler",
                        vec![
                            lit("steps", json!(4)),
                            lit("width", json!(64)),
                            lit("height", json!(64)),
                        ],
                    ),
                ),
                data(
                    "guider",
                    Data::Guider {
                        text: "a  lighthouse".into(),
                        cfg: 1.0,
                    },
                ),
                data(
                    "latent_image",
                    one(
                        "EmptyFlux2LatentImage",
                        vec![
                            lit("width", json!(64)),
                            lit("height", json!(48)),
                            lit("batch_size", json!(2)),
                        ],
                    ),
                ),
            ]),
            20,
        )
        .unwrap();
        assert_eq!(plan.steps, 4);
        let images = decode_latent(&plan.latent).unwrap();
        assert_eq!(images.len(), 2, "one picture per batch entry");
        let lines = [
            "COMFYUME-SIM  -  NO GPU, NOT GENERATED".to_string(),
            "SEED 701112851139362  STEPS 4  euler".to_string(),
            "a lighthouse".to_string(),
        ];
        assert_eq!(
            images[0],
            imaging::placeholder(64, 48, 701112851139362, &lines)
        );
        assert_eq!(
            images[1],
            imaging::placeholder(64, 48, 701112851139363, &lines)
        );
    }

    #[test]
    fn vae_round_trip_and_partial_denoise_keep_the_picture() {
        let c = ctx(Path::new("/nonexistent"));
        // 21x17 is centre-cropped to 16x16 at (2, 0), like vae_encode_crop_pixels.
        let mut img = imaging::fill(21, 17, 0xFF0000);
        img.put_pixel(2, 0, image::Rgb([1, 2, 3]));
        let encoded = latent_of(
            run_builtin(
                &c,
                "VAEEncode",
                &Args(vec![
                    data("pixels", Data::Image(Arc::new(vec![img]))),
                    data("vae", Data::Vae("v".into())),
                ]),
            )
            .unwrap(),
        );
        assert_eq!((encoded.width, encoded.height), (16, 16));
        let decode = |l: &Arc<Latent>| {
            images_of(
                run_builtin(
                    &c,
                    "VAEDecode",
                    &Args(vec![
                        data("samples", Data::Latent(l.clone())),
                        data("vae", Data::Vae("v".into())),
                    ]),
                )
                .unwrap(),
            )
        };
        let back = decode(&encoded);
        assert_eq!(back[0].dimensions(), (16, 16));
        assert_eq!(back[0].get_pixel(0, 0).0, [1, 2, 3]);
        assert_eq!(back[0].get_pixel(5, 5).0, [255, 0, 0]);

        let plan = sampler_plan(
            "KSampler",
            &Args(vec![
                lit("steps", json!(4)),
                lit("seed", json!(3)),
                lit("denoise", json!(0.25)),
                data("latent_image", Data::Latent(encoded.clone())),
            ]),
            20,
        )
        .unwrap();
        let img2img = decode(&Arc::new(plan.latent));
        // Three quarters of the red input survive whatever the placeholder is.
        assert!(
            img2img[0]
                .enumerate_pixels()
                .filter(|(x, y, _)| (*x, *y) != (0, 0))
                .all(|(_, _, p)| p.0[0] >= 191 && p.0[1] <= 64)
        );
        assert_ne!(img2img[0], back[0]);
        // Denoise 1 ignores the input entirely.
        let plan = sampler_plan(
            "KSampler",
            &Args(vec![
                lit("steps", json!(4)),
                lit("seed", json!(3)),
                lit("denoise", json!(1.0)),
                data("latent_image", Data::Latent(encoded)),
            ]),
            20,
        )
        .unwrap();
        assert!(plan.latent.source.is_none());
    }

    #[test]
    fn latent_upscales_size_like_comfyui() {
        let c = ctx(Path::new("/nonexistent"));
        let empty = |w: i64, h: i64| {
            latent_of(
                run_builtin(
                    &c,
                    "EmptyLatentImage",
                    &Args(vec![
                        lit("width", json!(w)),
                        lit("height", json!(h)),
                        lit("batch_size", json!(1)),
                    ]),
                )
                .unwrap(),
            )
        };
        let l = empty(516, 260);
        assert_eq!((l.width, l.height), (512, 256));
        let up = |l: &Arc<Latent>, w: i64, h: i64| {
            let out = run_builtin(
                &c,
                "LatentUpscale",
                &Args(vec![
                    data("samples", Data::Latent(l.clone())),
                    lit("upscale_method", json!("nearest-exact")),
                    lit("width", json!(w)),
                    lit("height", json!(h)),
                    lit("crop", json!("disabled")),
                ]),
            )
            .unwrap();
            let r = latent_of(out);
            (r.width, r.height)
        };
        assert_eq!(up(&l, 0, 0), (512, 256));
        assert_eq!(up(&l, 1024, 0), (1024, 512));
        assert_eq!(up(&l, 0, 100), (200, 96));
        assert_eq!(up(&l, 10, 1000), (64, 1000));
        let by = |scale: f64| {
            run_builtin(
                &c,
                "LatentUpscaleBy",
                &Args(vec![
                    data("samples", Data::Latent(l.clone())),
                    lit("upscale_method", json!("bilinear")),
                    lit("scale_by", json!(scale)),
                ]),
            )
            .map(|o| {
                let r = latent_of(o);
                (r.width, r.height)
            })
        };
        assert_eq!(by(1.5).unwrap(), (768, 384));
        match by(0.01) {
            Err(NodeError::Runtime { message, .. }) => assert_eq!(
                message,
                "Input and output sizes should be greater than 0, but got input (H: 32, W: 64) output (H: 0, W: 1)"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scale_to_total_pixels_rounds_to_resolution_steps() {
        let c = ctx(Path::new("/nonexistent"));
        let run = |mp: f64, steps: i64| {
            run_builtin(
                &c,
                "ImageScaleToTotalPixels",
                &Args(vec![
                    data(
                        "image",
                        Data::Image(Arc::new(vec![imaging::fill(100, 50, 0x00FF00)])),
                    ),
                    lit("upscale_method", json!("lanczos")),
                    lit("megapixels", json!(mp)),
                    lit("resolution_steps", json!(steps)),
                ]),
            )
            .map(|o| images_of(o)[0].clone())
        };
        let one = run(0.01, 1).unwrap();
        assert_eq!(one.dimensions(), (145, 72));
        assert_eq!(one.get_pixel(70, 30).0, [0, 255, 0]);
        assert_eq!(run(0.01, 8).unwrap().dimensions(), (144, 72));
        assert!(run(0.01, 256).is_err());
    }

    #[test]
    fn preview_any_and_model_nodes() {
        let c = ctx(Path::new("/nonexistent"));
        let preview = |arg: Arg| {
            let out = run_builtin(&c, "PreviewAny", &Args(vec![("source".into(), arg)])).unwrap();
            assert!(out.values.is_empty());
            out.ui.unwrap()
        };
        assert_eq!(
            preview(Arg::Lit(json!("a cat"))),
            json!({"text": ["a cat"]})
        );
        assert_eq!(
            preview(Arg::Data(Data::Primitive(json!(5)))),
            json!({"text": ["5"]})
        );
        assert_eq!(preview(Arg::Lit(json!(1.0))), json!({"text": ["1.0"]}));
        assert_eq!(preview(Arg::Lit(json!(true))), json!({"text": ["True"]}));
        assert_eq!(
            preview(Arg::Data(Data::Clip("c.safetensors".into()))),
            json!({"text": ["<CLIP c.safetensors (simulated)>"]})
        );
        let lora = |s: f64| {
            let out = run_builtin(
                &c,
                "LoraLoader",
                &Args(vec![
                    data("model", Data::Model("m".into())),
                    data("clip", Data::Clip("c".into())),
                    lit("lora_name", json!("l.safetensors")),
                    lit("strength_model", json!(s)),
                    lit("strength_clip", json!(s)),
                ]),
            )
            .unwrap();
            out.values.iter().map(Data::describe).collect::<Vec<_>>()
        };
        assert_eq!(lora(0.0), ["<MODEL m (simulated)>", "<CLIP c (simulated)>"]);
        assert_eq!(
            lora(0.5),
            [
                "<MODEL m + l.safetensors @ 0.5 (simulated)>",
                "<CLIP c + l.safetensors @ 0.5 (simulated)>"
            ]
        );
        let combined = run_builtin(
            &c,
            "ConditioningCombine",
            &Args(vec![
                data(
                    "conditioning_1",
                    Data::Conditioning {
                        text: "a cat".into(),
                        frame_rate: None,
                    },
                ),
                data(
                    "conditioning_2",
                    Data::Conditioning {
                        text: "in a hat".into(),
                        frame_rate: None,
                    },
                ),
            ]),
        )
        .unwrap();
        match &combined.values[0] {
            Data::Conditioning { text, .. } => assert_eq!(text, "a cat + in a hat"),
            other => panic!("{other:?}"),
        }
    }
}
