//! Every participant route, as the stock frontend calls it: at `/X`, `/api/X`
//! and under the participant's `/user001/` prefix, with ComfyUI's status codes
//! and bodies (traces/routes_single_user.txt, traces/view_upload.txt).

use crate::helpers;

use std::time::{Duration, SystemTime};

use helpers::{TestApp, decode, next_json, png, spawn_app, spawn_app_with, variants};
use reqwest::Method;
use serde_json::{Value, json};

const U: &str = "user001";

fn assert_empty_ok(r: &helpers::Resp, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert!(
        r.body.is_empty(),
        "{what}: ComfyUI answers POSTs like this with an empty body, got {:?}",
        r.text()
    );
}

#[tokio::test]
async fn the_startup_routes_answer_everywhere_the_frontend_looks() {
    let app = spawn_app().await;
    for p in variants(U, "/system_stats") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/json"),
            "{p}"
        );
        let v = r.json();
        assert_eq!(v["system"]["comfyui_version"], "0.11.0", "{p}");
        assert_eq!(v["system"]["required_frontend_version"], "1.37.11", "{p}");
        assert_eq!(v["system"]["installed_templates_version"], "0.8.24", "{p}");
        assert_eq!(v["system"]["required_templates_version"], "0.8.24", "{p}");
        assert_eq!(v["system"]["embedded_python"], false, "{p}");
        assert!(
            v["system"]["ram_total"].is_u64() && v["system"]["argv"].is_array(),
            "{p}"
        );
        let dev = &v["devices"][0];
        for k in [
            "name",
            "type",
            "vram_total",
            "vram_free",
            "torch_vram_total",
            "torch_vram_free",
        ] {
            assert!(dev.get(k).is_some(), "{p}: devices[0] lacks {k}");
        }
    }
    for p in variants(U, "/features") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(
            r.json(),
            json!({"supports_preview_metadata": true, "max_upload_size": 104857600,
                   "extension": {"manager": {"supports_v4": true}}}),
            "{p}"
        );
    }
    // Single-user shape: the frontend shows no user picker (our login is the user).
    for p in variants(U, "/users") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(
            r.json(),
            json!({"storage": "server", "migrated": true}),
            "{p}"
        );
    }
    let r = app
        .post_json(U, "/api/users", &json!({"username": "Mallory"}))
        .await;
    assert_eq!(r.status, 400, "participants cannot create accounts");
    assert!(r.json()["error"].is_string());

    for (path, want) in [
        ("/i18n", json!({})),
        ("/embeddings", json!([])),
        ("/global_subgraphs", json!({})),
        ("/workflow_templates", json!({})),
        ("/models/checkpoints", json!([])),
        ("/experiment/models/checkpoints", json!([])),
    ] {
        for p in variants(U, path) {
            let r = app.get(U, &p).await;
            assert_eq!(r.status, 200, "{p}");
            assert_eq!(r.json(), want, "{p}");
        }
    }
    let want_models: Value =
        serde_json::from_str(&std::fs::read_to_string(helpers::shared("api/models.json")).unwrap())
            .unwrap();
    for p in variants(U, "/models") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(
            r.json(),
            want_models,
            "{p}: ComfyUI's folder keys, in its order"
        );
    }
    for p in variants(U, "/models/bogus") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 404, "{p}");
        assert!(r.body.is_empty(), "{p}: ComfyUI's 404 here has no body");
    }
    for p in variants(U, "/experiment/models") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        let v = r.json();
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names.len(),
            want_models.as_array().unwrap().len() - 2,
            "{p}"
        );
        assert!(
            names.contains(&"checkpoints") && names.contains(&"loras"),
            "{p}"
        );
        assert!(
            !names.contains(&"configs") && !names.contains(&"custom_nodes"),
            "{p}"
        );
        assert!(
            v.as_array()
                .unwrap()
                .iter()
                .all(|e| e["folders"].is_array()),
            "{p}"
        );
    }
    assert_eq!(app.get(U, "/api/experiment/models/bogus").await.status, 404);
}

#[tokio::test]
async fn extensions_list_the_frontend_core_scripts_and_ours() {
    let app = spawn_app().await;
    for p in variants(U, "/extensions") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        let list = r.json();
        let list: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            list.contains(&"/extensions/core/groupNode.js"),
            "{p}: {list:?}"
        );
        assert!(
            list.contains(&"/extensions/comfyume/comfyume.js"),
            "{p}: {list:?}"
        );
    }
    // And the scripts it names load, from the root and from the participant's prefix.
    for p in [
        "/extensions/comfyume/comfyume.js",
        "/user001/extensions/comfyume/comfyume.js",
    ] {
        let r = app.get(U, p).await;
        assert_eq!(r.status, 200, "{p}");
        assert!(
            r.header("content-type").unwrap().contains("javascript"),
            "{p}"
        );
        assert!(!r.body.is_empty());
    }
    let r = app.get(U, "/extensions/core/groupNode.js").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "export {}"));
}

