//! Issue 12: the participant's ComfyUI is complete. Every panel of the stock frontend has
//! what it reads (the Templates browser, the Model Library, the Assets panel), a tab that
//! connects mid-job catches up, prompt ids are each participant's own, "Download my work"
//! streams a zip, storage quotas hold, and outputs keep the folder the workflow asked for;
//! with user002 seeing none of user001's assets, zip entries or prompt ids, and traversal
//! tried in every new parameter.

use crate::helpers;

use helpers::{
    AppOptions, TestApp, Ws, assert_silent, decode, is_end_of, messages_until, next_json, png,
    sim_backend_slots, spawn_app, spawn_app_with, spawn_full, unzip, workflow,
};
use serde_json::{Value, json};

const U1: &str = "user001";
const U2: &str = "user002";

/// A template name as the frontend puts it in a URL path (it does not escape it; the
/// browser encodes the spaces).
fn url(name: &str) -> String {
    name.replace(' ', "%20")
}

/// `nomodel.json` (EmptyImage -> ImageInvert -> SaveImage) with its own colour and prefix.
fn nomodel(color: u32, prefix: &str) -> Value {
    let mut p = workflow("nomodel.json");
    p["1"]["inputs"]["color"] = json!(color);
    p["3"]["inputs"]["filename_prefix"] = json!(prefix);
    p
}

/// `slow_blur.json` at 64x64: the blur takes `31 x step_ms`, with a progress event per step.
fn slow_blur(color: u32) -> Value {
    let mut p = workflow("slow_blur.json");
    p["1"]["inputs"]["width"] = json!(64);
    p["1"]["inputs"]["height"] = json!(64);
    p["1"]["inputs"]["batch_size"] = json!(1);
    p["1"]["inputs"]["color"] = json!(color);
    p
}

/// A connected tab whose greeting `status` was read.
async fn tab(app: &TestApp, user: &str, client_id: &str) -> Ws {
    let mut ws = app.ws(user, &format!("/ws?clientId={client_id}")).await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "status", "{hello}");
    ws
}

async fn until_end(ws: &mut Ws, id: &str) -> Vec<Value> {
    messages_until(ws, 20, |v| is_end_of(v, id)).await
}

/// A server whose jobs run on a simulator (node definitions from it, as `serve` takes them).
async fn with_sim(
    step_ms: u64,
    tweak: impl FnOnce(&mut comfyume_gateway::Settings),
) -> (TestApp, comfyume_sim::SimHandle) {
    let (sim, backend) = sim_backend_slots("gpu", step_ms, 1).await;
    let mut opts = AppOptions {
        backends: vec![backend],
        real_object_info: false,
        ..Default::default()
    };
    tweak(&mut opts.settings_tweak);
    (spawn_full(opts).await, sim)
}

/// Runs `prompt` as `user`'s tab `client`, to its end; the `executed` outputs of the job.
async fn run(app: &TestApp, user: &str, client: &str, prompt: &Value) -> (String, Vec<Value>) {
    let mut ws = tab(app, user, client).await;
    let id = app.submit(user, client, prompt).await;
    let msgs = until_end(&mut ws, &id).await;
    assert!(
        msgs.iter().any(|m| m["type"] == "execution_success"),
        "{msgs:#?}"
    );
    let outputs = msgs
        .iter()
        .filter(|m| m["type"] == "executed")
        .map(|m| m["data"]["output"].clone())
        .collect();
    (id, outputs)
}

// ---- 1. Templates browser ------------------------------------------------------------

