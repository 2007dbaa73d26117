//! The workshop-style graphs and the shared workflows run end to end and write real files.

use crate::helpers::*;
use comfyume_sim::SimConfig;
use image::AnimationDecoder;
use reqwest::StatusCode;
use serde_json::json;

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
async fn ltx_text_to_video_writes_an_animated_png() {
    let t = quick_sim().await;
    let id = t.queue_ok(&ltx_workflow(2, 9), None).await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success", "{h}");
    let ui = &h["outputs"]["14"];
    assert_eq!(ui["animated"], json!([true]));
    assert_eq!(ui["images"][0]["subfolder"], "video");
    let file = ui["images"][0]["filename"].as_str().unwrap();
    assert_eq!(file, "ltx_00001_.png");
    let r = t
        .get(&format!(
            "/view?filename={file}&subfolder=video&type=output"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    let dec = image::codecs::png::PngDecoder::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    assert!(dec.is_apng().unwrap());
    let frames = dec.apng().unwrap().into_frames().collect_frames().unwrap();
    assert_eq!(frames.len(), 9);
    assert_eq!(frames[0].buffer().dimensions(), (128, 96));
    assert_ne!(frames[0].buffer(), frames[8].buffer());
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
