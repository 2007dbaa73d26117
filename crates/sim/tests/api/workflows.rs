//! The workshop-style graphs and the shared workflows run end to end and write real files.

use crate::helpers::*;
use comfyume_sim::SimConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn flux_text_to_image_writes_a_stamped_placeholder() {
    let t = quick_sim().await;
    let id = t.queue_ok(&flux_workflow(4, 1234, 128), None).await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    assert_eq!(
        h["outputs"]["13"],
        json!({"images": [{"filename": "flux2_00001_.png", "subfolder": "", "type": "output"}]})
    );
    let bytes = t
        .get("/view?filename=flux2_00001_.png")
        .await
        .bytes()
        .await
        .unwrap();
    // ComfyUI-style metadata: the prompt is embedded.
    assert!(bytes.windows(6).any(|w| w == b"prompt"));
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (128, 128));
    // The stamp draws pure white text on a darkened band.
    assert!(img.pixels().any(|p| p.0 == [255, 255, 255]));
    // Same seed → same picture (deterministic), different seed → different one.
    let again = t.queue_ok(&flux_workflow(4, 1234, 128), None).await;
    t.wait_history(&again).await;
    let other = t.queue_ok(&flux_workflow(4, 99, 128), None).await;
    let h2 = t.wait_history(&other).await;
    let name2 = h2["outputs"]["13"]["images"][0]["filename"]
        .as_str()
        .unwrap();
    let img2 = image::load_from_memory(
        &t.get(&format!("/view?filename={name2}"))
            .await
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap()
    .to_rgb8();
    assert_ne!(img, img2);
    let s = t.sim.state();
    assert_eq!(s.jobs_run, 3);
    assert_eq!(s.jobs_succeeded, 3);
    assert!(
        s.busy_ms >= 2 * 4 * 10,
        "two sampled jobs of 4 steps x 10 ms: {}",
        s.busy_ms
    );
    t.sim.shutdown().await;
}

#[tokio::test]
async fn frontend_default_graph_samples_and_saves_a_png() {
    let t = quick_sim().await;
    let mut ws = t.ws(Some("default")).await;
    ws.send_feature_flags().await;
    ws.next().await;
    let id = t
        .queue_ok(&default_graph(156680208700286), Some("default"))
        .await;
    let frames = ws.until_done(&id).await;
    let progress: Vec<&Value> = frames
        .iter()
        .filter_map(Frame::json)
        .filter(|v| v["type"] == "progress")
        .collect();
    assert_eq!(progress.len(), 20, "one progress per KSampler step");
    assert!(
        progress
            .iter()
            .all(|p| p["data"]["node"] == "3" && p["data"]["max"] == 20)
    );
    assert_eq!(progress[19]["data"]["value"], 20);
    // A type-4 preview (with metadata) for every step, plus the legacy frame.
    let previews = frames.iter().filter(|f| f.ty() == "binary:4").count();
    assert_eq!(previews, 20);
    let executing: Vec<Value> = frames
        .iter()
        .filter_map(Frame::json)
        .filter(|v| v["type"] == "executing")
        .map(|v| v["data"]["node"].clone())
        .collect();
    assert_eq!(executing.last(), Some(&Value::Null));
    assert_eq!(executing.len(), 8, "seven nodes, then null: {executing:?}");

    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    assert_eq!(
        h["outputs"],
        json!({"9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}})
    );
    let r = t.get("/view?filename=ComfyUI_00001_.png&type=output").await;
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (512, 512));
    assert!(img.pixels().any(|p| p.0 == [255, 255, 255]), "stamped");
    t.sim.shutdown().await;
}

/// Every node added for the SD lessons, validated by the real spec and run: img2img through a
/// LoRA and clip skip, a two-stage KSamplerAdvanced, a hires-fix pass and a text preview.
fn taught_graph(color: u32) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "ltx-2-19b-distilled-lora-384.safetensors", "strength_model": 0.8, "strength_clip": 1}},
        "3": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["2", 1], "stop_at_clip_layer": -2}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red barn", "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "in the snow", "clip": ["3", 0]}},
        "6": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["5", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["3", 0]}},
        "8": {"class_type": "EmptyImage", "inputs": {"width": 100, "height": 50, "batch_size": 1, "color": color}},
        "9": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["8", 0], "upscale_method": "bilinear", "megapixels": 0.02, "resolution_steps": 8}},
        "10": {"class_type": "VAEEncode", "inputs": {"pixels": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["2", 0], "add_noise": "enable", "noise_seed": 5, "steps": 6, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["10", 0], "start_at_step": 2, "end_at_step": 4, "return_with_leftover_noise": "enable"}},
        "12": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["2", 0], "add_noise": "disable", "noise_seed": 5, "steps": 6, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["11", 0], "start_at_step": 4, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "13": {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["12", 0], "upscale_method": "nearest-exact", "scale_by": 1.5}},
        "14": {"class_type": "KSampler", "inputs": {"seed": 9, "steps": 3, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.5, "model": ["2", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["13", 0]}},
        "15": {"class_type": "LatentUpscale", "inputs": {"samples": ["14", 0], "upscale_method": "bilinear", "width": 0, "height": 256, "crop": "disabled"}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "SaveImage", "inputs": {"filename_prefix": "taught", "images": ["16", 0]}},
        "18": {"class_type": "PrimitiveInt", "inputs": {"value": 42}},
        "19": {"class_type": "PreviewAny", "inputs": {"source": ["18", 0]}}
    })
}

