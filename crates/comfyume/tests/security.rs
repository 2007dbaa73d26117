//! Issue 9 items 1, 5, 6, 7 and issue 13 item 7 as an attacker in the room
//! tries them: a participant's upload must never run as a page on this origin
//! (for them or for the instructor), names the file system would refuse answer
//! 400 and create nothing, one request cannot make the server keep megabytes
//! or chew a 10,000-node prompt, client-chosen ids are UUIDs, job errors show
//! no server paths, and two uploads of one name never overwrite each other.

use crate::helpers;

use std::process::{Command, Stdio};

use helpers::{ADMIN, PASSWORD, TestApp, png, spawn_app, workflow};
use reqwest::Method;
use serde_json::{Value, json};

const U: &str = "user001";
const UUID: &str = "2f1c8a0e-4b7d-4c3e-9a57-1d2e3f405162";

/// Markup a browser would run as a page if it were served as its name says.
fn markup() -> Vec<(&'static str, &'static str)> {
    let xhtml = r#"<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body><script>fetch('/admin/api/queue')</script></body></html>"#;
    vec![
        ("x.xhtml", xhtml),
        ("x.xht", xhtml),
        (
            "x.svg",
            r#"<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>"#,
        ),
        ("x.html", "<html><script>alert(1)</script></html>"),
        (
            "x.xml",
            r#"<?xml version="1.0"?><?xml-stylesheet type="text/xsl" href="x.xsl"?><a/>"#,
        ),
        (
            "x.xsl",
            r#"<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform"/>"#,
        ),
        ("x.xslt", "<xsl:stylesheet/>"),
    ]
}

fn csp(r: &helpers::Resp) -> Vec<String> {
    r.headers
        .get_all("content-security-policy")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

/// A participant file served as an opaque, sandboxed download.
fn assert_download(r: &helpers::Resp, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/octet-stream"),
        "{what}"
    );
    let disp = r.header("content-disposition").unwrap_or_default();
    assert!(disp.starts_with("attachment"), "{what}: {disp}");
    assert!(
        csp(r).iter().any(|p| p == "sandbox"),
        "{what}: {:?}",
        csp(r)
    );
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff"),
        "{what}"
    );
}

#[tokio::test]
async fn uploaded_markup_never_runs_for_its_owner_or_the_instructor() {
    let app = spawn_app().await;
    let d = app.dirs(U);
    for (name, body) in markup() {
        let up = app
            .upload(U, "/api/upload/image", name, body.as_bytes().to_vec(), &[])
            .await;
        assert_eq!(up.status, 200, "{name}: {}", up.text());
        assert_eq!(up.json()["name"], name);
        // The same bytes as an output and a temp file (a custom node could write them).
        std::fs::write(d.outputs.join(name), body).unwrap();
        std::fs::write(d.temp.join(name), body).unwrap();
        for kind in ["input", "output", "temp"] {
            let q = format!("view?filename={name}&type={kind}");
            let own = app.get(U, &format!("/api/{q}")).await;
            assert_download(&own, &format!("{name} ({kind}) as its owner"));
            assert_eq!(own.body, body.as_bytes(), "the bytes come back unchanged");
            let admin = app.get(ADMIN, &format!("/user001/api/{q}")).await;
            assert_download(&admin, &format!("{name} ({kind}) as the instructor"));
        }
    }
}