#[tokio::test]
async fn the_templates_browser_lists_the_workshop_templates_first() {
    let app = spawn_app().await;
    let r = app.get(U1, "/user001/templates/index.json").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let index = r.json();
    assert_eq!(
        index.as_array().unwrap().len(),
        1,
        "no official package here"
    );
    let cat = &index[0];
    assert_eq!(
        (&cat["moduleName"], &cat["title"], &cat["isEssential"]),
        (&json!("default"), &json!("Workshop"), &json!(true))
    );
    let listed = cat["templates"].as_array().unwrap();
    let titles: Vec<&str> = listed
        .iter()
        .map(|t| t["title"].as_str().unwrap())
        .collect();
    let builtin: Vec<&str> = comfyume_templates::all().iter().map(|t| t.name()).collect();
    assert_eq!(titles, builtin);
    for (t, b) in listed.iter().zip(comfyume_templates::all()) {
        let name = t["name"].as_str().unwrap();
        assert!(!t["description"].as_str().unwrap().is_empty(), "{t}");
        assert_eq!(
            (&t["mediaType"], &t["mediaSubtype"]),
            (&json!("image"), &json!("png"))
        );
        // Opening it loads the workflow itself.
        let wf = app
            .get(U1, &format!("/user001/templates/{}.json", url(name)))
            .await;
        assert_eq!(wf.status, 200, "{name}");
        assert_eq!(wf.text(), b.json, "{name}");
        // Its thumbnail, where the frontend looks for it.
        let th = app
            .get(U1, &format!("/user001/templates/{}-1.png", url(name)))
            .await;
        assert_eq!(
            (th.status.as_u16(), th.header("content-type").as_deref()),
            (200, Some("image/png")),
            "{name}"
        );
        let img = decode(&th.body);
        assert_eq!((img.width(), img.height()), (320, 320));
    }
    // A localized index (the frontend asks for its locale first) lists them too.
    let fr = app.get(U1, "/templates/index.fr.json").await.json();
    assert_eq!(fr[0]["templates"].as_array().unwrap().len(), 5);
    assert!(app.get(U1, "/templates/fuse_options.json").await.json()["keys"].is_array());

    // Nothing else, nothing outside, and nothing before signing in.
    std::fs::write(app.data_dir.join("canary.json"), r#"{"nodes": ["canary"]}"#).unwrap();
    for p in [
        "/templates/nope.json",
        "/templates/nope-1.png",
        "/templates/..%2Fcanary.json",
        "/templates/..%2F..%2Fdata%2Fcanary.json",
        "/templates/%2e%2e/canary.json",
        "/templates/workshop-templates%2F..%2F..%2Fcanary.json",
    ] {
        let r = app.get(U1, p).await;
        assert!(matches!(r.status.as_u16(), 400 | 404), "{p}: {}", r.status);
        assert!(!r.text().contains("canary"), "{p}");
    }
    let (status, body) = app.raw(U1, "/templates/../canary.json").await;
    assert!(matches!(status, 400 | 403 | 404), "{status}");
    assert!(!String::from_utf8_lossy(&body).contains("canary"));
    let anon = app.anon_get("/templates/index.json", &[]).await;
    assert_ne!(anon.status, 200, "templates need a signed-in participant");
}

#[tokio::test]
async fn a_workflow_dropped_in_the_folder_appears_without_a_restart() {
    let app = spawn_app().await;
    let drop = app.data_dir.join("workshop-templates");
    std::fs::create_dir_all(&drop).unwrap();
    let wf = json!({"nodes": [], "links": [], "version": 0.4,
        "extra": {"description": "Day two: upscale your best image."}});
    let wf_text = serde_json::to_string_pretty(&wf).unwrap();
    std::fs::write(drop.join("Day 2 - upscale.json"), &wf_text).unwrap();
    let thumb = png(64, 40, [10, 200, 30, 255]);
    std::fs::write(drop.join("Day 2 - upscale.png"), &thumb).unwrap();
    // Not templates: a half-copied dot file, an API-format prompt, broken JSON.
    std::fs::write(drop.join(".Day 3.json"), &wf_text).unwrap();
    std::fs::write(drop.join("api.json"), workflow("nomodel.json").to_string()).unwrap();
    std::fs::write(drop.join("broken.json"), "{").unwrap();

    let index = app.get(U1, "/templates/index.json").await.json();
    let listed = index[0]["templates"].as_array().unwrap();
    assert_eq!(listed.len(), 6, "{listed:#?}");
    let mine = &listed[5];
    assert_eq!(mine["title"], "Day 2 - upscale");
    assert_eq!(mine["description"], "Day two: upscale your best image.");
    assert_eq!(mine["mediaSubtype"], "png");
    let r = app.get(U2, "/templates/Day%202%20-%20upscale.json").await;
    assert_eq!(r.text(), wf_text);
    let r = app.get(U2, "/templates/Day%202%20-%20upscale-1.png").await;
    assert_eq!(r.body, thumb, "the instructor's own thumbnail");

    // Taken away again: gone at the next look.
    std::fs::remove_file(drop.join("Day 2 - upscale.json")).unwrap();
    let index = app.get(U1, "/templates/index.json").await.json();
    assert_eq!(index[0]["templates"].as_array().unwrap().len(), 5);
    assert_eq!(
        app.get(U1, "/templates/Day%202%20-%20upscale.json")
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn the_official_templates_follow_the_workshop_ones() {
    let official = tempfile::tempdir().unwrap();
    let dir = official.path().join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    let cat = |title: &str| {
        json!([{"moduleName": "default", "title": title, "type": "image",
            "templates": [{"name": "default", "mediaType": "image", "mediaSubtype": "webp", "description": "d"}]}])
    };
    std::fs::write(dir.join("index.json"), cat("Basics").to_string()).unwrap();
    std::fs::write(dir.join("index.fr.json"), cat("Bases").to_string()).unwrap();
    std::fs::write(
        dir.join("default.json"),
        r#"{"nodes": [], "official": true}"#,
    )
    .unwrap();
    std::fs::write(dir.join("default-1.webp"), b"RIFF....WEBP").unwrap();
    std::fs::write(
        dir.join("fuse_options.json"),
        r#"{"keys": [], "threshold": 0.5}"#,
    )
    .unwrap();
    std::fs::write(official.path().join("secret.txt"), "canary").unwrap();
    let app = spawn_app_with(|s| s.templates_dir = Some(dir.clone())).await;

    let titles = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["title"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        titles(app.get(U1, "/templates/index.json").await.json()),
        ["Workshop", "Basics"]
    );
    assert_eq!(
        titles(app.get(U1, "/templates/index.fr.json").await.json()),
        ["Workshop", "Bases"]
    );
    assert_eq!(
        titles(app.get(U1, "/templates/index.de.json").await.json()),
        ["Workshop", "Basics"],
        "no German index: the English one"
    );
    assert_eq!(
        app.get(U1, "/templates/default.json").await.json()["official"],
        true
    );
    assert_eq!(
        app.get(U1, "/templates/default-1.webp").await.body,
        b"RIFF....WEBP"
    );
    assert_eq!(
        app.get(U1, "/templates/fuse_options.json").await.json()["threshold"],
        0.5
    );
    // The workshop's own still come first by name.
    let r = app
        .get(
            U1,
            "/templates/Flux.2%20Klein%204B%20-%20text%20to%20image.json",
        )
        .await;
    assert_eq!(r.status, 200);
    for p in ["/templates/..%2Fsecret.txt", "/templates/%2e%2e/secret.txt"] {
        let r = app.get(U1, p).await;
        assert!(matches!(r.status.as_u16(), 400 | 404), "{p}: {}", r.status);
        assert!(!r.text().contains("canary"), "{p}");
    }
}

// ---- 2. Model library ------------------------------------------------------------------

#[tokio::test]
async fn the_model_library_lists_the_backends_models() {
    let (app, _sim) = with_sim(5, |_| {}).await;
    for p in helpers::variants(U1, "/models/diffusion_models") {
        let r = app.get(U1, &p).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(
            r.json(),
            json!([
                "flux-2-klein-4b.safetensors",
                "flux-2-klein-9b.safetensors",
                "flux-2-klein-base-9b.safetensors"
            ]),
            "{p}"
        );
    }
    let vae = app.get(U1, "/api/models/vae").await.json();
    assert_eq!(
        vae,
        json!(["flux2-vae.safetensors", "ltx-2-vae.safetensors"]),
        "pixel_space is no file"
    );
    let te = app.get(U1, "/api/models/text_encoders").await.json();
    assert!(
        te.as_array()
            .unwrap()
            .contains(&json!("qwen_3_4b.safetensors"))
    );
    let r = app
        .get(U1, "/user001/api/experiment/models/diffusion_models")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()[0],
        json!({"name": "flux-2-klein-4b.safetensors", "pathIndex": 0})
    );
    // A ComfyUI folder without files is empty; an unknown one is a 404, as in ComfyUI.
    assert_eq!(
        app.get(U1, "/api/models/upscale_models").await.json(),
        json!([])
    );
    for p in [
        "/api/models/nope",
        "/api/experiment/models/nope",
        "/api/models/..%2F..%2Fetc",
        "/api/experiment/models/..%2Finputs",
    ] {
        assert_eq!(app.get(U1, p).await.status, 404, "{p}");
    }

    // The picture of each model the library shows (the weights and any preview beside them
    // are on the GPU servers: a title card); anything else 404, as ComfyUI without one.
    let r = app
        .get(
            U1,
            "/api/experiment/models/preview/diffusion_models/0/flux-2-klein-4b.webp",
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    assert_eq!(decode(&r.body).width(), 320);
    for p in [
        "/api/experiment/models/preview/diffusion_models/0/nope.webp",
        "/api/experiment/models/preview/diffusion_models/1/flux-2-klein-4b.webp",
        "/api/experiment/models/preview/vae/0/flux-2-klein-4b.webp",
        "/api/experiment/models/preview/nope/0/flux-2-klein-4b.webp",
        "/api/experiment/models/preview/diffusion_models/0/..%2F..%2Fcomfyume.db",
        "/api/experiment/models/preview/..%2F..%2F/0/comfyume.webp",
    ] {
        assert_eq!(app.get(U1, p).await.status, 404, "{p}");
    }

    // view_metadata: a file the backends have answers (no metadata known here: `{}`);
    // anything else 404.
    let r = app
        .get(
            U1,
            "/api/view_metadata/diffusion_models?filename=flux-2-klein-4b.safetensors",
        )
        .await;
    assert_eq!((r.status.as_u16(), r.json()), (200, json!({})));
    for p in [
        "/api/view_metadata/diffusion_models?filename=nope.safetensors",
        "/api/view_metadata/diffusion_models",
        "/api/view_metadata/vae?filename=flux-2-klein-4b.safetensors",
        "/api/view_metadata/nope?filename=flux-2-klein-4b.safetensors",
        "/api/view_metadata/diffusion_models?filename=..%2F..%2Fcomfyume.db",
        "/api/view_metadata/..%2F..?filename=comfyume.db",
        "/view_metadata/diffusion_models?filename=%2Fetc%2Fpasswd",
    ] {
        let r = app.get(U1, p).await;
        assert_eq!(r.status, 404, "{p}");
        assert!(r.body.is_empty(), "{p}");
    }
}

// ---- 3. Assets ---------------------------------------------------------------------------

#[tokio::test]
async fn assets_are_the_participants_own_uploads_and_results() {
    let (app, _sim) = with_sim(5, |_| {}).await;
    let up = png(8, 8, [1, 2, 3, 255]);
    let r = app
        .upload(U1, "/api/upload/image", "up.png", up.clone(), &[])
        .await;
    assert_eq!(r.status, 200);
    let (_, outputs) = run(&app, U1, "tab", &nomodel(0xff0000, "nomodel")).await;
    let result = outputs[0]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();

    let all = app.get(U1, "/user001/api/assets").await;
    assert_eq!(all.status, 200);
    let all = all.json();
    assert_eq!(
        (&all["total"], &all["has_more"]),
        (&json!(2), &json!(false))
    );
    let names: Vec<&str> = all["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"up.png") && names.contains(&result.as_str()),
        "{all}"
    );

    let outs = app.get(U1, "/api/assets?include_tags=output").await.json();
    assert_eq!(outs["total"], 1);
    let a = &outs["assets"][0];
    assert_eq!(
        (&a["name"], &a["tags"]),
        (&json!(result), &json!(["output"]))
    );
    assert_eq!(a["mime_type"], "image/png");
    assert!(a["size"].as_u64().unwrap() > 0);
    assert!(a["created_at"].as_str().unwrap().ends_with('Z'));
    let id = a["id"].as_str().unwrap().to_string();
    // Its preview is the participant's own /view of it.
    let preview = a["preview_url"].as_str().unwrap();
    assert!(
        preview.starts_with("/api/view?type=output&filename="),
        "{preview}"
    );
    let r = app.get(U1, preview).await;
    assert_eq!(
        (r.status.as_u16(), r.header("content-type").as_deref()),
        (200, Some("image/png"))
    );
    // Under the prefix, the preview stays under it.
    let prefixed = app
        .get(U1, "/user001/api/assets?include_tags=output")
        .await
        .json();
    assert!(
        prefixed["assets"][0]["preview_url"]
            .as_str()
            .unwrap()
            .starts_with("/user001/api/view?")
    );
    let one = app.get(U1, &format!("/api/assets/{id}")).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["name"], json!(result));
    let content = app.get(U1, &format!("/api/assets/{id}/content")).await;
    assert_eq!(content.status, 200);
    assert!(content.body.starts_with(b"\x89PNG"));
    assert!(
        content
            .header("content-disposition")
            .unwrap()
            .starts_with("attachment")
    );
    let inputs = app
        .get(U1, "/api/assets?include_tags=input&exclude_tags=output")
        .await
        .json();
    assert_eq!(inputs["assets"][0]["name"], "up.png");

    let tags = app.get(U1, "/api/tags").await.json();
    assert_eq!(
        tags["tags"],
        json!([
            {"name": "input", "count": 1, "type": "system"},
            {"name": "output", "count": 1, "type": "system"}
        ])
    );
    // ComfyUI's asset routes live at /api only.
    assert_eq!(app.get(U1, "/api/api/assets").await.status, 404);
    // Bad queries get the asset API's error shape.
    for q in [
        "limit=0",
        "limit=501",
        "offset=-1",
        "sort=path",
        "order=sideways",
        "metadata_filter=%5B%5D",
    ] {
        let r = app.get(U1, &format!("/api/assets?{q}")).await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json()["error"]["code"], "INVALID_QUERY", "{q}");
    }

    // user002 sees none of it, whatever they ask for.
    let theirs = app.get(U2, "/api/assets").await.json();
    assert_eq!(
        (&theirs["total"], &theirs["assets"]),
        (&json!(0), &json!([]))
    );
    assert_eq!(
        app.get(U2, "/user002/api/tags").await.json()["tags"][0]["count"],
        0
    );
    for p in [
        format!("/api/assets/{id}"),
        format!("/api/assets/{id}/content"),
        format!("/user002/api/assets/{id}/content"),
    ] {
        let r = app.get(U2, &p).await;
        assert_eq!(r.status, 404, "{p}");
        assert!(!r.body.starts_with(b"\x89PNG"), "{p}");
    }
    assert_eq!(
        app.get(U2, &format!("/user001/api/assets/{id}"))
            .await
            .status,
        403
    );
    for p in [
        "/api/assets/..%2F..%2Fcomfyume.db",
        "/api/assets/..%2F..%2Fcomfyume.db/content",
        "/api/assets/not-a-uuid/content",
    ] {
        assert_eq!(app.get(U1, p).await.status, 404, "{p}");
    }
}

#[tokio::test]
async fn a_result_is_reused_as_an_input() {
    let (app, sim) = with_sim(5, |_| {}).await;
    let (_, outputs) = run(&app, U1, "tab", &nomodel(0x00ff00, "video/first")).await;
    let file = &outputs[0]["images"][0];
    let annotated = format!(
        "{}/{} [output]",
        file["subfolder"].as_str().unwrap(),
        file["filename"].as_str().unwrap()
    );
    // What the Assets panel's "Add to current workflow" makes: a LoadImage of the result.
    let reuse = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": annotated}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "again"}}
    });
    let (_, outputs) = run(&app, U1, "tab", &reuse).await;
    let again = outputs[0]["images"][0]["filename"].as_str().unwrap();
    let r = app
        .get(U1, &format!("/api/view?filename={again}&type=output"))
        .await;
    let img = decode(&r.body).to_rgb8();
    // The first result (green, inverted: magenta) inverted again: its own pixels went
    // through the second job.
    assert_eq!(img.get_pixel(0, 0).0, [0, 255, 0]);
    let received = sim.state().prompts_received;

    // user002 cannot name user001's result: refused before any backend sees it.
    let r = app.queue_prompt(U2, "tab", &reuse).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["error"]["type"], "prompt_outputs_failed_validation",
        "{v}"
    );
    assert_eq!(
        v["node_errors"]["1"]["errors"][0]["type"],
        "custom_validation_failed"
    );
    for hostile in [
        "../../user001/x.png [output]",
        "/etc/passwd [output]",
        "x.png [temp]",
    ] {
        let mut p = reuse.clone();
        p["1"]["inputs"]["image"] = json!(hostile);
        let r = app.queue_prompt(U1, "tab", &p).await;
        assert_eq!(r.status, 400, "{hostile}: {}", r.text());
    }
    assert_eq!(sim.state().prompts_received, received);
}

