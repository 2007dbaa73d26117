//! A participant's first sign-in puts the workshop's workflows in their
//! Workflows sidebar; after that the files are theirs: edits and deletions
//! survive later sign-ins and server restarts.

use crate::helpers;

use helpers::{PASSWORD, spawn_app};
use reqwest::Method;
use serde_json::{Value, json};

const U: &str = "user001";

fn template_names() -> Vec<String> {
    let mut v: Vec<String> = comfyume_templates::all()
        .iter()
        .map(|t| t.file_name.to_string())
        .collect();
    v.sort();
    v
}

fn enc(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn workflows(app: &helpers::TestApp, user: &str) -> Vec<String> {
    let v: Value = app.get(user, "/api/userdata?dir=workflows").await.json();
    let mut names: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn the_first_sign_in_copies_the_five_workshop_templates() {
    let app = spawn_app().await;
    assert_eq!(comfyume_templates::all().len(), 5);
    assert!(
        !app.dirs(U).user_data.join("workflows").exists(),
        "nothing before the first sign-in"
    );
    let cookie = app.login(U, PASSWORD).await.unwrap();
    let r = app
        .with_cookie(&cookie, Method::GET, "/api/userdata?dir=workflows", None)
        .await;
    assert_eq!(r.status, 200);
    let mut listed: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect();
    listed.sort();
    assert_eq!(listed, template_names());
    for t in comfyume_templates::all() {
        let r = app
            .get(
                U,
                &format!("/api/userdata/workflows%2F{}", enc(t.file_name)),
            )
            .await;
        assert_eq!(r.status, 200, "{}", t.file_name);
        assert_eq!(
            r.text(),
            t.json,
            "{} is the shipped template, byte for byte",
            t.file_name
        );
        let _: Value =
            serde_json::from_str(&r.text()).expect("a JSON workflow the frontend can open");
    }
    // Everyone gets their own copies.
    assert_eq!(workflows(&app, "user002").await, template_names());
    assert!(app.dirs("user002").user_data.join("workflows").is_dir());
}

#[tokio::test]
async fn an_edited_template_survives_later_sign_ins_and_a_restart() {
    let app = spawn_app().await;
    let first = &comfyume_templates::all()[0];
    let path = format!("/api/userdata/workflows%2F{}", enc(first.file_name));
    let edited =
        json!({"last_node_id": 0, "nodes": [], "links": [], "extra": {"mine": true}}).to_string();
    assert_eq!(app.get(U, "/api/settings").await.status, 200);
    assert_eq!(app.post(U, &path, edited.clone()).await.status, 200);

    // Sign in again (the form, then Basic), in this process.
    let cookie = app.login(U, PASSWORD).await.unwrap();
    assert_eq!(
        app.with_cookie(&cookie, Method::GET, &path, None)
            .await
            .text(),
        edited
    );
    // A restart: a fresh state over the same store and data directory.
    let restarted = app.fresh_state().await;
    comfyume_gateway::provision::ensure_user(&restarted, U)
        .await
        .unwrap();
    comfyume_gateway::provision::ensure_user(&restarted, U)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(
            app.dirs(U)
                .user_data
                .join("workflows")
                .join(first.file_name)
        )
        .unwrap(),
        edited
    );
    assert_eq!(app.get(U, &path).await.text(), edited);
    assert_eq!(workflows(&app, U).await, template_names());
}

#[tokio::test]
async fn a_deleted_template_does_not_come_back() {
    let app = spawn_app().await;
    let gone = &comfyume_templates::all()[1];
    let path = format!("/api/userdata/workflows%2F{}", enc(gone.file_name));
    assert_eq!(app.delete(U, &path).await.status, 204);
    let mut rest = template_names();
    rest.retain(|n| n != gone.file_name);
    assert_eq!(workflows(&app, U).await, rest);

    app.login(U, PASSWORD).await.unwrap();
    let restarted = app.fresh_state().await;
    comfyume_gateway::provision::ensure_user(&restarted, U)
        .await
        .unwrap();
    assert!(
        !app.dirs(U)
            .user_data
            .join("workflows")
            .join(gone.file_name)
            .exists()
    );
    assert_eq!(workflows(&app, U).await, rest);
    assert_eq!(app.get(U, &path).await.status, 404);
}

#[tokio::test]
async fn a_file_already_named_like_a_template_is_never_overwritten() {
    // Someone restoring a participant's folder from a backup before their first
    // sign-in: their file wins.
    let app = spawn_app().await;
    let t = &comfyume_templates::all()[2];
    let wf = app.dirs("user002").user_data.join("workflows");
    std::fs::create_dir_all(&wf).unwrap();
    std::fs::write(wf.join(t.file_name), "{\"restored\":true}").unwrap();
    assert_eq!(workflows(&app, "user002").await, template_names());
    assert_eq!(
        std::fs::read_to_string(wf.join(t.file_name)).unwrap(),
        "{\"restored\":true}"
    );
    for other in comfyume_templates::all()
        .iter()
        .filter(|o| o.file_name != t.file_name)
    {
        assert_eq!(
            std::fs::read_to_string(wf.join(other.file_name)).unwrap(),
            other.json
        );
    }
}