#[tokio::test]
async fn settings_are_read_and_merged_as_comfyui_does() {
    let app = spawn_app().await;
    for p in variants(U, "/settings") {
        let r = app.get(U, &p).await;
        assert_eq!(
            (r.status.as_u16(), r.json()),
            (200, json!({})),
            "{p}: a new participant has no settings"
        );
    }
    let r = app
        .post_json(
            U,
            "/api/settings",
            &json!({"Comfy.Test": 1, "Comfy.Other": "x"}),
        )
        .await;
    assert_empty_ok(&r, "POST /api/settings");
    for p in variants(U, "/settings") {
        assert_eq!(
            app.get(U, &p).await.json(),
            json!({"Comfy.Test": 1, "Comfy.Other": "x"}),
            "{p}"
        );
    }
    for p in variants(U, "/settings/Comfy.Test") {
        let r = app.get(U, &p).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "1"), "{p}");
    }
    for p in variants(U, "/settings/Missing.Key") {
        let r = app.get(U, &p).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "null"), "{p}");
    }
    // Each form of POST, through each route form.
    for (i, p) in variants(U, "/settings/Comfy.Test").iter().enumerate() {
        let r = app.post(U, p, format!("{}", 40 + i)).await;
        assert_empty_ok(&r, p);
        assert_eq!(
            app.get(U, "/settings/Comfy.Test").await.json(),
            json!(40 + i),
            "{p}"
        );
    }
    for (i, p) in variants(U, "/settings").iter().enumerate() {
        let r = app
            .post_json(U, p, &json!({ format!("Via.{i}"): true }))
            .await;
        assert_empty_ok(&r, p);
    }
    let all = app.get(U, "/api/settings").await.json();
    assert_eq!(
        all["Comfy.Other"], "x",
        "POST /settings merges, never replaces"
    );
    assert_eq!(all["Comfy.Test"], 43);
    for i in 0..4 {
        assert_eq!(all[format!("Via.{i}")], true);
    }
    let post_one = app
        .post_json(U, "/api/settings/Comfy.Obj", &json!({"nested": [1, 2]}))
        .await;
    assert_empty_ok(&post_one, "a JSON object as one setting's value");
    assert_eq!(
        app.get(U, "/settings/Comfy.Obj").await.json(),
        json!({"nested": [1, 2]})
    );
}

#[tokio::test]
async fn invalid_settings_bodies_are_a_400_and_change_nothing() {
    let app = spawn_app().await;
    app.post_json(U, "/api/settings", &json!({"Keep": "me"}))
        .await;
    // ComfyUI answers 500 here; a client mistake is a 400.
    for (path, body) in [
        ("/api/settings", "{not json"),
        ("/api/settings", "[1, 2]"),
        ("/api/settings", ""),
        ("/api/settings/Comfy.X", "{not json"),
        ("/api/settings/Comfy.X", ""),
        ("/user001/api/settings/Comfy.X", "nope"),
    ] {
        let r = app.post(U, path, body).await;
        assert_eq!(r.status, 400, "{path} {body:?}: {}", r.text());
    }
    assert_eq!(
        app.get(U, "/api/settings").await.json(),
        json!({"Keep": "me"})
    );
}

#[tokio::test]
async fn concurrent_posts_of_different_settings_all_persist() {
    // The frontend posts several settings at once at start-up (a lost update
    // would silently reset a participant's preference).
    let app = std::sync::Arc::new(spawn_app().await);
    // Signed in already, as the frontend is by then (no 24 password checks at once).
    assert_eq!(app.get(U, "/api/settings").await.status, 200);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let path = if i % 2 == 0 {
                format!("/api/settings/Key.{i}")
            } else {
                format!("/user001/settings/Key.{i}")
            };
            app.post(U, &path, format!("{i}")).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let all = app.get(U, "/api/settings").await.json();
    for i in 0..24 {
        assert_eq!(all[format!("Key.{i}")], json!(i), "Key.{i} was lost: {all}");
    }
    assert_eq!(all.as_object().unwrap().len(), 24);
}

