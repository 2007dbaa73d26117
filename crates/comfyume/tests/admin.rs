//! The instructor steers the queue at run time; participants cannot.

use crate::helpers;

use helpers::*;
use serde_json::json;

async fn put(app: &TestApp, user: &str, path: &str, body: serde_json::Value) -> Resp {
    app.req(
        Some(user),
        reqwest::Method::PUT,
        path,
        Some(serde_json::to_vec(&body).unwrap()),
    )
    .await
}

fn prompt() -> serde_json::Value {
    json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    }})
}

#[tokio::test]
async fn participants_cannot_use_the_instructor_api() {
    let app = spawn_app().await;
    let r = app.get("user001", "/admin/api/queue").await;
    assert_eq!(r.status, 403);
    let r = put(
        &app,
        "user001",
        "/admin/api/queue/policy",
        json!({"policy": "fifo"}),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(app.state.queue.policy().as_str(), "round_robin");
    let r = app
        .req(None, reqwest::Method::GET, "/admin/api/queue", None)
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn instructor_changes_policy_and_sees_the_queue_in_serving_order() {
    let app = spawn_app().await;
    for _ in 0..3 {
        assert_eq!(
            app.post_json("user001", "/api/prompt", &prompt())
                .await
                .status,
            200
        );
    }
    assert_eq!(
        app.post_json("user002", "/api/prompt", &prompt())
            .await
            .status,
        200
    );

    // round_robin (the default): user002's only job is served second.
    let q = app.get(ADMIN, "/admin/api/queue").await.json();
    assert_eq!(q["policy"], "round_robin");
    let users: Vec<&str> = q["waiting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["user001", "user002", "user001", "user001"]);

    let r = put(
        &app,
        ADMIN,
        "/admin/api/queue/policy",
        json!({"policy": "fifo"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let q = app.get(ADMIN, "/admin/api/queue").await.json();
    let users: Vec<&str> = q["waiting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["user001", "user001", "user001", "user002"]);

    let r = put(
        &app,
        ADMIN,
        "/admin/api/queue/policy",
        json!({"policy": "lottery"}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("round_robin"));
    let r = put(&app, ADMIN, "/admin/api/queue/policy", json!("fifo")).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn priority_levels_put_a_participant_first() {
    let app = spawn_app().await;
    put(
        &app,
        ADMIN,
        "/admin/api/queue/policy",
        json!({"policy": "priority"}),
    )
    .await;
    for _ in 0..2 {
        app.post_json("user001", "/api/prompt", &prompt()).await;
    }
    app.post_json("user002", "/api/prompt", &prompt()).await;
    let r = put(
        &app,
        ADMIN,
        "/admin/api/users/user002/priority",
        json!({"level": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let q = app.get(ADMIN, "/admin/api/queue").await.json();
    assert_eq!(q["waiting"][0]["user"], "user002");

    assert_eq!(
        put(
            &app,
            ADMIN,
            "/admin/api/users/user002/priority",
            json!({"level": 9})
        )
        .await
        .status,
        400
    );
    assert_eq!(
        put(
            &app,
            ADMIN,
            "/admin/api/users/nobody/priority",
            json!({"level": 1})
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn instructor_raises_the_queue_caps() {
    let app = spawn_app().await;
    let r = put(
        &app,
        ADMIN,
        "/admin/api/queue/limits",
        json!({"max_queued_per_user": 1}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        app.post_json("user001", "/api/prompt", &prompt())
            .await
            .status,
        200
    );
    let r = app.post_json("user001", "/api/prompt", &prompt()).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 jobs waiting")
    );
    put(
        &app,
        ADMIN,
        "/admin/api/queue/limits",
        json!({"max_queued_per_user": 5}),
    )
    .await;
    assert_eq!(
        app.post_json("user001", "/api/prompt", &prompt())
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn a_job_priority_moves_that_job_ahead() {
    let app = spawn_app().await;
    put(
        &app,
        ADMIN,
        "/admin/api/queue/policy",
        json!({"policy": "priority"}),
    )
    .await;
    app.post_json("user001", "/api/prompt", &prompt()).await;
    let late = app
        .post_json("user002", "/api/prompt", &prompt())
        .await
        .json()["prompt_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = put(
        &app,
        ADMIN,
        &format!("/admin/api/jobs/{late}/priority"),
        json!({"level": 2}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let q = app.get(ADMIN, "/admin/api/queue").await.json();
    assert_eq!(q["waiting"][0]["id"], late.as_str());
    assert_eq!(
        app.store.get_job(&late).await.unwrap().unwrap().priority,
        Some(2)
    );
    assert_eq!(
        put(
            &app,
            ADMIN,
            "/admin/api/jobs/nope/priority",
            json!({"level": 1})
        )
        .await
        .status,
        404
    );
    assert_eq!(
        put(
            &app,
            ADMIN,
            &format!("/admin/api/jobs/{late}/priority"),
            json!({"level": 7})
        )
        .await
        .status,
        400
    );
}

#[tokio::test]
async fn serverless_routes_say_so_on_other_inference_modes() {
    let app = spawn_app().await;
    for path in ["/admin/api/serverless", "/admin/api/costs"] {
        let r = app.get(ADMIN, path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["error"], "INFERENCE_MODE is not serverless");
        assert_eq!(app.get("user001", path).await.status, 403, "{path}");
    }
    let r = put(
        &app,
        ADMIN,
        "/admin/api/serverless",
        json!({"active": "h200-spot"}),
    )
    .await;
    assert_eq!(r.status, 404);
    // The banner asks on every mode: nothing to say is not an error.
    for path in ["/api/comfyume/gpu", "/user001/api/comfyume/gpu"] {
        let r = app.get("user001", path).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.json()["gpu"].is_null());
    }
}
