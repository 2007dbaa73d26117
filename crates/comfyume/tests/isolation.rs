//! The isolation matrix: everything user001 keeps (settings, workflows,
//! uploads, outputs, temp files, WebSocket events) is out of user002's reach by
//! every route and every prefix.

use crate::helpers;

use helpers::{TestApp, next_json, png, spawn_app};
use serde_json::{Value, json};

const A: &str = "user001";
const B: &str = "user002";
const SECRET: &str = "user001-private-7f3a";

/// user001's belongings, made through the API (and one output on disk, as a job leaves it).
async fn user001_workspace(app: &TestApp) -> Vec<u8> {
    assert_eq!(
        app.post_json(A, "/api/settings", &json!({"Secret.Setting": SECRET}))
            .await
            .status,
        200
    );
    let wf = format!(r#"{{"note":"{SECRET}"}}"#);
    assert_eq!(
        app.post(A, "/api/userdata/workflows%2Fzq9.json", wf)
            .await
            .status,
        200
    );
    let img = png(3, 3, [1, 2, 3, 255]);
    let r = app
        .upload(A, "/api/upload/image", "zq9.png", img.clone(), &[])
        .await;
    assert_eq!(r.json()["name"], "zq9.png");
    let r = app
        .upload(
            A,
            "/api/upload/image",
            "zq9.png",
            img.clone(),
            &[("type", "temp"), ("subfolder", "t")],
        )
        .await;
    assert_eq!(r.json()["type"], "temp");
    let r = app
        .upload(
            A,
            "/api/upload/image",
            "zq9.png",
            img.clone(),
            &[("type", "temp")],
        )
        .await;
    assert_eq!(r.json()["type"], "temp");
    let out = app.dirs(A).outputs;
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("zq9_00001_.png"), &img).unwrap();
    img
}

fn assert_no_leak(r: &helpers::Resp, what: &str) {
    let body = r.text();
    assert!(
        !body.contains(SECRET) && !body.contains("zq9"),
        "{what} leaked: {body}"
    );
}

#[tokio::test]
async fn user002_cannot_read_anything_of_user001s_by_any_route() {
    let app = spawn_app().await;
    let img = user001_workspace(&app).await;
    // user001 sees all of it.
    assert_eq!(
        app.get(A, "/api/settings/Secret.Setting").await.json(),
        json!(SECRET)
    );
    assert_eq!(
        app.get(A, "/api/view?filename=zq9_00001_.png").await.body,
        img
    );

    let reads = [
        "/settings",
        "/settings/Secret.Setting",
        "/userdata/workflows%2Fzq9.json",
        "/userdata?dir=workflows",
        "/userdata?dir=workflows&recurse=true&full_info=true",
        "/v2/userdata",
        "/v2/userdata?path=workflows",
        "/view?filename=zq9.png&type=input",
        "/view?filename=zq9_00001_.png&type=output",
        "/view?filename=zq9_00001_.png",
        "/view?filename=zq9.png&type=temp&subfolder=t",
        "/view?filename=zq9.png%20%5Binput%5D",
        "/object_info",
        "/object_info/LoadImage",
    ];
    for path in reads {
        for prefix in ["", "/api", "/user002", "/user002/api"] {
            let p = format!("{prefix}{path}");
            let r = app.get(B, &p).await;
            assert!(matches!(r.status.as_u16(), 200 | 404), "{p}: {}", r.status);
            assert_no_leak(&r, &p);
        }
        for prefix in ["/user001", "/user001/api"] {
            let p = format!("{prefix}{path}");
            let r = app.get(B, &p).await;
            assert_eq!(r.status, 403, "{p}");
            assert_no_leak(&r, &p);
        }
    }
    assert_eq!(
        app.get(B, "/api/settings/Secret.Setting").await.text(),
        "null"
    );
    assert_eq!(
        app.get(B, "/api/view?filename=zq9.png&type=input")
            .await
            .status,
        404
    );
    assert_eq!(
        app.get(B, "/api/userdata/workflows%2Fzq9.json")
            .await
            .status,
        404
    );

    for kind in ["input", "output", "temp"] {
        for p in [
            format!("/internal/files/{kind}"),
            format!("/user002/internal/files/{kind}"),
        ] {
            let r = app.get(B, &p).await;
            assert_eq!((r.status.as_u16(), r.json()), (200, json!([])), "{p}");
        }
        assert_eq!(
            app.get(B, &format!("/user001/internal/files/{kind}"))
                .await
                .status,
            403
        );
        let own = app.get(A, &format!("/internal/files/{kind}")).await.json();
        assert_eq!(
            own.as_array().unwrap().len(),
            1,
            "{kind}: user001 sees their own"
        );
    }
    let info: Value = app.get(B, "/api/object_info").await.json();
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!([])
    );
    let info: Value = app.get(A, "/api/object_info").await.json();
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["zq9.png"])
    );
}