#[tokio::test]
async fn saving_listing_and_moving_workflows_follows_the_capture() {
    let app = spawn_app().await;
    for p in variants(U, "/userdata?dir=mine") {
        let r = app.get(U, &p).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (404, "Directory not found"),
            "{p}"
        );
    }
    for p in variants(U, "/userdata") {
        let r = app.get(U, &p).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (400, "Directory not provided"),
            "{p}"
        );
    }

    let r = app
        .post(U, "/api/userdata/mine%2Ftest.json", r#"{"a":1}"#)
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (200, json!("mine/test.json"))
    );
    let r = app
        .post(U, "/api/userdata/mine%2Ftest.json?overwrite=false", "{}")
        .await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (409, "File already exists")
    );
    let r = app
        .post(
            U,
            "/user001/api/userdata/mine%2Ftest2.json?full_info=true",
            r#"{"b":2}"#,
        )
        .await;
    assert_eq!(r.status, 200);
    let info = r.json();
    assert_eq!(
        (&info["path"], &info["size"]),
        (&json!("mine/test2.json"), &json!(7))
    );
    assert!(info["modified"].as_f64().unwrap() > 1.0e9 && info["created"].as_f64().is_some());

    for p in variants(U, "/userdata/mine%2Ftest.json") {
        let r = app.get(U, &p).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, r#"{"a":1}"#),
            "{p}: the 409 wrote nothing"
        );
        // Participant files are downloads (the frontend reads them with fetch).
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/octet-stream"),
            "{p}"
        );
    }
    assert_eq!(
        app.get(U, "/api/userdata/mine%2Fnope.json").await.status,
        404
    );

    app.post(U, "/api/userdata/mine%2Fsub%2Fdeep.json", "{}")
        .await;
    for p in variants(U, "/userdata?dir=mine") {
        assert_eq!(
            app.get(U, &p).await.json(),
            json!(["test.json", "test2.json"]),
            "{p}: no recursion asked"
        );
    }
    let r = app.get(U, "/api/userdata?dir=mine&recurse=true").await;
    assert_eq!(
        r.json(),
        json!(["sub/deep.json", "test.json", "test2.json"])
    );
    let r = app
        .get(U, "/api/userdata?dir=mine&recurse=true&split=true")
        .await;
    assert_eq!(
        r.json(),
        json!([
            ["sub/deep.json", "sub", "deep.json"],
            ["test.json", "test.json"],
            ["test2.json", "test2.json"]
        ])
    );
    let r = app.get(U, "/api/userdata?dir=mine&full_info=true").await;
    let v = r.json();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (&rows[0]["path"], &rows[0]["size"]),
        (&json!("test.json"), &json!(7))
    );
    assert_eq!(rows[1]["path"], "test2.json");
    assert!(
        rows.iter()
            .all(|r| r["modified"].is_number() && r["created"].is_number())
    );

    let r = app
        .post(
            U,
            "/api/userdata/mine%2Ftest.json/move/mine%2Fmoved.json",
            "",
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (200, json!("mine/moved.json"))
    );
    assert_eq!(
        app.get(U, "/api/userdata/mine%2Ftest.json").await.status,
        404
    );
    assert_eq!(
        app.get(U, "/api/userdata/mine%2Fmoved.json").await.text(),
        r#"{"a":1}"#
    );
    let r = app
        .post(
            U,
            "/user001/userdata/mine%2Ftest2.json/move/mine%2Fmoved.json?overwrite=false",
            "",
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (409, "File already exists")
    );
    assert_eq!(
        app.get(U, "/api/userdata/mine%2Fmoved.json").await.text(),
        r#"{"a":1}"#,
        "409 moved nothing"
    );
    let r = app
        .post(U, "/api/userdata/mine%2Fnope.json/move/mine%2Fx.json", "")
        .await;
    assert_eq!(r.status, 404, "moving a missing file");
    let r = app
        .post(
            U,
            "/api/userdata/mine%2Ftest2.json/move/mine%2Fmoved.json?full_info=true",
            "",
        )
        .await;
    assert_eq!(r.status, 200, "overwrite is the default");
    assert_eq!(
        (&r.json()["path"], &r.json()["size"]),
        (&json!("mine/moved.json"), &json!(7))
    );

    let r = app.delete(U, "/api/userdata/mine%2Fmoved.json").await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(
        app.delete(U, "/user001/userdata/mine%2Fmoved.json")
            .await
            .status,
        404
    );
    assert_eq!(app.get(U, "/api/userdata?dir=mine").await.json(), json!([]));
}

#[tokio::test]
async fn userdata_files_are_downloaded_never_rendered_except_user_css() {
    // A participant's page must not run on this origin when the instructor opens
    // /user001/api/userdata/… (later ComfyUI does the same).
    let app = spawn_app().await;
    app.post(U, "/api/userdata/page.html", "<script>alert(1)</script>")
        .await;
    app.post(U, "/api/userdata/pic.svg", "<svg onload=alert(1)/>")
        .await;
    for p in ["/api/userdata/page.html", "/api/userdata/pic.svg"] {
        let r = app.get(helpers::ADMIN, &format!("/user001{p}")).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/octet-stream"),
            "{p}"
        );
        assert!(
            r.header("content-disposition")
                .unwrap()
                .starts_with("attachment"),
            "{p}"
        );
        assert_eq!(
            r.header("x-content-type-options").as_deref(),
            Some("nosniff"),
            "{p}"
        );
    }
    // index.html links api/userdata/user.css: it stays a stylesheet.
    app.post(U, "/api/userdata/user.css", "body{color:red}")
        .await;
    let r = app.get(U, "/user001/api/userdata/user.css").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "body{color:red}")
    );
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/css; charset=utf-8")
    );
    assert_eq!(r.header("content-disposition"), None);
    assert_eq!(
        app.get("user002", "/api/userdata/user.css").await.status,
        404,
        "only if they made one"
    );
}

#[tokio::test]
async fn hidden_files_are_not_listed_like_comfyuis_glob() {
    let app = spawn_app().await;
    app.post(U, "/api/userdata/mine%2Fa.json", "{}").await;
    std::fs::write(app.dirs(U).user_data.join("mine/.a.json.tmp"), "half").unwrap();
    assert_eq!(
        app.get(U, "/api/userdata?dir=mine").await.json(),
        json!(["a.json"])
    );
}