#[tokio::test]
async fn media_is_shown_inline_by_its_bytes_not_its_name() {
    let app = spawn_app().await;
    let pic = png(4, 4, [1, 2, 3, 255]);
    for (name, bytes) in [
        ("pic.png", pic.clone()),
        // An image called .xhtml is still only an image.
        ("trick.xhtml", pic.clone()),
    ] {
        let up = app
            .upload(U, "/api/upload/image", name, bytes.clone(), &[])
            .await;
        assert_eq!(up.status, 200);
        let r = app
            .get(
                ADMIN,
                &format!("/user001/api/view?filename={name}&type=input"),
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("image/png"),
            "{name}"
        );
        assert_eq!(
            r.header("content-disposition").unwrap(),
            format!("filename=\"{name}\""),
            "ComfyUI's disposition for media"
        );
        assert!(csp(&r).iter().any(|p| p == "sandbox"));
        assert_eq!(r.body, bytes);
    }
    // A page called .png: a download, and its preview conversion fails over to the same.
    let page = b"<html><script>alert(1)</script></html>".to_vec();
    app.upload(U, "/api/upload/image", "fake.png", page.clone(), &[])
        .await;
    for q in ["", "&preview=webp;50", "&channel=rgb"] {
        let r = app
            .get(U, &format!("/api/view?filename=fake.png&type=input{q}"))
            .await;
        assert_download(&r, &format!("fake.png{q}"));
    }
    // Previews of a real image are images, with the same protections.
    let r = app
        .get(U, "/api/view?filename=pic.png&type=input&preview=webp;50")
        .await;
    assert_eq!(r.header("content-type").as_deref(), Some("image/webp"));
    assert!(csp(&r).iter().any(|p| p == "sandbox"));
}

#[tokio::test]
async fn userdata_markup_is_a_download_and_user_css_styles_only_its_owner() {
    let app = spawn_app().await;
    for (name, body) in markup() {
        let r = app
            .post(
                U,
                &format!("/api/userdata/{name}"),
                body.as_bytes().to_vec(),
            )
            .await;
        assert_eq!(r.status, 200, "{name}");
        for (who, prefix) in [(U, ""), (ADMIN, "/user001")] {
            let r = app.get(who, &format!("{prefix}/api/userdata/{name}")).await;
            assert_download(&r, &format!("userdata {name} as {who}"));
        }
    }
    app.post(U, "/api/userdata/user.css", "body{display:none}")
        .await;
    let own = app.get(U, "/user001/api/userdata/user.css").await;
    assert_eq!(
        (own.status.as_u16(), own.text().as_str()),
        (200, "body{display:none}")
    );
    assert_eq!(
        own.header("content-type").as_deref(),
        Some("text/css; charset=utf-8")
    );
    // The instructor opening user001's UI gets the stock look (as with no user.css).
    let admin = app.get(ADMIN, "/user001/api/userdata/user.css").await;
    assert_eq!(admin.status, 404, "{}", admin.text());
}

fn assert_not_frameable(r: &helpers::Resp, what: &str) {
    assert_eq!(
        r.header("x-frame-options").as_deref(),
        Some("DENY"),
        "{what}"
    );
    assert!(
        csp(r).iter().any(|p| p.contains("frame-ancestors 'none'")),
        "{what}: {:?}",
        csp(r)
    );
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff"),
        "{what}"
    );
}