#[tokio::test]
async fn taught_sd_nodes_validate_and_run() {
    let t = quick_sim().await;
    let mut ws = t.ws(Some("sd")).await;
    ws.next().await;
    // Sums of the red and blue channels of the saved picture.
    let mut red_blue = Vec::new();
    for color in [0xFF0000, 0x0000FF] {
        let id = t.queue_ok(&taught_graph(color), Some("sd")).await;
        let frames = ws.until_done(&id).await;
        let mut steps: Vec<(String, u64)> = Vec::new();
        for v in frames.iter().filter_map(Frame::json) {
            if v["type"] == "progress" {
                let node = v["data"]["node"].as_str().unwrap().to_string();
                let max = v["data"]["max"].as_u64().unwrap();
                if !steps.contains(&(node.clone(), max)) {
                    steps.push((node, max));
                }
            }
        }
        // Sigmas sliced like ComfyUI: 2..4 of 6, then 4..6, then all 3 of the hires pass.
        assert_eq!(
            steps,
            [
                ("11".to_string(), 2),
                ("12".to_string(), 2),
                ("14".to_string(), 3)
            ]
        );
        let h = t.wait_history(&id).await;
        assert_eq!(h["status"]["status_str"], "success", "{h}");
        assert_eq!(h["outputs"]["19"], json!({"text": ["42"]}));
        let file = h["outputs"]["17"]["images"][0]["filename"]
            .as_str()
            .unwrap();
        let img = image::load_from_memory(
            &t.get(&format!("/view?filename={file}"))
                .await
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap()
        .to_rgb8();
        // 100x50 at 0.02 MP: 208x104 (steps of 8). By 1.5 in latent pixels: 26x13 -> 39x20
        // (19.5 rounds half to even), 312x160. Height 256 keeps the aspect:
        // round(39 * 256 / 20) = 499, floored to whole latent pixels: 496x256.
        assert_eq!(img.dimensions(), (496, 256));
        red_blue.push(img.pixels().fold((0u64, 0u64), |(r, b), p| {
            (r + u64::from(p.0[0]), b + u64::from(p.0[2]))
        }));
    }
    // The partial denoises keep some of the encoded input: its colour shows through.
    let (red_run, blue_run) = (red_blue[0], red_blue[1]);
    assert!(
        red_run.0 > blue_run.0 && blue_run.1 > red_run.1,
        "{red_blue:?}"
    );
    t.sim.shutdown().await;
}

#[tokio::test]
async fn ltx_text_to_video_writes_an_h264_mp4_in_the_prefix_subfolder() {
    let t = quick_sim().await;
    let id = t.queue_ok(&ltx_workflow(2, 9), None).await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    // ComfyUI's PreviewVideo: the file under "images", flagged animated.
    assert_eq!(
        h["outputs"]["14"],
        json!({"images": [{"filename": "ltx_00001_.mp4", "subfolder": "video", "type": "output"}], "animated": [true]})
    );
    assert!(t.sim.output_dir().join("video/ltx_00001_.mp4").is_file());
    let r = t
        .get("/view?filename=ltx_00001_.mp4&subfolder=video&type=output")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "video/mp4");
    let mp4 = Mp4::parse(&r.bytes().await.unwrap());
    // Constrained Baseline H.264, one sample per frame, 25 fps, the latent's 128x96.
    assert_eq!(mp4.codec, "avc1");
    assert_eq!(mp4.profile, 66);
    assert_eq!(mp4.samples, 9);
    assert_eq!((mp4.width, mp4.height), (128, 96));
    assert_eq!(mp4.duration_ms, 360);
    assert!(mp4.handler.contains("SIMULATED"), "{}", mp4.handler);
    // A second run counts on, in the same subfolder.
    let again = t.queue_ok(&ltx_workflow(3, 9), None).await;
    let h = t.wait_history(&again).await;
    assert_eq!(
        h["outputs"]["14"]["images"][0]["filename"],
        "ltx_00002_.mp4"
    );
    t.sim.shutdown().await;
}