#[tokio::test]
async fn v2_userdata_lists_directories_first_then_files() {
    let app = spawn_app().await;
    app.post_json(U, "/api/settings", &json!({"Comfy.Test": 1}))
        .await;
    app.post(U, "/api/userdata/workflows%2Fsub%2Fz.json", "{}")
        .await;
    // Byte order (Alpha, Gamma, beta, …) is not ComfyUI's order (alpha, beta, …, gamma).
    for f in ["Alpha.json", "beta.json", "Gamma.json", "zeta.json"] {
        app.post(U, &format!("/api/userdata/{f}"), "{}").await;
    }
    for p in variants(U, "/v2/userdata") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        let v = r.json();
        let rows = v.as_array().unwrap();
        let first_file = rows.iter().position(|e| e["type"] == "file").unwrap();
        assert!(
            rows[..first_file].iter().all(|e| e["type"] == "directory"),
            "{p}: {v}"
        );
        assert!(
            rows[first_file..].iter().all(|e| e["type"] == "file"),
            "{p}: {v}"
        );
        assert!(
            rows.contains(&json!({"name": "workflows", "path": "workflows", "type": "directory"}))
        );
        assert!(
            rows.contains(&json!({"name": "sub", "path": "workflows/sub", "type": "directory"}))
        );
        let settings = rows
            .iter()
            .find(|e| e["path"] == "comfy.settings.json")
            .expect("the settings file");
        assert_eq!(settings["name"], "comfy.settings.json");
        assert!(
            settings["size"].as_u64().unwrap() > 0
                && settings["modified"].as_f64().unwrap() > 1.0e9
        );
        assert!(
            rows.iter()
                .any(|e| e["path"] == "workflows/sub/z.json" && e["name"] == "z.json")
        );
        // ComfyUI sorts each group by name, case-insensitively.
        for group in [&rows[..first_file], &rows[first_file..]] {
            let names: Vec<String> = group
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_lowercase())
                .collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "{p}");
        }
    }
    let r = app.get(U, "/api/v2/userdata?path=workflows%2Fsub").await;
    assert_eq!(
        r.json(),
        json!([{"name": "z.json", "path": "workflows/sub/z.json", "type": "file", "size": 2,
                                  "modified": r.json()[0]["modified"]}])
    );
    for p in variants(U, "/v2/userdata?path=nope") {
        let r = app.get(U, &p).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (404, "Requested path not found"),
            "{p}"
        );
    }
}

fn load_image_choices(info: &Value) -> Vec<String> {
    info["LoadImage"]["input"]["required"]["image"][0]
        .as_array()
        .expect("LoadImage's image choices")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn object_info_is_the_full_library_with_only_the_participants_own_images() {
    let app = spawn_app().await;
    let shared: Value = serde_json::from_str(
        &std::fs::read_to_string(helpers::shared("api/object_info.json")).unwrap(),
    )
    .unwrap();
    for p in variants(U, "/object_info") {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        let v = r.json();
        assert_eq!(v.as_object().unwrap().len(), 592, "{p}");
        assert_eq!(
            v["KSampler"], shared["KSampler"],
            "{p}: other classes pass through unchanged"
        );
        // The capture server's own uploads ("up.png", ...) are not this participant's.
        assert_eq!(load_image_choices(&v), Vec::<String>::new(), "{p}");
        assert_eq!(
            v["LoadImage"]["input"]["required"]["image"][1],
            json!({"image_upload": true})
        );
    }
    app.upload(
        U,
        "/api/upload/image",
        "b.png",
        png(2, 2, [0, 0, 255, 255]),
        &[],
    )
    .await;
    app.upload(
        U,
        "/api/upload/image",
        "a.png",
        png(2, 2, [0, 255, 0, 255]),
        &[],
    )
    .await;
    app.upload(
        "user002",
        "/api/upload/image",
        "theirs.png",
        png(2, 2, [9, 9, 9, 255]),
        &[],
    )
    .await;
    let v = app.get(U, "/api/object_info").await.json();
    assert_eq!(
        load_image_choices(&v),
        vec!["a.png", "b.png"],
        "sorted, own uploads only"
    );
    let v = app.get("user002", "/api/object_info").await.json();
    assert_eq!(load_image_choices(&v), vec!["theirs.png"]);

    for p in variants(U, "/object_info/LoadImage") {
        let v = app.get(U, &p).await.json();
        assert_eq!(v.as_object().unwrap().len(), 1, "{p}");
        assert_eq!(load_image_choices(&v), vec!["a.png", "b.png"], "{p}");
    }
    for p in variants(U, "/object_info/EmptyImage") {
        let r = app.get(U, &p).await;
        assert_eq!(r.json(), json!({"EmptyImage": shared["EmptyImage"]}), "{p}");
    }
    for p in variants(U, "/object_info/NoSuchNode") {
        let r = app.get(U, &p).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "{}"),
            "{p}: ComfyUI's 200 {{}} for an unknown class"
        );
    }
}

fn view_path(q: &str) -> String {
    format!("/api/view?{q}")
}