#[tokio::test]
async fn no_page_can_be_framed_and_the_websocket_upgrade_is_left_alone() {
    let app = spawn_app().await;
    let ui = app
        .get_with(U, "/user001/", &[("accept", "text/html")])
        .await;
    assert_eq!(ui.status, 200);
    assert_not_frameable(&ui, "the participant's UI");
    let admin_ui = app
        .get_with(ADMIN, "/user001/", &[("accept", "text/html")])
        .await;
    assert_not_frameable(&admin_ui, "the instructor on a participant's UI");
    let admin_api = app.get(ADMIN, "/admin/api/queue").await;
    assert_eq!(admin_api.status, 200);
    assert_not_frameable(&admin_api, "the admin API");
    let login = app.anon_get("/login", &[]).await;
    assert_not_frameable(&login, "the login page");
    let settings = app.get(U, "/api/settings").await;
    assert_not_frameable(&settings, "an API answer");

    use base64::Engine;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/user001/ws?clientId=sec", app.addr)
        .into_client_request()
        .unwrap();
    let cred = base64::engine::general_purpose::STANDARD.encode(format!("{U}:{PASSWORD}"));
    req.headers_mut()
        .insert("authorization", format!("Basic {cred}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().get("content-security-policy").is_none());
    assert!(resp.headers().get("x-frame-options").is_none());
    assert_eq!(helpers::next_json(&mut ws).await["type"], "status");
}

/// Every folder below `dir` (to show that a refused request created none).
fn folders(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.push(e.path());
            out.extend(folders(&e.path()));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn over_long_names_and_deep_paths_answer_400_and_create_nothing() {
    let app = spawn_app().await;
    assert_eq!(app.get(U, "/api/settings").await.status, 200);
    let d = app.dirs(U);
    let before = (folders(&d.user_data), folders(&d.inputs));
    let long = "n".repeat(300);
    let deep = vec!["d"; 40].join("%2F");
    let deeper = vec!["d"; 2000].join("/");
    let clear = |r: &helpers::Resp, what: &str| {
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let t = r.text();
        assert!(
            t.contains("longer than") || t.contains("levels"),
            "{what}: a clear message, got {t:?}"
        );
    };
    clear(
        &app.post(U, &format!("/api/userdata/{long}.json"), "{}")
            .await,
        "a 300-character userdata name",
    );
    clear(
        &app.post(
            U,
            &format!("/api/userdata/workflows%2F{long}%2Fx.json"),
            "{}",
        )
        .await,
        "a 300-character userdata folder",
    );
    clear(
        &app.post(U, &format!("/api/userdata/{deep}%2Fx.json"), "{}")
            .await,
        "a 40-level userdata path",
    );
    app.post(U, "/api/userdata/workflows%2Fok.json", "{}").await;
    clear(
        &app.post(
            U,
            &format!("/api/userdata/workflows%2Fok.json/move/workflows%2F{long}.json"),
            "",
        )
        .await,
        "a 300-character move destination",
    );
    let pic = png(2, 2, [0, 0, 0, 255]);
    clear(
        &app.upload(
            U,
            "/api/upload/image",
            "a.png",
            pic.clone(),
            &[("subfolder", &long)],
        )
        .await,
        "a 300-character upload subfolder",
    );
    clear(
        &app.upload(
            U,
            "/api/upload/image",
            "a.png",
            pic.clone(),
            &[("subfolder", &deeper)],
        )
        .await,
        "a 2,000-level upload subfolder",
    );
    clear(
        &app.upload(
            U,
            "/api/upload/image",
            &format!("{long}.png"),
            pic.clone(),
            &[],
        )
        .await,
        "a 300-character upload name",
    );
    let r = app
        .get(
            U,
            &format!("/api/view?filename=a.png&type=input&subfolder={long}"),
        )
        .await;
    clear(&r, "a 300-character view subfolder");
    assert_eq!(
        (folders(&d.user_data), folders(&d.inputs)),
        before,
        "no folder was created by a refused request"
    );
    // The longest allowed name works, and its `name (1)` twin fits too.
    let max = format!("{}.png", "m".repeat(251));
    for (i, colour) in [[1, 0, 0, 255], [2, 0, 0, 255]].into_iter().enumerate() {
        let r = app
            .upload(U, "/api/upload/image", &max, png(2, 2, colour), &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let got = r.json()["name"].as_str().unwrap().to_string();
        assert!(got.len() <= 255);
        assert_eq!(got == max, i == 0, "{got}");
    }
}

fn nodes(n: usize) -> Value {
    Value::Object(
        (0..n)
            .map(|i| {
                (
                    (i + 1).to_string(),
                    json!({"class_type": "PrimitiveInt", "inputs": {"value": 1}}),
                )
            })
            .collect(),
    )
}

async fn nothing_queued(app: &TestApp) {
    let q = app.get(U, "/api/queue").await.json();
    assert_eq!(q["queue_pending"], json!([]), "{q}");
    assert_eq!(app.get(U, "/api/history").await.json(), json!({}));
}

fn assert_comfyui_error(r: &helpers::Resp, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert_eq!(v["node_errors"], json!({}));
}

#[tokio::test]
async fn json_bodies_prompts_and_what_the_history_keeps_are_bounded() {
    let app = spawn_app().await;
    let huge = vec![b' '; 9 * 1024 * 1024];
    for path in [
        "/api/userdata/workflows%2Fbig.json",
        "/api/settings",
        "/api/settings/Comfy.Big",
    ] {
        let r = app.post(U, path, huge.clone()).await;
        assert_eq!(r.status, 413, "{path}");
        assert!(r.text().contains("larger than"), "{path}: {}", r.text());
    }
    assert_eq!(app.get(U, "/api/settings").await.json(), json!({}));
    // The frontend reads /prompt errors as ComfyUI's JSON.
    let r = app.post(U, "/api/prompt", huge).await;
    assert_comfyui_error(&r, 413, "request_too_large");
    // Many settings each under the cap cannot add up past it either.
    let chunk = "x".repeat(3 * 1024 * 1024);
    for i in 0..2 {
        let r = app
            .post_json(U, &format!("/api/settings/Comfy.Part{i}"), &json!(chunk))
            .await;
        assert_eq!(r.status, 200);
    }
    let r = app
        .post_json(U, "/api/settings/Comfy.Part2", &json!(chunk))
        .await;
    assert_eq!(r.status, 413, "{}", r.text());

    let r = app
        .post_json(U, "/api/prompt", &json!({"prompt": nodes(2001)}))
        .await;
    assert_comfyui_error(&r, 400, "prompt_too_large");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2001 nodes")
    );
    let mut ok = json!({"prompt": workflow("nomodel.json")});
    ok["extra_data"] =
        json!({"extra_pnginfo": {"workflow": {"notes": "y".repeat(5 * 1024 * 1024)}}});
    let r = app.post_json(U, "/api/prompt", &ok).await;
    assert_comfyui_error(&r, 400, "extra_data_too_large");
    nothing_queued(&app).await;
    // A real workflow still goes through.
    let r = app
        .post_json(
            U,
            "/api/prompt",
            &json!({"prompt": workflow("nomodel.json")}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn client_chosen_prompt_ids_are_uuids() {
    let app = spawn_app().await;
    for bad in [
        json!("../../x"),
        json!("a b"),
        json!("my-own-id-123"),
        json!(null),
        json!(7),
        json!(""),
    ] {
        let body = json!({"prompt": workflow("nomodel.json"), "prompt_id": bad});
        let r = app.post_json(U, "/api/prompt", &body).await;
        assert_comfyui_error(&r, 400, "invalid_prompt");
        assert_eq!(r.json()["error"]["message"], "Invalid prompt_id");
    }
    nothing_queued(&app).await;
    let body = json!({"prompt": workflow("nomodel.json"), "prompt_id": UUID});
    let r = app.post_json(U, "/api/prompt", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["prompt_id"], UUID);
}

#[tokio::test]
async fn job_errors_in_the_history_show_no_server_paths() {
    use comfyume_store::{EnqueueLimits, JobPatch, JobState, NewJob};
    let app = spawn_app().await;
    app.store
        .enqueue(
            NewJob {
                id: UUID.into(),
                user: U.into(),
                number: 1.0,
                priority: None,
                prompt: workflow("nomodel.json"),
                extra_data: json!({}),
                outputs_to_execute: vec!["3".into()],
                client_id: None,
            },
            EnqueueLimits::default(),
        )
        .await
        .unwrap();
    let error = json!({
        "prompt_id": UUID, "node_id": "1", "node_type": "LoadImage",
        "exception_message": "Invalid image file: /srv/comfyui/input/comfyume/user001/nope.png",
        "exception_type": "FileNotFoundError",
        "traceback": ["  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n"],
    });
    app.store
        .transition(
            UUID,
            &[JobState::Queued],
            JobState::Failed,
            JobPatch {
                messages: Some(json!([["execution_error", error]])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for path in ["/api/history", &format!("/api/history/{UUID}")] {
        let h = app.get(U, path).await.json();
        let text = h.to_string();
        assert!(!text.contains("/srv/") && !text.contains("/opt/"), "{text}");
        let msg = &h[UUID]["status"]["messages"][0][1];
        assert_eq!(msg["exception_message"], "Invalid image file: nope.png");
        assert_eq!(
            msg["traceback"][0],
            "  File \"execution.py\", line 496, in execute\n"
        );
    }
    let job = app.get(U, &format!("/api/jobs/{UUID}")).await.json();
    assert!(!job.to_string().contains("/opt/"), "{job}");
}

#[tokio::test]
async fn concurrent_uploads_of_one_name_each_get_their_own_file() {
    let app = std::sync::Arc::new(spawn_app().await);
    let mut tasks = Vec::new();
    for i in 0..12u8 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let bytes = png(8 + u32::from(i), 8, [i, 0, 0, 255]);
            let r = app
                .upload(U, "/api/upload/image", "same.png", bytes.clone(), &[])
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            (r.json()["name"].as_str().unwrap().to_string(), bytes)
        }));
    }
    let mut names = std::collections::HashSet::new();
    for t in tasks {
        let (name, bytes) = t.await.unwrap();
        let on_disk = std::fs::read(app.dirs(U).inputs.join(&name)).unwrap();
        assert_eq!(on_disk, bytes, "{name} holds its own upload's bytes");
        assert!(names.insert(name.clone()), "{name} was given twice");
    }
    assert!(names.contains("same.png") && names.contains("same (1).png"));
    // Identical bytes again (at once, twice): the existing name, nothing new.
    let again = png(8, 8, [0, 0, 0, 255]);
    let (a, b) = tokio::join!(
        app.upload(U, "/api/upload/image", "same.png", again.clone(), &[]),
        app.upload(U, "/api/upload/image", "same.png", again.clone(), &[])
    );
    let (a, b) = (a.json()["name"].clone(), b.json()["name"].clone());
    assert_eq!(a, b);
    assert!(names.contains(a.as_str().unwrap()));
    // Overwrite only when asked.
    let r = app
        .upload(
            U,
            "/api/upload/image",
            "same.png",
            png(1, 1, [9, 9, 9, 255]),
            &[("overwrite", "true")],
        )
        .await;
    assert_eq!(r.json()["name"], "same.png");
    let files = std::fs::read_dir(app.dirs(U).inputs).unwrap().count();
    assert_eq!(files, 12, "no temp file left behind");
}

const BIN: &str = env!("CARGO_BIN_EXE_comfyume");

fn comfyume(data: &std::path::Path, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .env_clear()
        .env("RUST_LOG", "warn")
        .current_dir(data.parent().unwrap())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn account_names_are_unique_and_unreserved_whatever_their_case() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let add = |name: &str| {
        comfyume(
            &data,
            &["users", "add", name, "--password-stdin"],
            "pw-1234",
        )
    };
    assert!(add("user001").status.success());
    for name in ["ADMIN", "Api", "Login", "USER001", "User001"] {
        let out = add(name);
        assert!(!out.status.success(), "{name} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot be an account name") || err.contains("already exists"),
            "{name}: {err}"
        );
    }
    let list = comfyume(&data, &["users", "list"], "");
    let text = String::from_utf8_lossy(&list.stdout);
    assert_eq!(text.lines().count(), 2, "only user001: {text}");
}

#[tokio::test]
async fn configured_limits_apply_to_the_real_server() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let frontend = tmp.path().join("frontend");
    helpers::fake_frontend(&frontend);
    let out = comfyume(
        &data,
        &["users", "add", "ann", "--password-stdin"],
        "ann-pass",
    );
    assert!(out.status.success());
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .current_dir(tmp.path())
        .env("RUST_LOG", "warn")
        .env("INFERENCE_MODE", "none")
        .env("MAX_JSON_BODY_MB", "1")
        .env("MAX_PROMPT_NODES", "3")
        .args(helpers::serve_args(&data, &frontend))
        .stderr(Stdio::null());
    let (mut child, url) = helpers::spawn_serve(cmd);
    let client = TestApp::client();
    let post = |path: &str, body: Vec<u8>| {
        client
            .request(Method::POST, format!("{url}{path}"))
            .basic_auth("ann", Some("ann-pass"))
            .body(body)
            .send()
    };
    let r = post("/api/settings", vec![b' '; 1024 * 1024 + 1])
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = post("/api/settings", b"{\"a\": 1}".to_vec()).await.unwrap();
    assert_eq!(r.status(), 200);
    let body = serde_json::to_vec(&json!({"prompt": nodes(4)})).unwrap();
    let r = post("/api/prompt", body).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "prompt_too_large", "{v}");
    let _ = child.kill();
    let _ = child.wait();
}
