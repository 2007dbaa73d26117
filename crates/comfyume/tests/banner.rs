//! The participant's banner: who they are, where their job stands in the
//! workshop queue, and which GPU runs it.

use crate::helpers;

use helpers::*;
use serde_json::json;

fn prompt() -> serde_json::Value {
    json!({"prompt": {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}}
    }})
}

#[tokio::test]
async fn the_banner_tells_each_participant_their_place_in_the_workshop_queue() {
    let app = spawn_app().await;
    let s = app
        .get("user001", "/user001/api/comfyume/status")
        .await
        .json();
    assert_eq!(s["user"], "user001");
    assert!(s["queue_position"].is_null());
    assert!(s["message"].is_null());

    for _ in 0..2 {
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

    // round_robin: user001's first job, then user002's, then user001's second.
    let s1 = app.get("user001", "/api/comfyume/status").await.json();
    assert_eq!(s1["queue_position"], 0);
    assert_eq!(s1["waiting"], 2);
    assert_eq!(s1["message"], "Your job is next in the workshop queue");
    let s2 = app.get("user002", "/api/comfyume/status").await.json();
    assert_eq!(s2["user"], "user002");
    assert_eq!(s2["queue_position"], 1);
    assert_eq!(s2["waiting"], 1);
    assert_eq!(
        s2["message"],
        "1 job(s) ahead of yours in the workshop queue"
    );

    // The banner script itself is listed and served to the stock frontend.
    let ext = app.get("user002", "/api/extensions").await.json();
    assert!(
        ext.as_array()
            .unwrap()
            .iter()
            .any(|e| e == "/extensions/comfyume/comfyume.js")
    );
    let js = app
        .get("user002", "/user002/extensions/comfyume/comfyume.js")
        .await;
    assert_eq!(js.status, 200);
    assert!(js.text().contains("comfyume/status"));
}