#[tokio::test]
async fn uploading_an_image_deduplicates_renames_and_overwrites_like_comfyui() {
    let app = spawn_app().await;
    let first = png(4, 4, [255, 0, 0, 255]);
    let second = png(4, 4, [0, 255, 0, 255]);
    let third = png(4, 4, [0, 0, 255, 255]);
    for (i, p) in variants(U, "/upload/image").iter().enumerate() {
        let r = app
            .upload(U, p, &format!("v{i}.png"), first.clone(), &[])
            .await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(
            r.json(),
            json!({"name": format!("v{i}.png"), "subfolder": "", "type": "input"}),
            "{p}"
        );
    }

    let r = app
        .upload(U, "/api/upload/image", "up.png", first.clone(), &[])
        .await;
    assert_eq!(
        r.json(),
        json!({"name": "up.png", "subfolder": "", "type": "input"})
    );
    let r = app
        .upload(U, "/api/upload/image", "up.png", first.clone(), &[])
        .await;
    assert_eq!(
        r.json(),
        json!({"name": "up.png", "subfolder": "", "type": "input"}),
        "same bytes: same name"
    );
    let r = app
        .upload(U, "/api/upload/image", "up.png", second.clone(), &[])
        .await;
    assert_eq!(
        r.json(),
        json!({"name": "up (1).png", "subfolder": "", "type": "input"}),
        "different bytes: renamed"
    );
    let r = app
        .upload(U, "/api/upload/image", "up.png", second.clone(), &[])
        .await;
    assert_eq!(
        r.json()["name"],
        "up (1).png",
        "the renamed copy is found again by its bytes"
    );
    assert_eq!(
        app.get(U, &view_path("filename=up.png&type=input"))
            .await
            .body,
        first
    );
    assert_eq!(
        app.get(U, &view_path("filename=up%20(1).png&type=input"))
            .await
            .body,
        second
    );

    let r = app
        .upload(
            U,
            "/api/upload/image",
            "up.png",
            third.clone(),
            &[("overwrite", "true")],
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"name": "up.png", "subfolder": "", "type": "input"})
    );
    assert_eq!(
        app.get(U, &view_path("filename=up.png&type=input"))
            .await
            .body,
        third,
        "overwritten"
    );

    let r = app
        .upload(
            U,
            "/api/upload/image",
            "up.png",
            first.clone(),
            &[("subfolder", "sub/dir"), ("type", "temp")],
        )
        .await;
    assert_eq!(
        r.json(),
        json!({"name": "up.png", "subfolder": "sub/dir", "type": "temp"})
    );
    assert_eq!(
        std::fs::read(app.dirs(U).temp.join("sub/dir/up.png")).unwrap(),
        first
    );
    let r = app
        .get(
            U,
            &view_path("filename=up.png&type=temp&subfolder=sub%2Fdir"),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.body.clone()), (200, first.clone()));

    for sub in ["../..", "../user002", "/etc", "a/../../b"] {
        let r = app
            .upload(
                U,
                "/api/upload/image",
                "x.png",
                first.clone(),
                &[("subfolder", sub)],
            )
            .await;
        assert_eq!(r.status, 400, "subfolder {sub:?}");
        assert!(r.body.is_empty(), "ComfyUI's 400 here is empty");
    }
    // A multipart form without the image field.
    let form = reqwest::multipart::Form::new().text("overwrite", "true");
    let r = TestApp::send(
        app.request(Method::POST, "/api/upload/image")
            .basic_auth(U, Some(helpers::PASSWORD))
            .multipart(form),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_with_413() {
    let app = spawn_app_with(|s| s.max_upload_bytes = 4096).await;
    assert_eq!(
        app.get(U, "/api/features").await.json()["max_upload_size"],
        4096
    );
    let big = vec![7u8; 32 * 1024];
    let r = app
        .upload(U, "/api/upload/image", "big.png", big, &[])
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        !app.dirs(U).inputs.join("big.png").exists(),
        "nothing was written"
    );
    let small = app
        .upload(
            U,
            "/api/upload/image",
            "small.png",
            png(2, 2, [1, 2, 3, 255]),
            &[],
        )
        .await;
    assert_eq!(small.status, 200, "an upload under the limit still works");
}