#[tokio::test]
async fn shared_workflows_validate_and_run() {
    let t = quick_sim().await;
    let mut blur = workflow("slow_blur.json");
    // Full size is 2 x 2048x2048 and takes seconds of CPU in a debug build; same graph, smaller.
    blur["1"]["inputs"]["width"] = json!(128);
    blur["1"]["inputs"]["height"] = json!(128);
    let ids = [
        t.queue_ok(&workflow("nomodel.json"), None).await,
        t.queue_ok(&blur, None).await,
        t.queue_ok(&workflow("runtime_error.json"), None).await,
    ];
    let statuses: Vec<String> =
        futures_util::future::join_all(ids.iter().map(|id| t.wait_history(id)))
            .await
            .iter()
            .map(|h| h["status"]["status_str"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(statuses, ["success", "success", "error"]);
    let h = t.wait_history(&ids[1]).await;
    let file = h["outputs"]["4"]["images"][0]["filename"].as_str().unwrap();
    let img = image::load_from_memory(
        &t.get(&format!("/view?filename={file}"))
            .await
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap()
    .to_rgb8();
    // color 255 = blue; blurred stays blue; inverted is yellow.
    assert_eq!(img.get_pixel(64, 64).0, [255, 255, 0]);
    // A batch of two saves two files, as ComfyUI does.
    assert_eq!(
        h["outputs"]["4"]["images"],
        json!([
            {"filename": "slow_00001_.png", "subfolder": "", "type": "output"},
            {"filename": "slow_00002_.png", "subfolder": "", "type": "output"}
        ])
    );
    assert!(t.sim.output_dir().join("slow_00002_.png").is_file());
    t.sim.shutdown().await;
}

#[tokio::test]
async fn stamp_and_png_note_name_the_workflows_own_seed() {
    let t = quick_sim().await;
    let id = t
        .queue_ok(&flux_workflow(4, 701112851139362, 64), None)
        .await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    let png = t
        .get("/view?filename=flux2_00001_.png")
        .await
        .bytes()
        .await
        .unwrap();
    let keys: Vec<String> = png_text(&png).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["prompt", "comfyume-sim"]);
    assert_eq!(
        sim_note(&png),
        "SIMULATED by comfyume-sim (no GPU, nothing was generated): SEED 701112851139362  STEPS 4  euler"
    );
    // The frontend's default graph: KSampler's own widgets.
    let id = t.queue_ok(&default_graph(156680208700286), None).await;
    let h = t.wait_history(&id).await;
    let file = h["outputs"]["9"]["images"][0]["filename"].as_str().unwrap();
    let png = t
        .get(&format!("/view?filename={file}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert!(
        sim_note(&png).ends_with(": SEED 156680208700286  STEPS 20  euler"),
        "{}",
        sim_note(&png)
    );
    t.sim.shutdown().await;
}

/// With a served node set (here the whole captured ComfyUI v0.11.0 one) nodes pass opaque
/// values, so output nodes read the batch, seed, steps and sampler from the prompt's graph.
#[tokio::test]
async fn served_node_set_saves_batches_stamps_seeds_and_writes_videos() {
    let t = spawn_sim(SimConfig {
        object_info: Some(shared_file("api/object_info.json").into()),
        step_ms: 1,
        ..SimConfig::default()
    })
    .await;
    let mut blur = workflow("slow_blur.json");
    blur["1"]["inputs"]["width"] = json!(96);
    blur["1"]["inputs"]["height"] = json!(64);
    let id = t.queue_ok(&blur, None).await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    assert_eq!(
        h["outputs"]["4"]["images"],
        json!([
            {"filename": "slow_00001_.png", "subfolder": "", "type": "output"},
            {"filename": "slow_00002_.png", "subfolder": "", "type": "output"}
        ])
    );
    let png = t
        .get("/view?filename=slow_00002_.png")
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        image::load_from_memory(&png)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (96, 64)
    );
    assert_eq!(
        sim_note(&png),
        "SIMULATED by comfyume-sim (no GPU, nothing was generated)"
    );

    let id = t
        .queue_ok(&flux_workflow(4, 701112851139362, 64), None)
        .await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    let file = h["outputs"]["13"]["images"][0]["filename"]
        .as_str()
        .unwrap();
    let png = t
        .get(&format!("/view?filename={file}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert!(
        sim_note(&png).ends_with(": SEED 701112851139362  STEPS 4  euler"),
        "{}",
        sim_note(&png)
    );

    let id = t.queue_ok(&ltx_workflow(2, 9), None).await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    assert_eq!(
        h["outputs"]["14"],
        json!({"images": [{"filename": "ltx_00001_.mp4", "subfolder": "video", "type": "output"}], "animated": [true]})
    );
    let mp4 = Mp4::parse(
        &t.get("/view?filename=ltx_00001_.mp4&subfolder=video&type=output")
            .await
            .bytes()
            .await
            .unwrap(),
    );
    assert_eq!((mp4.samples, mp4.width, mp4.height), (9, 128, 96));
    t.sim.shutdown().await;
}

#[tokio::test]
async fn served_object_info_accepts_its_classes_and_stamps_outputs() {
    let t = spawn_sim(SimConfig {
        object_info: Some(shared_file("api/object_info.json").into()),
        step_ms: 5,
        ..SimConfig::default()
    })
    .await;
    let info = t.get_json("/object_info").await;
    assert_eq!(info.as_object().unwrap().len(), 592);
    assert_eq!(t.sim.state().node_set, shared_file("api/object_info.json"));
    // A classic SD graph: no model files exist, but the classes do, so it runs.
    let prompt = json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "whatever.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 3, "cfg": 7, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sd", "images": ["8", 0]}}
    });
    let mut ws = t.ws(Some("ext")).await;
    ws.next().await;
    let id = t.queue_ok(&prompt, Some("ext")).await;
    let frames = ws.until_done(&id).await;
    let progress = frames.iter().filter(|f| f.ty() == "progress").count();
    assert_eq!(progress, 3, "KSampler steps");
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success");
    assert_eq!(h["outputs"]["9"]["images"][0]["filename"], "sd_00001_.png");
    let (s, body) = t
        .queue_prompt(
            &json!({"1": {"class_type": "NoSuchNode", "inputs": {}}}),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "invalid_prompt");
    t.sim.shutdown().await;
}
