//! `--front-end-root` (the stock frontend and the routes it needs) and `--base-path` (every route
//! under a secret prefix), over real HTTP and WebSocket.

use crate::helpers::*;
use comfyume_sim::SimConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;

/// A frontend folder shaped like comfyui-frontend-package's `static/`.
fn fake_frontend(dir: &Path) {
    for (file, body) in [
        ("index.html", "<!doctype html><title>ComfyUI</title>"),
        ("assets/app.js", "console.log('app')"),
        ("assets/images/logo.svg", "<svg/>"),
        ("extensions/core/clipspace.js", "export {}"),
        ("extensions/core/readme.txt", "not a script"),
    ] {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
}

/// One request written by hand, so `..` reaches the server as sent (clients normalise it away).
fn raw_get(addr: std::net::SocketAddr, path: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut head = String::new();
    let _ = s.read_to_string(&mut head);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn front_end_root_serves_the_frontend_and_its_user_data() {
    let scratch = Scratch::new();
    let root = scratch.0.join("frontend");
    fake_frontend(&root);
    // A file beside the frontend folder, that no path may reach.
    std::fs::write(scratch.0.join("secret.txt"), "secret").unwrap();
    let t = spawn_sim(SimConfig {
        front_end_root: Some(root.clone()),
        ..SimConfig::default()
    })
    .await;
    let r = t.get("/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-cache");
    assert_eq!(r.headers()["pragma"], "no-cache");
    assert!(r.text().await.unwrap().contains("<title>ComfyUI</title>"));
    let r = t.get("/assets/app.js").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-cache");
    assert_eq!(r.text().await.unwrap(), "console.log('app')");
    assert_eq!(
        t.get("/assets/images/logo.svg").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        t.get("/assets/missing.js").await.status(),
        StatusCode::NOT_FOUND
    );
    // Nothing outside the folder, however the path is spelled.
    let addr = t.sim.addr();
    assert_eq!(
        tokio::task::spawn_blocking(move || raw_get(addr, "/assets/app.js"))
            .await
            .unwrap(),
        200
    );
    for path in [
        "/../secret.txt",
        "/assets/../../secret.txt",
        "/assets/%2e%2e/%2e%2e/secret.txt",
        "/assets/..%2f..%2fsecret.txt",
        "/%2e%2e/secret.txt",
    ] {
        let status = tokio::task::spawn_blocking(move || raw_get(addr, path))
            .await
            .unwrap();
        assert!(matches!(status, 400 | 404), "{path}: {status}");
    }
    // The API still wins over the static files.
    assert_eq!(
        t.get_json("/prompt").await["exec_info"]["queue_remaining"],
        0
    );

    // What the frontend asks at load, in ComfyUI's single-user shapes.
    assert_eq!(
        t.get_json("/api/users").await,
        json!({"storage": "server", "migrated": true})
    );
    assert_eq!(
        t.get_json("/api/extensions").await,
        json!(["/extensions/core/clipspace.js"])
    );
    assert_eq!(t.get_json("/api/i18n").await, json!({}));
    assert_eq!(t.get_json("/api/global_subgraphs").await, json!({}));
    assert_eq!(t.get_json("/api/workflow_templates").await, json!({}));
    assert_eq!(
        t.get_json("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true")
            .await,
        json!([])
    );
    assert_eq!(
        t.get("/api/userdata?dir=subgraphs").await.status(),
        StatusCode::NOT_FOUND
    );

    // Settings: one at a time and merged.
    assert_eq!(t.get_json("/api/settings").await, json!({}));
    let r = t
        .post_json("/api/settings/Comfy.TutorialCompleted", &json!(true))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = t
        .post_json("/api/settings", &json!({"Comfy.Locale": "en"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        t.get_json("/api/settings").await,
        json!({"Comfy.TutorialCompleted": true, "Comfy.Locale": "en"})
    );
    assert_eq!(t.get_json("/api/settings/Comfy.Locale").await, json!("en"));
    assert_eq!(t.get_json("/api/settings/Nope").await, Value::Null);
    let r = t.post_json("/api/settings", &json!([1])).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Saving, listing, reading, moving and deleting a workflow, as the Workflows sidebar does.
    let save = |name: &str, overwrite: bool| {
        t.http
            .post(t.url(&format!(
                "/api/userdata/{name}?overwrite={overwrite}&full_info=true"
            )))
            .body(r#"{"nodes": []}"#)
            .send()
    };
    let r = save("workflows%2Fa.json", false).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["path"], "workflows/a.json");
    assert_eq!(info["size"], 13);
    let r = save("workflows%2Fa.json", false).await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        t.get_json("/api/userdata?dir=workflows").await,
        json!(["a.json"])
    );
    let r = t.get("/api/userdata/workflows%2Fa.json").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), r#"{"nodes": []}"#);
    let r = t
        .http
        .post(t.url("/api/userdata/workflows%2Fa.json/move/workflows%2Fb.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!("workflows/b.json"));
    let r = t
        .http
        .delete(t.url("/api/userdata/workflows%2Fb.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        t.get("/api/userdata/workflows%2Fb.json").await.status(),
        StatusCode::NOT_FOUND
    );
    // No way out of the user's folder.
    for path in [
        "/api/userdata/..%2F..%2Finput%2Fx.png",
        "/api/userdata?dir=..%2F..",
    ] {
        assert_eq!(t.get(path).await.status(), StatusCode::FORBIDDEN, "{path}");
    }
    let r = save("..%2F..%2Fescape.json", true).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(!t.sim.data_dir().join("escape.json").exists());

    // The model library: the files the simulated server pretends to have.
    let folders = t.get_json("/api/models").await;
    assert!(
        folders
            .as_array()
            .unwrap()
            .contains(&json!("diffusion_models"))
    );
    assert!(
        t.get_json("/api/models/diffusion_models")
            .await
            .as_array()
            .unwrap()
            .contains(&json!("flux-2-klein-4b.safetensors"))
    );
    assert_eq!(
        t.get("/api/models/nope").await.status(),
        StatusCode::NOT_FOUND
    );
    let ckpts = t.get_json("/api/experiment/models/checkpoints").await;
    assert!(
        ckpts
            .as_array()
            .unwrap()
            .contains(&json!({"name": "ltx-2-19b-distilled.safetensors", "pathIndex": 0}))
    );
    t.sim.shutdown().await;
}

#[tokio::test]
async fn without_a_frontend_root_there_is_no_page_and_a_bad_root_is_refused() {
    let t = quick_sim().await;
    assert_eq!(t.get("/").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(t.get_json("/api/extensions").await, json!([]));
    t.sim.shutdown().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = comfyume_sim::try_spawn(
        SimConfig {
            front_end_root: Some("/nonexistent/frontend".into()),
            ..SimConfig::default()
        },
        listener,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/frontend"), "{err}");
}

#[tokio::test]
async fn base_path_hides_every_route_outside_it() {
    let scratch = Scratch::new();
    fake_frontend(&scratch.0);
    let t = spawn_sim(SimConfig {
        step_ms: 1,
        base_path: Some("/k3y-42/".into()),
        front_end_root: Some(scratch.0.clone()),
        ..SimConfig::default()
    })
    .await;
    let addr = t.sim.addr();
    assert_eq!(t.sim.url(), format!("http://{addr}/k3y-42"));
    assert_eq!(t.sim.ws_url(), format!("ws://{addr}/k3y-42/ws"));
    let bare = |path: &str| format!("http://{addr}{path}");
    // Without the prefix: nothing of the API, the queue or the controls.
    for path in [
        "/",
        "/prompt",
        "/api/prompt",
        "/object_info",
        "/queue",
        "/history",
        "/view?filename=x.png",
        "/sim/state",
        "/api/settings",
        "/k3y-4",
        "/k3y-42x/prompt",
    ] {
        let r = t.http.get(bare(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "GET {path}");
    }
    let r = t
        .http
        .post(bare("/prompt"))
        .json(&json!({"prompt": workflow("nomodel.json")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .is_err(),
        "a WebSocket outside the prefix"
    );
    assert_eq!(t.sim.state().prompts_received, 0);
    // The frontend's public files are also served without the prefix (it asks for some by
    // absolute path); its page and everything else are not.
    assert_eq!(
        t.http
            .get(bare("/assets/app.js"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // The bare prefix sends a browser to the page under it.
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect.get(bare("/k3y-42")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers()["location"], "/k3y-42/");
    assert!(t.get("/").await.text().await.unwrap().contains("ComfyUI"));
    // Under it, everything works: WebSocket, prompt, history, view.
    let mut ws = t.ws(Some("owner")).await;
    assert_eq!(ws.next_json().await["type"], "status");
    let id = t.queue_ok(&workflow("nomodel.json"), Some("owner")).await;
    ws.until_done(&id).await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success");
    assert_eq!(
        t.get("/api/view?filename=nomodel_00001_.png")
            .await
            .status(),
        StatusCode::OK
    );
    t.sim.shutdown().await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(
        comfyume_sim::try_spawn(
            SimConfig {
                base_path: Some("no-slash".into()),
                ..SimConfig::default()
            },
            listener,
        )
        .await
        .is_err()
    );
}