#[tokio::test]
async fn saving_a_mask_merges_its_alpha_into_the_original() {
    let app = spawn_app().await;
    let original = png(4, 4, [200, 10, 10, 255]);
    app.upload(U, "/api/upload/image", "photo.png", original, &[])
        .await;
    // The mask editor sends an image whose alpha is the mask: left half clear.
    let mut mask = image::RgbaImage::from_pixel(4, 4, image::Rgba([0, 0, 0, 255]));
    for y in 0..4 {
        for x in 0..2 {
            mask.put_pixel(x, y, image::Rgba([0, 0, 0, 0]));
        }
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    mask.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    for p in ["/api/upload/mask", "/user001/upload/mask"] {
        let r = app
            .upload(
                U,
                p,
                "clipspace-mask.png",
                buf.get_ref().clone(),
                &[
                    (
                        "original_ref",
                        r#"{"filename":"photo.png","subfolder":"","type":"input"}"#,
                    ),
                    ("type", "input"),
                    ("overwrite", "true"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{p}: {}", r.text());
        assert_eq!(
            r.json(),
            json!({"name": "clipspace-mask.png", "subfolder": "", "type": "input"})
        );
    }
    let saved = decode(
        &app.get(U, &view_path("filename=clipspace-mask.png&type=input"))
            .await
            .body,
    )
    .to_rgba8();
    assert_eq!(saved.dimensions(), (4, 4));
    assert_eq!(
        saved.get_pixel(0, 0).0,
        [200, 10, 10, 0],
        "colour of the original, alpha of the mask"
    );
    assert_eq!(saved.get_pixel(3, 3).0, [200, 10, 10, 255]);
    let r = app
        .upload(
            U,
            "/api/upload/mask",
            "m.png",
            buf.get_ref().clone(),
            &[("type", "input")],
        )
        .await;
    assert_eq!(r.status, 400, "a mask without original_ref");
}

/// An output of user001's as a job would leave it: 8×8, half transparent.
fn write_output(app: &TestApp) -> Vec<u8> {
    let mut img = image::RgbaImage::from_pixel(8, 8, image::Rgba([10, 200, 30, 255]));
    for x in 0..8 {
        img.put_pixel(x, 0, image::Rgba([10, 200, 30, 0]));
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let bytes = buf.into_inner();
    let dir = app.dirs(U).outputs;
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("nomodel_00001_.png"), &bytes).unwrap();
    bytes
}

#[tokio::test]
async fn view_serves_outputs_previews_and_channels_like_the_capture() {
    let app = spawn_app().await;
    let bytes = write_output(&app);
    for p in variants(
        U,
        "/view?filename=nomodel_00001_.png&subfolder=&type=output",
    ) {
        let r = app.get(U, &p).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("image/png"),
            "{p}"
        );
        assert_eq!(
            r.header("content-disposition").as_deref(),
            Some("filename=\"nomodel_00001_.png\""),
            "{p}"
        );
        assert_eq!(r.body, bytes, "{p}");
    }
    let r = app.get(U, &view_path("filename=nomodel_00001_.png")).await;
    assert_eq!(
        (r.status.as_u16(), r.body == bytes),
        (200, true),
        "type defaults to output"
    );
    let r = app
        .get(
            U,
            &view_path("filename=nomodel_00001_.png%20%5Boutput%5D&type=input"),
        )
        .await;
    assert_eq!(r.status, 200, "an annotated name overrides type");

    let r = app
        .get(
            U,
            &view_path("filename=nomodel_00001_.png&type=output&preview=webp;50"),
        )
        .await;
    assert_eq!(r.header("content-type").as_deref(), Some("image/webp"));
    assert_eq!(
        r.header("content-disposition").as_deref(),
        Some("filename=\"nomodel_00001_.png\"")
    );
    assert_eq!((&r.body[..4], &r.body[8..12]), (&b"RIFF"[..], &b"WEBP"[..]));
    assert_eq!(decode(&r.body).to_rgba8().dimensions(), (8, 8));
    let r = app
        .get(
            U,
            &view_path("filename=nomodel_00001_.png&type=output&preview=jpeg;80"),
        )
        .await;
    assert_eq!(r.header("content-type").as_deref(), Some("image/jpeg"));
    assert_eq!(&r.body[..3], &[0xff, 0xd8, 0xff]);

    let r = app
        .get(
            U,
            &view_path("filename=nomodel_00001_.png&type=output&channel=rgb"),
        )
        .await;
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    let rgb = decode(&r.body);
    assert!(!rgb.color().has_alpha(), "channel=rgb drops the alpha");
    assert_eq!(rgb.to_rgb8().get_pixel(0, 0).0, [10, 200, 30]);
    let r = app
        .get(
            U,
            &view_path("filename=nomodel_00001_.png&type=output&channel=a"),
        )
        .await;
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    let a = decode(&r.body).to_rgba8();
    assert_eq!(
        (a.get_pixel(0, 0).0[3], a.get_pixel(0, 1).0[3]),
        (0, 255),
        "channel=a carries the alpha"
    );

    for (q, status) in [
        ("filename=nomodel_00001_.png&type=input", 404),
        ("filename=nomodel_00001_.png&type=bogus", 400),
        ("filename=../etc/passwd&type=output", 400),
        ("filename=/etc/passwd&type=output", 400),
        ("filename=x.png&type=output&subfolder=../..", 403),
        ("type=output", 404),
        ("filename=missing.png&type=output", 404),
    ] {
        let r = app.get(U, &view_path(q)).await;
        assert_eq!(r.status, status, "{q}");
        assert!(r.body.is_empty(), "{q}: ComfyUI's error here has no body");
    }
}

#[tokio::test]
async fn view_answers_range_requests_for_scrubbing() {
    let app = spawn_app().await;
    let bytes = write_output(&app);
    let r = app
        .get_with(
            U,
            &view_path("filename=nomodel_00001_.png"),
            &[("range", "bytes=4-11")],
        )
        .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, bytes[4..12]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 4-11/{}", bytes.len()))
    );
    let r = app
        .get_with(
            U,
            &view_path("filename=nomodel_00001_.png"),
            &[("range", "bytes=-5")],
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_slice()),
        (206, &bytes[bytes.len() - 5..])
    );
}

/// An image (sent from memory in one read) answers as the file service does for big files:
/// its length, `Accept-Ranges`, a `Last-Modified` that a conditional request is held to,
/// and a HEAD with the length and no body.
#[tokio::test]
async fn view_of_a_small_file_keeps_http_file_semantics() {
    let app = spawn_app().await;
    let bytes = write_output(&app);
    let path = view_path("filename=nomodel_00001_.png");
    let r = app.get(U, &path).await;
    assert_eq!((r.status.as_u16(), &r.body), (200, &bytes));
    assert_eq!(r.header("content-length"), Some(bytes.len().to_string()));
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    let modified = r.header("last-modified").expect("Last-Modified");
    let r = app
        .get_with(U, &path, &[("if-modified-since", &modified)])
        .await;
    assert_eq!(r.status, 304, "not changed since");
    assert!(r.body.is_empty());
    let r = TestApp::send(
        app.request(Method::HEAD, &path)
            .basic_auth(U, Some(helpers::PASSWORD)),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(bytes.len().to_string()));
    assert!(r.body.is_empty(), "HEAD has no body");
}

/// A video far past the size read in bigger pieces: whole, byte for byte, and in ranges
/// that cross those pieces, with the media type its bytes have.
#[tokio::test]
async fn view_serves_a_big_video_whole_and_in_ranges() {
    let app = spawn_app().await;
    let dir = app.dirs(U).outputs.join("video");
    std::fs::create_dir_all(&dir).unwrap();
    // An MP4's `ftyp` box, then 3 MiB and a bit of varied bytes.
    let mut bytes = b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2".to_vec();
    bytes.extend((0..3 * 1024 * 1024 + 777u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8));
    std::fs::write(dir.join("clip.mp4"), &bytes).unwrap();
    let q = "filename=clip.mp4&subfolder=video&type=output";
    let r = app.get(U, &view_path(q)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("video/mp4"));
    assert!(r.body == bytes, "the whole file, byte for byte");
    let (from, to) = (256 * 1024 - 3, 3 * 256 * 1024 + 5);
    let r = app
        .get_with(
            U,
            &view_path(q),
            &[("range", &format!("bytes={from}-{to}"))],
        )
        .await;
    assert_eq!(r.status, 206);
    assert!(r.body == bytes[from..=to], "the range, byte for byte");
}

#[tokio::test]
async fn view_never_renders_markup_on_this_origin() {
    // An uploaded page must not run as this origin's page (it would act with
    // whoever opens it, e.g. the instructor).
    let app = spawn_app().await;
    let dir = app.dirs(U).inputs;
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("page.html"), "<script>alert(1)</script>").unwrap();
    let r = app
        .get(U, &view_path("filename=page.html&type=input"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(
        r.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
}

#[tokio::test]
async fn internal_files_lists_own_files_newest_first() {
    let app = spawn_app().await;
    for name in ["old.png", "mid.png", "new.png"] {
        app.upload(
            U,
            "/api/upload/image",
            name,
            png(2, 2, [name.len() as u8, 0, 0, 255]),
            &[],
        )
        .await;
    }
    let now = SystemTime::now();
    for (name, age) in [("old.png", 300), ("mid.png", 200), ("new.png", 100)] {
        let f = std::fs::File::options()
            .write(true)
            .open(app.dirs(U).inputs.join(name))
            .unwrap();
        f.set_modified(now - Duration::from_secs(age)).unwrap();
    }
    for p in ["/internal/files/input", "/user001/internal/files/input"] {
        let r = app.get(U, p).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(r.json(), json!(["new.png", "mid.png", "old.png"]), "{p}");
    }
    // Only the folder itself, like ComfyUI's os.scandir (and no dot files).
    app.upload(
        U,
        "/api/upload/image",
        "deep.png",
        png(2, 2, [1, 1, 1, 255]),
        &[("subfolder", "sub")],
    )
    .await;
    std::fs::write(app.dirs(U).inputs.join(".hidden.png"), "x").unwrap();
    assert_eq!(
        app.get(U, "/internal/files/input").await.json(),
        json!(["new.png", "mid.png", "old.png"])
    );
    assert_eq!(app.get(U, "/internal/files/output").await.json(), json!([]));
    assert_eq!(app.get(U, "/internal/files/temp").await.json(), json!([]));
    let r = app.get(U, "/internal/files/bogus").await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (400, json!({"error": "Invalid directory type"}))
    );
    // /internal is a sub-app at the root only.
    for p in [
        "/api/internal/folder_paths",
        "/api/internal/files/input",
        "/user001/api/internal/files/input",
    ] {
        assert_eq!(app.get(U, p).await.status, 404, "{p}");
    }
    assert_eq!(app.get(U, "/internal/folder_paths").await.status, 200);
}

#[tokio::test]
async fn the_websocket_greets_with_status_and_sid_on_every_path() {
    let app = spawn_app().await;
    for p in [
        "/ws?clientId=abc",
        "/api/ws?clientId=abc",
        "/user001/ws?clientId=abc",
        "/user001/api/ws?clientId=abc",
    ] {
        let mut ws = app.ws(U, p).await;
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"}}),
            "{p}"
        );
    }
    // Without a clientId the server makes one (uuid4 hex).
    let mut ws = app.ws(U, "/ws").await;
    let hello = next_json(&mut ws).await;
    let sid = hello["data"]["sid"].as_str().unwrap();
    assert!(
        sid.len() == 32 && sid.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sid}"
    );
}