#[tokio::test]
async fn user002_cannot_modify_delete_or_move_user001s_files() {
    let app = spawn_app().await;
    let img = user001_workspace(&app).await;
    let wf_before = app.get(A, "/api/userdata/workflows%2Fzq9.json").await.body;

    for prefix in ["", "/api", "/user002", "/user002/api"] {
        let del = app
            .delete(B, &format!("{prefix}/userdata/workflows%2Fzq9.json"))
            .await;
        assert_eq!(del.status, 404, "{prefix}: delete");
        let mv = app
            .post(
                B,
                &format!("{prefix}/userdata/workflows%2Fzq9.json/move/workflows%2Fmine.json"),
                "",
            )
            .await;
        assert_eq!(mv.status, 404, "{prefix}: move");
        let set = app
            .post_json(
                B,
                &format!("{prefix}/settings"),
                &json!({"Secret.Setting": "changed"}),
            )
            .await;
        assert_eq!(
            set.status, 200,
            "{prefix}: user002 writes their own settings"
        );
    }
    for prefix in ["/user001", "/user001/api"] {
        let p = format!("{prefix}/userdata/workflows%2Fzq9.json");
        assert_eq!(app.delete(B, &p).await.status, 403, "{p}");
        assert_eq!(app.post(B, &p, "overwritten").await.status, 403, "{p}");
        let mv = format!("{prefix}/userdata/workflows%2Fzq9.json/move/workflows%2Fstolen.json");
        assert_eq!(app.post(B, &mv, "").await.status, 403, "{mv}");
        assert_eq!(
            app.post_json(B, &format!("{prefix}/settings"), &json!({"X": 1}))
                .await
                .status,
            403
        );
        assert_eq!(
            app.post(B, &format!("{prefix}/settings/Secret.Setting"), "1")
                .await
                .status,
            403
        );
        let up = app
            .upload(
                B,
                &format!("{prefix}/upload/image"),
                "zq9.png",
                png(3, 3, [9, 9, 9, 255]),
                &[("overwrite", "true")],
            )
            .await;
        assert_eq!(up.status, 403, "{prefix}: upload into user001's inputs");
    }
    // Writing the same names in their own space touches only their own copies.
    assert_eq!(
        app.post(B, "/api/userdata/workflows%2Fzq9.json", "theirs")
            .await
            .status,
        200
    );
    let r = app
        .upload(
            B,
            "/api/upload/image",
            "zq9.png",
            png(3, 3, [9, 9, 9, 255]),
            &[("overwrite", "true")],
        )
        .await;
    assert_eq!(r.json()["name"], "zq9.png");
    let mask = app
        .upload(
            B,
            "/api/upload/mask",
            "m.png",
            png(3, 3, [0, 0, 0, 0]),
            &[(
                "original_ref",
                r#"{"filename":"zq9_00001_.png","type":"output"}"#,
            )],
        )
        .await;
    assert_ne!(
        mask.status, 200,
        "a mask over user001's output cannot even find it"
    );

    assert_eq!(
        app.get(A, "/api/userdata/workflows%2Fzq9.json").await.body,
        wf_before
    );
    assert_eq!(
        app.get(A, "/api/settings").await.json(),
        json!({"Secret.Setting": SECRET})
    );
    assert_eq!(
        app.get(A, "/api/view?filename=zq9.png&type=input")
            .await
            .body,
        img
    );
    assert_eq!(
        app.get(A, "/api/view?filename=zq9_00001_.png").await.body,
        img
    );
    assert_eq!(
        app.get(A, "/api/view?filename=zq9.png&type=temp&subfolder=t")
            .await
            .body,
        img
    );
    let list = app.get(A, "/api/userdata?dir=workflows").await.json();
    assert!(list.as_array().unwrap().contains(&json!("zq9.json")));
    assert!(
        !list.as_array().unwrap().contains(&json!("mine.json"))
            && !list.as_array().unwrap().contains(&json!("stolen.json"))
    );
}

#[tokio::test]
async fn websocket_messages_for_user001_never_reach_user002() {
    let app = spawn_app().await;
    // Same client id on purpose: ids are chosen by browsers and can collide.
    let mut a = app.ws(A, "/ws?clientId=tab").await;
    let mut b = app.ws(B, "/ws?clientId=tab").await;
    let mut b_other = app.ws(B, "/user002/ws?clientId=other").await;
    for ws in [&mut a, &mut b, &mut b_other] {
        assert_eq!(next_json(ws).await["type"], "status");
    }
    let broadcast =
        json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 3}}}})
            .to_string();
    app.state.hub.send_user(A, &broadcast);
    let exec = json!({"type": "executing", "data": {"node": "3", "prompt_id": "p-of-user001"}})
        .to_string();
    assert!(app.state.hub.send_client(A, "tab", &exec));
    assert!(
        !app.state.hub.send_client(A, "other", &exec),
        "user002's client id is not user001's"
    );
    assert_eq!(
        next_json(&mut a).await["data"]["status"]["exec_info"]["queue_remaining"],
        3
    );
    assert_eq!(next_json(&mut a).await["data"]["prompt_id"], "p-of-user001");

    // A marker sent to user002 afterwards must be the very next thing they see.
    let marker = json!({"type": "marker"}).to_string();
    app.state.hub.send_user(B, &marker);
    assert_eq!(next_json(&mut b).await, json!({"type": "marker"}));
    assert_eq!(next_json(&mut b_other).await, json!({"type": "marker"}));
    helpers::assert_silent(&mut a, 200).await;

    // The instructor watching user001's workspace is user001's audience, not user002's.
    let mut t = app.ws(helpers::ADMIN, "/user001/ws?clientId=watch").await;
    next_json(&mut t).await;
    app.state.hub.send_user(A, &broadcast);
    assert_eq!(
        next_json(&mut t).await["data"]["status"]["exec_info"]["queue_remaining"],
        3
    );
    helpers::assert_silent(&mut b, 200).await;
}