// ---- 4. Reload mid-job -------------------------------------------------------------------

#[tokio::test]
async fn a_tab_that_connects_mid_job_catches_up_and_follows_it() {
    let (app, _sim) = with_sim(60, |_| {}).await;
    let mut first = tab(&app, U1, "first").await;
    let id = app.submit(U1, "first", &slow_blur(0x0000ff)).await;
    // The blur (node 2, 31 x 60 ms) is running.
    messages_until(&mut first, 20, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    // A second tab of the same participant.
    let mut ws = app.ws(U1, "/ws?clientId=second").await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "status");
    let start = next_json(&mut ws).await;
    assert_eq!(
        (&start["type"], &start["data"]["prompt_id"]),
        (&json!("execution_start"), &json!(id)),
        "{start}"
    );
    let executing = next_json(&mut ws).await;
    assert_eq!(executing["type"], "executing", "{executing}");
    assert_eq!(executing["data"]["prompt_id"], json!(id));
    assert_eq!(executing["data"]["node"], "2", "the blur is running");
    let state = next_json(&mut ws).await;
    assert_eq!(state["type"], "progress_state", "{state}");
    assert_eq!(state["data"]["prompt_id"], json!(id));
    // Cumulative: the node that ran before, and the one running now.
    assert_eq!(state["data"]["nodes"]["2"]["state"], "running", "{state}");
    assert_eq!(state["data"]["nodes"]["1"]["state"], "finished", "{state}");
    // It then follows the job to its end like the tab that ran it.
    let rest = until_end(&mut ws, &id).await;
    assert!(
        rest.iter().any(|m| m["type"] == "execution_success"),
        "{rest:#?}"
    );
    assert!(rest.iter().any(|m| m["type"] == "progress_state"));
    let ran = until_end(&mut first, &id).await;
    assert!(ran.iter().any(|m| m["type"] == "execution_success"));

    // Nobody else hears of it, and nothing is replayed once the job is over.
    let mut other = app.ws(U2, "/ws?clientId=x").await;
    assert_eq!(next_json(&mut other).await["type"], "status");
    assert_silent(&mut other, 300).await;
    let mut late = app.ws(U1, "/ws?clientId=late").await;
    assert_eq!(next_json(&mut late).await["type"], "status");
    assert_silent(&mut late, 300).await;
}