#[tokio::test]
async fn feature_flags_are_answered_when_they_are_the_first_message() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let app = spawn_app().await;
    let mut ws = app.ws(U, "/ws?clientId=ff").await;
    next_json(&mut ws).await;
    let flags = r#"{"type":"feature_flags","data":{"supports_preview_metadata":true,"supports_manager_v4_ui":true}}"#;
    ws.send(Message::Text(flags.into())).await.unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 104857600,
               "extension": {"manager": {"supports_v4": true}}}})
    );
    // Only the first text message counts.
    ws.send(Message::Text(flags.into())).await.unwrap();
    helpers::assert_silent(&mut ws, 300).await;

    let mut late = app.ws(U, "/ws?clientId=late").await;
    next_json(&mut late).await;
    late.send(Message::Text(r#"{"type":"hello"}"#.into()))
        .await
        .unwrap();
    late.send(Message::Text(flags.into())).await.unwrap();
    helpers::assert_silent(&mut late, 300).await;
}

/// After `comfyume frontend precompress` (or serve's first start), the big static files go
/// out as the stored .br/.gz copies: what Chromium asks for, byte-identical once decoded,
/// with the same caching; a client that accepts nothing gets the plain file.
#[tokio::test]
async fn precompressed_frontend_files_are_sent_as_stored() {
    use std::io::Read;
    let app = spawn_app().await;
    let dir = app.state.settings.frontend_dir.clone();
    let plain = std::fs::read(dir.join("assets/index-abc.js")).unwrap();
    comfyume_gateway::precompress::precompress(&dir).unwrap();
    let chromium = "gzip, deflate, br, zstd";
    for p in ["/assets/index-abc.js", "/user001/assets/index-abc.js"] {
        let r = app.get_with(U, p, &[("accept-encoding", chromium)]).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(r.header("content-encoding").as_deref(), Some("br"), "{p}");
        assert_eq!(
            r.body,
            std::fs::read(dir.join("assets/index-abc.js.br")).unwrap()
        );
        let mut back = Vec::new();
        brotli::Decompressor::new(&r.body[..], 4096)
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, plain, "{p}");
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("text/javascript"),
            "{p}: the type of the file, not of the .br"
        );
        assert_eq!(
            r.header("cache-control").as_deref(),
            Some("public, max-age=31536000, immutable")
        );
        assert!(
            r.header("vary")
                .is_some_and(|v| v.to_ascii_lowercase().contains("accept-encoding")),
            "caches must key on the encoding"
        );
    }
    let r = app
        .get_with(U, "/assets/index-abc.js", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(
        r.body,
        std::fs::read(dir.join("assets/index-abc.js.gz")).unwrap()
    );
    let r = app.get(U, "/assets/index-abc.js").await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, plain);
}