#[tokio::test]
async fn a_reloaded_tab_catches_up_with_its_own_running_job() {
    let (app, _sim) = with_sim(60, |_| {}).await;
    let mut ws = tab(&app, U1, "tab").await;
    let mut spy = tab(&app, U2, "tab").await;
    let id = app.submit(U1, "tab", &slow_blur(0x00ffff)).await;
    messages_until(&mut ws, 20, |v| {
        v["type"] == "executing" && v["data"]["node"] == "2"
    })
    .await;
    drop(ws);
    // The reload: the same client id connects again.
    let mut again = app.ws(U1, "/ws?clientId=tab").await;
    let kinds: Vec<Value> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(next_json(&mut again).await);
        }
        v
    };
    let types: Vec<&str> = kinds.iter().map(|m| m["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["status", "execution_start", "executing", "progress_state"]
    );
    let rest = until_end(&mut again, &id).await;
    assert!(rest.iter().any(|m| m["type"] == "executed"));
    assert_silent(&mut spy, 200).await;
}

// ---- 5. Prompt ids per participant ----------------------------------------------------

#[tokio::test]
async fn a_prompt_id_is_each_participants_own() {
    let (app, sim) = with_sim(5, |_| {}).await;
    let id = "3f0b2c1e-9d8a-4e7b-a6c5-1234567890ab";
    let mut ws1 = tab(&app, U1, "t1").await;
    let mut ws2 = tab(&app, U2, "t2").await;
    let body = |color: u32, client: &str| json!({"prompt": nomodel(color, "nomodel"), "client_id": client, "prompt_id": id});
    let r = app
        .post_json(U1, "/api/prompt", &body(0xff0000, "t1"))
        .await;
    assert_eq!(
        (r.status.as_u16(), &r.json()["prompt_id"]),
        (200, &json!(id))
    );
    // user002 chooses the same id: accepted, and told nothing of user001's.
    let r = app
        .post_json(U2, "/api/prompt", &body(0x0000ff, "t2"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["prompt_id"], json!(id));
    // Each hears of their own job by that id.
    let m1 = until_end(&mut ws1, id).await;
    let m2 = until_end(&mut ws2, id).await;
    for msgs in [&m1, &m2] {
        assert!(msgs.iter().any(|m| m["type"] == "execution_success"));
        for m in msgs.iter().filter(|m| m["data"]["prompt_id"].is_string()) {
            assert_eq!(m["data"]["prompt_id"], json!(id), "{m}");
            for node in m["data"]["nodes"]
                .as_object()
                .into_iter()
                .flat_map(|n| n.values())
            {
                assert_eq!(node["prompt_id"], json!(id), "{m}");
            }
        }
    }
    assert_eq!(sim.state().jobs_succeeded, 2, "both ran");
    // Each one's history and job views under that id are their own.
    let color_of = |h: &Value| h[id]["prompt"][2]["1"]["inputs"]["color"].clone();
    let h1 = app.get(U1, &format!("/api/history/{id}")).await.json();
    let h2 = app.get(U2, &format!("/api/history/{id}")).await.json();
    assert_eq!(
        (color_of(&h1), color_of(&h2)),
        (json!(0xff0000), json!(0x0000ff))
    );
    assert_eq!(h2[id]["prompt"][1], json!(id));
    for msg in h2[id]["status"]["messages"].as_array().unwrap() {
        if let Some(p) = msg[1].get("prompt_id") {
            assert_eq!(p, &json!(id), "{msg}");
        }
    }
    let j2 = app.get(U2, &format!("/api/jobs/{id}")).await.json();
    assert_eq!(j2["id"], json!(id));
    assert_eq!(j2["workflow"]["prompt"]["1"]["inputs"]["color"], 0x0000ff);
    let listed = app.get(U2, "/api/jobs").await.json();
    assert_eq!(listed["jobs"][0]["id"], json!(id));
    let all = app.get(U2, "/api/history").await.json();
    assert_eq!(all.as_object().unwrap().keys().collect::<Vec<_>>(), [id]);
    // Outputs went each to their owner.
    assert_eq!(app.output_files(U1).len(), 1);
    assert_eq!(app.output_files(U2).len(), 1);
    // The same id again from user001 is refused; user002 deleting theirs leaves user001's.
    let r = app.post_json(U1, "/api/prompt", &body(1, "t1")).await;
    assert_eq!(r.status, 400);
    app.post_json(U2, "/api/history", &json!({"delete": [id]}))
        .await;
    assert_eq!(
        app.get(U2, &format!("/api/history/{id}")).await.json(),
        json!({})
    );
    assert_eq!(
        color_of(&app.get(U1, &format!("/api/history/{id}")).await.json()),
        json!(0xff0000)
    );
    // A participant never sees the other's jobs under any id.
    let j1 = app.get(U1, "/api/jobs").await.json();
    assert_eq!(j1["pagination"]["total"], 1);
}

// ---- 6. Download my work -----------------------------------------------------------------

#[tokio::test]
async fn download_my_work_is_a_zip_of_outputs_and_workflows() {
    let (app, _sim) = with_sim(5, |_| {}).await;
    let (_, outputs) = run(&app, U1, "tab", &nomodel(0x123456, "video/clip")).await;
    let file = outputs[0]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .to_string();
    let wf = r#"{"nodes": [], "links": []}"#;
    for name in ["my%20flow.json", "what%3F.json", "CON.json"] {
        let r = app
            .post(U1, &format!("/api/userdata/workflows%2F{name}"), wf)
            .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    app.post(U2, "/api/userdata/workflows%2Ftheirs.json", wf)
        .await;

    for p in [
        "/api/comfyume/export.zip",
        "/user001/api/comfyume/export.zip",
        "/comfyume/export.zip",
    ] {
        let r = app.get(U1, p).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(r.header("content-type").as_deref(), Some("application/zip"));
        assert!(
            r.header("content-encoding").is_none(),
            "never gzipped again"
        );
        let cd = r.header("content-disposition").unwrap();
        assert!(cd.starts_with("attachment;") && cd.contains(".zip"), "{cd}");
        let entries = unzip(&r.body);
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        let output = format!("outputs/video/{file}");
        assert!(names.contains(&output.as_str()), "{names:?}");
        let on_disk = std::fs::read(app.dirs(U1).outputs.join("video").join(&file)).unwrap();
        let (_, bytes) = entries.iter().find(|(n, _)| *n == output).unwrap();
        assert_eq!(*bytes, on_disk);
        // Names every OS can extract.
        for n in [
            "workflows/my flow.json",
            "workflows/what_.json",
            "workflows/_CON.json",
        ] {
            assert!(names.contains(&n), "{n} in {names:?}");
        }
        for n in ["workflows/my flow.json", "workflows/what_.json"] {
            let (_, b) = entries.iter().find(|(e, _)| e == n).unwrap();
            assert_eq!(b, wf.as_bytes(), "{n}");
        }
        assert!(!names.iter().any(|n| n.contains("theirs")), "{names:?}");
        // Built-in templates were copied to the new participant's workflows too.
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("workflows/Flux.2 Klein 4B"))
        );
    }
    // user002's zip: their own only.
    let theirs = unzip(&app.get(U2, "/api/comfyume/export.zip").await.body);
    let names: Vec<&str> = theirs.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"workflows/theirs.json"));
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("outputs/") || n.contains("my flow")),
        "{names:?}"
    );
    assert_eq!(
        app.get(U2, "/user001/api/comfyume/export.zip").await.status,
        403
    );
    assert_ne!(
        app.anon_get("/api/comfyume/export.zip", &[]).await.status,
        200
    );
}