#[tokio::test]
async fn the_frontend_page_is_never_cached_and_assets_are_cached_for_good() {
    let app = spawn_app().await;
    let index =
        "<!doctype html><title>ComfyUI</title><script src=\"./assets/index-abc.js\"></script>";
    for p in ["/", "/user001/"] {
        let r = app.get_with(U, p, &[("accept", "text/html")]).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(r.text(), index, "{p}");
        assert!(
            r.header("content-type").unwrap().starts_with("text/html"),
            "{p}"
        );
        assert_eq!(
            r.header("cache-control").as_deref(),
            Some("no-cache"),
            "{p}"
        );
        assert_eq!(r.header("pragma").as_deref(), Some("no-cache"), "{p}");
        assert_eq!(r.header("expires").as_deref(), Some("0"), "{p}");
    }
    for p in ["/assets/index-abc.js", "/user001/assets/index-abc.js"] {
        let r = app.get(U, p).await;
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(
            r.header("cache-control").as_deref(),
            Some("public, max-age=31536000, immutable"),
            "{p}"
        );
        assert_eq!(r.text(), "console.log('x');".repeat(200), "{p}");
        assert_eq!(
            r.header("content-encoding"),
            None,
            "{p}: not compressed unless asked"
        );
    }
    let r = app.get(U, "/scripts/app.js").await;
    assert_eq!(
        r.header("cache-control").as_deref(),
        Some("no-cache"),
        "unhashed scripts revalidate"
    );

    let r = app
        .get_with(U, "/assets/index-abc.js", &[("accept-encoding", "gzip")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(&r.body[..2], &[0x1f, 0x8b]);
    assert!(r.body.len() < 3400, "compressed: {} bytes", r.body.len());

    for (p, to) in [("/user001", "/user001/"), ("/user001?x=1", "/user001/?x=1")] {
        let r = app.get(U, p).await;
        assert!(r.status.is_redirection(), "{p}: {}", r.status);
        assert_eq!(r.header("location").as_deref(), Some(to), "{p}");
    }
    for p in ["/templates/index.json", "/user001/templates/index.json"] {
        let r = app.get(U, p).await;
        assert_eq!(r.status, 200, "{p}");
        assert!(
            r.header("content-type")
                .unwrap()
                .starts_with("application/json")
        );
        let index = r.json();
        assert_eq!(
            index[0]["title"], "Workshop",
            "{p}: the workshop's templates, first (see tests/workspace.rs)"
        );
        assert_eq!(
            index.as_array().unwrap().len(),
            1,
            "{p}: no official package"
        );
    }
    let r = app.get(U, "/templates/fuse_options.json").await;
    assert!(r.json()["keys"].is_array());
    assert_eq!(app.get(U, "/assets/nonexistent.js").await.status, 404);
    // A first segment that could be an account name is a workspace prefix: not
    // the caller's own, so 403 whether or not such an account exists (ComfyUI: 404).
    assert_eq!(app.get(U, "/nonexistent-path").await.status, 403);
}