// ---- 7. Quotas ------------------------------------------------------------------------------

#[tokio::test]
async fn past_the_quota_uploads_and_jobs_are_refused_for_that_participant_only() {
    const QUOTA: u64 = 20_000;
    let (app, sim) = with_sim(5, |s| s.user_quota_bytes = Some(QUOTA)).await;
    let big = vec![7u8; 15_000];
    let r = app
        .upload(U1, "/api/upload/image", "a.bin", big.clone(), &[])
        .await;
    assert_eq!(r.status, 200, "fits");
    // Would go over: refused with the reason, nothing written.
    let r = app
        .upload(U1, "/api/upload/image", "b.bin", vec![1u8; 6_000], &[])
        .await;
    assert_eq!(r.status, 413);
    assert!(r.text().contains("does not fit"), "{}", r.text());
    assert!(!app.dirs(U1).inputs.join("b.bin").exists());
    // A job while there is room: accepted; its result takes user001 past the quota.
    let mut big_image = nomodel(0xabcdef, "big");
    big_image["1"]["inputs"]["width"] = json!(512);
    big_image["1"]["inputs"]["height"] = json!(512);
    run(&app, U1, "tab", &big_image).await;
    let status = app.get(U1, "/api/comfyume/status").await.json();
    let used = status["storage"]["used_bytes"].as_u64().unwrap();
    assert!(used >= QUOTA, "{status}");
    assert_eq!(status["storage"]["quota_bytes"], QUOTA);
    // Now no new job: a ComfyUI-shaped error the frontend shows, and no GPU sees it.
    let received = sim.state().prompts_received;
    let r = app.queue_prompt(U1, "tab", &nomodel(1, "x")).await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["type"], "quota_exceeded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("No new job can start"),
        "{v}"
    );
    assert_eq!(v["node_errors"], json!({}));
    assert_eq!(
        app.get(U1, "/api/queue").await.json()["queue_pending"],
        json!([])
    );
    let r = app
        .upload(
            U1,
            "/api/upload/image",
            "c.png",
            png(1, 1, [0, 0, 0, 255]),
            &[],
        )
        .await;
    assert_eq!(r.status, 413);
    // Others are unaffected.
    let r = app.upload(U2, "/api/upload/image", "a.bin", big, &[]).await;
    assert_eq!(r.status, 200);
    run(&app, U2, "tab", &nomodel(2, "theirs")).await;
    assert_eq!(
        sim.state().prompts_received,
        received + 1,
        "only user002's job"
    );
    // The instructor sees who is where.
    let usage = app.get(helpers::ADMIN, "/admin/api/usage").await;
    assert_eq!(usage.status, 200);
    let usage = usage.json();
    assert_eq!(usage["quota_bytes"], QUOTA);
    let row = |u: &str| {
        usage["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["user"] == u)
            .cloned()
            .unwrap()
    };
    assert_eq!(row(U1)["over_quota"], true);
    assert_eq!(row(U1)["inputs_bytes"], 15_000);
    assert_eq!(row(U1)["used_bytes"], used);
    assert_eq!(app.get(U1, "/admin/api/usage").await.status, 403);
}

#[tokio::test]
async fn without_a_quota_nothing_is_refused_and_the_banner_shows_usage() {
    let app = spawn_app().await;
    let r = app
        .upload(
            U1,
            "/api/upload/image",
            "a.png",
            png(4, 4, [0, 0, 0, 255]),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    let s = app.get(U1, "/api/comfyume/status").await.json();
    assert!(s["storage"]["used_bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["storage"]["quota_bytes"], Value::Null);
    assert_eq!(
        app.get(U2, "/api/comfyume/status").await.json()["storage"]["used_bytes"],
        0
    );
}

// ---- 8. Outputs where ComfyUI puts them ---------------------------------------------------

#[tokio::test]
async fn a_prefix_with_a_folder_keeps_its_subfolder() {
    let (app, _sim) = with_sim(5, |_| {}).await;
    let (id, outputs) = run(&app, U1, "tab", &nomodel(0x445566, "video/ltx2-distilled")).await;
    let image = &outputs[0]["images"][0];
    assert_eq!(image["subfolder"], "video", "{image}");
    assert_eq!(image["type"], "output");
    let file = image["filename"].as_str().unwrap();
    assert!(file.starts_with("ltx2-distilled"), "{file}");
    assert!(app.dirs(U1).outputs.join("video").join(file).is_file());
    assert!(
        app.output_files(U1).is_empty(),
        "nothing flattened into the top folder"
    );
    let h = app.get(U1, &format!("/api/history/{id}")).await.json();
    assert_eq!(h[&id]["outputs"]["3"]["images"][0]["subfolder"], "video");
    let r = app
        .get(
            U1,
            &format!("/api/view?filename={file}&subfolder=video&type=output"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        app.get(
            U2,
            &format!("/api/view?filename={file}&subfolder=video&type=output")
        )
        .await
        .status,
        404
    );
    // The Assets panel shows the layout too.
    let a = app.get(U1, "/api/assets?include_tags=output").await.json();
    assert_eq!(
        a["assets"][0]["user_metadata"]["filename"],
        format!("video/{file}")
    );
    assert!(
        a["assets"][0]["preview_url"]
            .as_str()
            .unwrap()
            .ends_with("&subfolder=video")
    );
    // A second run numbers on inside the same folder, never overwriting.
    let (_, again) = run(&app, U1, "tab", &nomodel(0x445566, "video/ltx2-distilled")).await;
    assert_ne!(again[0]["images"][0]["filename"], image["filename"]);
}
