//! The instructor's dashboard and admin API (issue 11): every action over HTTP as the page
//! and scripts send it, the 401/403 matrix, the CSRF rule, the audit log, settings that
//! survive a restart, and the live stream.

use crate::helpers;

use helpers::*;
use reqwest::Method;
use serde_json::{Value, json};

const U1: &str = "user001";
const U2: &str = "user002";

fn tiny() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    })
}

/// `workflows/slow_blur.json` at 64×64 (runs `blur_radius × step_ms`).
fn slow_blur() -> Value {
    let mut p = workflow("slow_blur.json");
    p["1"]["inputs"]["width"] = json!(64);
    p["1"]["inputs"]["height"] = json!(64);
    p
}

async fn admin(app: &TestApp, method: Method, path: &str, body: Option<Value>) -> Resp {
    app.req(
        Some(ADMIN),
        method,
        path,
        body.map(|b| serde_json::to_vec(&b).unwrap()),
    )
    .await
}

/// Fills a route template's parameters.
fn concrete(path: &str) -> String {
    path.replace("{id}", "no-such-job").replace("{name}", U2)
}

async fn audit_actions(app: &TestApp) -> Vec<String> {
    let r = admin(app, Method::GET, "/admin/api/audit?limit=500", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect()
}

/// A job's state in the store (ComfyUI's own views hide cancelled jobs).
async fn job_state(app: &TestApp, id: &str) -> String {
    app.store
        .get_job(id)
        .await
        .unwrap()
        .unwrap()
        .state
        .to_string()
}

async fn waiting_ids(app: &TestApp) -> Vec<String> {
    let q = admin(app, Method::GET, "/admin/api/queue", None)
        .await
        .json();
    q["waiting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_admin_route_is_for_instructors_only() {
    let app = spawn_app().await;
    let mut checked = 0;
    for r in comfyume_admin::openapi::ROUTES {
        let method = Method::from_bytes(r.method.to_uppercase().as_bytes()).unwrap();
        let path = concrete(r.path);
        let body = Some(b"{}".to_vec());
        let as_participant = app.req(Some(U1), method.clone(), &path, body.clone()).await;
        assert_eq!(
            as_participant.status, 403,
            "{} {path} as a participant",
            r.method
        );
        let anonymous = app.req(None, method.clone(), &path, body).await;
        assert_eq!(anonymous.status, 401, "{} {path} anonymous", r.method);
        checked += 1;
    }
    assert!(checked >= 30, "{checked}");
    // The page and its stream too; a browser without a session is sent to sign in.
    for path in ["/admin", "/admin/room", "/admin/assets/app.js", "/admin/ws"] {
        assert_eq!(app.get(U1, path).await.status, 403, "{path}");
        assert_eq!(
            app.req(None, Method::GET, path, None).await.status,
            401,
            "{path}"
        );
    }
    let r = app.anon_get("/admin", &[("accept", "text/html")]).await;
    assert!(r.status.is_redirection(), "{}", r.status);
    assert!(
        r.header("location")
            .unwrap()
            .starts_with("/login?next=%2Fadmin")
    );
    let r = app.get(U1, "/admin").await;
    assert!(r.text().contains("for the workshop"), "{}", r.text());
    // Nothing changed on the way.
    assert!(audit_actions(&app).await.is_empty());
    assert!(!app.state.queue.is_paused());
}

#[tokio::test]
async fn a_session_needs_its_csrf_token_and_scripts_use_basic() {
    let app = spawn_app().await;
    let cookie = app.login(ADMIN, PASSWORD).await.unwrap();
    let page = TestApp::send(app.request(Method::GET, "/admin").header("cookie", &cookie)).await;
    assert_eq!(page.status, 200);
    let html = page.text();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    assert_eq!(csrf.len(), 64);
    assert!(
        !html.contains(cookie.split('=').nth(1).unwrap()),
        "the session token never reaches the page"
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");

    let pause = |token: Option<&str>| {
        let mut rb = app
            .request(Method::POST, "/admin/api/queue/pause")
            .header("cookie", &cookie);
        if let Some(t) = token {
            rb = rb.header("x-csrf-token", t);
        }
        TestApp::send(rb)
    };
    let r = pause(None).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("CSRF"));
    assert_eq!(pause(Some(&"0".repeat(64))).await.status, 403);
    assert!(!app.state.queue.is_paused());
    assert_eq!(pause(Some(&csrf)).await.status, 200);
    assert!(app.state.queue.is_paused());
    // Reading needs no token; Basic credentials (scripts) need none either.
    let r = TestApp::send(
        app.request(Method::GET, "/admin/api/queue")
            .header("cookie", &cookie),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        admin(&app, Method::POST, "/admin/api/queue/resume", None)
            .await
            .status,
        200
    );
    assert!(!app.state.queue.is_paused());
    // A cross-site request is refused whatever it carries.
    let r = TestApp::send(
        app.request(Method::POST, "/admin/api/queue/pause")
            .header("cookie", &cookie)
            .header("x-csrf-token", &csrf)
            .header("origin", "https://evil.example"),
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(!app.state.queue.is_paused());
    // No secret in what the page reads: no password hashes, session ids or keys.
    let snap = admin(&app, Method::GET, "/admin/api/dashboard", None)
        .await
        .text();
    for secret in [
        "$argon2",
        "$2b$",
        "$2y$",
        "password_hash",
        cookie.split('=').nth(1).unwrap(),
    ] {
        assert!(!snap.contains(secret), "{secret} in the dashboard");
    }
}

#[tokio::test]
async fn queue_actions_cancel_front_retry_pause_and_priorities() {
    let (_sim, backend) = sim_backend_slots("gpu-a", 40, 1).await;
    let app = spawn_full(AppOptions {
        backends: vec![backend],
        ..Default::default()
    })
    .await;
    let mut ws1 = app.ws(U1, "/ws?clientId=tab1").await;
    next_json(&mut ws1).await;

    // Paused: nothing starts.
    assert_eq!(
        admin(&app, Method::POST, "/admin/api/queue/pause", None)
            .await
            .json()["paused"],
        true
    );
    let a = app.submit(U1, "tab1", &tiny()).await;
    let b = app.submit(U1, "tab1", &tiny()).await;
    let c = app.submit(U2, "tab2", &tiny()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(app.job_status(U1, &a).await, "pending");
    let q = admin(&app, Method::GET, "/admin/api/queue", None)
        .await
        .json();
    assert_eq!(q["paused"], true);
    assert_eq!(q["waiting_total"], 3);
    assert_eq!(
        waiting_ids(&app).await,
        [a.clone(), c.clone(), b.clone()],
        "round robin"
    );

    // Move b to the front; then c's level.
    let r = admin(
        &app,
        Method::POST,
        &format!("/admin/api/jobs/{b}/front"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["position"], 0);
    assert_eq!(waiting_ids(&app).await[0], b);
    let q = admin(&app, Method::GET, "/admin/api/queue", None)
        .await
        .json();
    assert_eq!(q["waiting"][0]["front"], true);
    let r = admin(
        &app,
        Method::PUT,
        &format!("/admin/api/jobs/{c}/priority"),
        Some(json!({"level": 2})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        admin(
            &app,
            Method::PUT,
            &format!("/admin/api/jobs/{c}/priority"),
            Some(json!({"level": 7}))
        )
        .await
        .status,
        400
    );
    assert_eq!(
        admin(
            &app,
            Method::PUT,
            "/admin/api/users/user002/priority",
            Some(json!({"level": 3}))
        )
        .await
        .status,
        200
    );
    assert_eq!(
        admin(
            &app,
            Method::PUT,
            "/admin/api/users/nobody/priority",
            Some(json!({"level": 1}))
        )
        .await
        .status,
        404
    );

    // Cancel a: its owner's tab hears the queue shrink.
    let r = admin(
        &app,
        Method::POST,
        &format!("/admin/api/jobs/{a}/cancel"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["outcome"], "cancelled");
    assert_eq!(r.json()["user"], U1);
    messages_until(&mut ws1, 5, |v| v["type"] == "status").await;
    assert_eq!(job_state(&app, &a).await, "cancelled");
    assert_eq!(
        admin(
            &app,
            Method::POST,
            &format!("/admin/api/jobs/{a}/cancel"),
            None
        )
        .await
        .status,
        409
    );
    assert_eq!(
        admin(&app, Method::POST, "/admin/api/jobs/nope/cancel", None)
            .await
            .status,
        404
    );
    assert_eq!(
        admin(
            &app,
            Method::POST,
            &format!("/admin/api/jobs/{a}/front"),
            None
        )
        .await
        .status,
        409
    );

    // Retry the cancelled one: a new job of the same participant.
    let r = admin(
        &app,
        Method::POST,
        &format!("/admin/api/jobs/{a}/retry"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let a2 = r.json()["new_id"].as_str().unwrap().to_string();
    assert_ne!(a2, a);
    assert_eq!(r.json()["user"], U1);
    assert_eq!(
        admin(
            &app,
            Method::POST,
            &format!("/admin/api/jobs/{b}/retry"),
            None
        )
        .await
        .status,
        409,
        "b waits"
    );

    // Resume: b (front) first, then the rest; all succeed.
    assert_eq!(
        admin(&app, Method::POST, "/admin/api/queue/resume", None)
            .await
            .json()["paused"],
        false
    );
    for (user, id) in [(U1, &b), (U2, &c), (U1, &a2)] {
        assert_eq!(
            app.wait_job(user, id, &["completed", "failed"], 20).await,
            "completed"
        );
    }
    let first_started = |id: &str| {
        let app = &app;
        let id = id.to_string();
        async move {
            app.store
                .get_job(&id)
                .await
                .unwrap()
                .unwrap()
                .started_at_ms
                .unwrap()
        }
    };
    assert!(
        first_started(&b).await <= first_started(&c).await,
        "the job moved to the front ran first"
    );

    // Cancel everything waiting, and all of one participant's jobs.
    admin(&app, Method::POST, "/admin/api/queue/pause", None).await;
    let d = app.submit(U1, "tab1", &tiny()).await;
    let e = app.submit(U2, "tab2", &tiny()).await;
    let r = admin(&app, Method::POST, "/admin/api/queue/cancel", None).await;
    assert_eq!(r.json()["cancelled"], 2, "{}", r.text());
    for id in [&d, &e] {
        assert_eq!(job_state(&app, id).await, "cancelled");
    }
    let f = app.submit(U2, "tab2", &tiny()).await;
    let r = admin(&app, Method::POST, "/admin/api/users/user002/cancel", None).await;
    assert_eq!(r.json()["cancelled"], json!([f]), "{}", r.text());
    admin(&app, Method::POST, "/admin/api/queue/resume", None).await;

    // A running job is stopped; its owner's page hears it end.
    let slow = app.submit(U1, "tab1", &slow_blur()).await;
    messages_until(&mut ws1, 10, |v| {
        v["type"] == "executing"
            && v["data"]["prompt_id"] == slow.as_str()
            && !v["data"]["node"].is_null()
    })
    .await;
    let r = admin(
        &app,
        Method::POST,
        &format!("/admin/api/jobs/{slow}/cancel"),
        None,
    )
    .await;
    assert_eq!(r.json()["outcome"], "interrupted", "{}", r.text());
    messages_until(&mut ws1, 10, |v| v["type"] == "execution_interrupted").await;
    app.wait_job(U1, &slow, &["cancelled", "failed", "interrupted"], 10)
        .await;

    // Limits: checked, applied, answered.
    let r = admin(
        &app,
        Method::PUT,
        "/admin/api/queue/limits",
        Some(json!({"max_running_per_user": 2, "max_queue_depth": 50})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["max_queue_depth"], 50);
    for bad in [
        json!({}),
        json!({"max_running_per_user": 0}),
        json!({"max_queue_depth": -1}),
        json!({"bogus": 1}),
        json!({"max_queue_depth": 1_000_000}),
    ] {
        assert_eq!(
            admin(
                &app,
                Method::PUT,
                "/admin/api/queue/limits",
                Some(bad.clone())
            )
            .await
            .status,
            400,
            "{bad}"
        );
    }
    assert_eq!(app.state.queue.settings().max_running_per_user, 2);
    let r = admin(
        &app,
        Method::PUT,
        "/admin/api/queue/policy",
        Some(json!({"policy": "priority"})),
    )
    .await;
    assert_eq!(r.status, 200);

    let actions = audit_actions(&app).await;
    for want in [
        "queue.pause",
        "job.front",
        "job.priority",
        "user.priority",
        "job.cancel",
        "job.retry",
        "queue.resume",
        "queue.cancel_waiting",
        "user.cancel_jobs",
        "queue.limits",
        "queue.policy",
    ] {
        assert!(
            actions.iter().any(|a| a == want),
            "{want} not in {actions:?}"
        );
    }
    let entry = &admin(&app, Method::GET, "/admin/api/audit?limit=500", None)
        .await
        .json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "job.cancel")
        .cloned()
        .unwrap();
    assert_eq!(entry["actor"], ADMIN);
    assert!(entry["target"].is_string());
}

#[tokio::test]
async fn broadcast_reaches_every_participant_until_cleared() {
    let app = spawn_app().await;
    let mut ws1 = app.ws(U1, "/ws?clientId=a").await;
    let mut ws2 = app.ws(U2, "/ws?clientId=b").await;
    next_json(&mut ws1).await;
    next_json(&mut ws2).await;
    let r = admin(
        &app,
        Method::POST,
        "/admin/api/broadcast",
        Some(json!({"message": "5 minutes left <b>!</b>"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sockets"], 2);
    for ws in [&mut ws1, &mut ws2] {
        let m = messages_until(ws, 5, |v| v["type"] == "comfyume").await;
        assert_eq!(
            m.last().unwrap()["data"]["broadcast"]["message"],
            "5 minutes left <b>!</b>"
        );
    }
    // A page loaded later asks (at /userNNN/api/... as the frontend does).
    let later = app.get(U2, "/user002/api/comfyume/broadcast").await;
    assert_eq!(later.status, 200);
    assert_eq!(
        later.json()["broadcast"]["message"],
        "5 minutes left <b>!</b>"
    );
    assert_eq!(
        admin(&app, Method::GET, "/admin/api/broadcast", None)
            .await
            .json()["broadcast"]["from"],
        ADMIN
    );
    for bad in [
        json!({"message": "  "}),
        json!({"message": "x".repeat(501)}),
        json!({"msg": "x"}),
        json!("x"),
        json!({"message": "a\u{7}b"}),
    ] {
        assert_eq!(
            admin(
                &app,
                Method::POST,
                "/admin/api/broadcast",
                Some(bad.clone())
            )
            .await
            .status,
            400,
            "{bad}"
        );
    }
    let r = admin(&app, Method::DELETE, "/admin/api/broadcast", None).await;
    assert_eq!(r.status, 200);
    let m = messages_until(&mut ws1, 5, |v| v["type"] == "comfyume").await;
    assert!(m.last().unwrap()["data"]["broadcast"].is_null());
    assert!(app.get(U1, "/api/comfyume/broadcast").await.json()["broadcast"].is_null());
    let actions = audit_actions(&app).await;
    assert_eq!(actions[..2], ["broadcast.clear", "broadcast.set"]);
}

#[tokio::test]
async fn participants_are_created_disabled_enabled_and_given_new_passwords() {
    let app = spawn_app().await;
    let r = admin(
        &app,
        Method::POST,
        "/admin/api/users",
        Some(json!({"name": "user021"})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let pw = r.json()["password"].as_str().unwrap().to_string();
    assert!(pw.len() >= 12);
    assert!(app.login("user021", &pw).await.is_some());
    let r = admin(
        &app,
        Method::POST,
        "/admin/api/users",
        Some(json!({"name": "user022", "password": "chosen-secret-1"})),
    )
    .await;
    assert_eq!(r.json()["password"], "chosen-secret-1");
    for bad in [
        json!({"name": "admin"}),
        json!({"name": "a b"}),
        json!({"name": "x.y"}),
        json!({}),
        json!({"name": "<img src=x onerror=alert(1)>"}),
    ] {
        assert_eq!(
            admin(&app, Method::POST, "/admin/api/users", Some(bad.clone()))
                .await
                .status,
            400,
            "{bad}"
        );
    }
    assert_eq!(
        admin(
            &app,
            Method::POST,
            "/admin/api/users",
            Some(json!({"name": "USER021"}))
        )
        .await
        .status,
        409
    );

    let list = admin(&app, Method::GET, "/admin/api/users", None)
        .await
        .json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"user021") && names.contains(&ADMIN),
        "{names:?}"
    );
    for u in list.as_array().unwrap() {
        for k in [
            "online", "queued", "running", "done", "failed", "gpu_ms", "ui",
        ] {
            assert!(u.get(k).is_some(), "{k} missing in {u}");
        }
        assert!(u.get("password").is_none() && u.get("password_hash").is_none());
    }

    assert_eq!(
        admin(&app, Method::POST, "/admin/api/users/user021/disable", None)
            .await
            .status,
        200
    );
    assert!(
        app.login("user021", &pw).await.is_none(),
        "a disabled account cannot sign in"
    );
    assert_eq!(
        admin(
            &app,
            Method::POST,
            &format!("/admin/api/users/{ADMIN}/disable"),
            None
        )
        .await
        .status,
        409
    );
    assert_eq!(
        admin(&app, Method::POST, "/admin/api/users/nobody/disable", None)
            .await
            .status,
        404
    );
    assert_eq!(
        admin(&app, Method::POST, "/admin/api/users/user021/enable", None)
            .await
            .status,
        200
    );
    assert!(app.login("user021", &pw).await.is_some());

    let r = admin(
        &app,
        Method::POST,
        "/admin/api/users/user021/password",
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    let new_pw = r.json()["password"].as_str().unwrap().to_string();
    assert_ne!(new_pw, pw);
    assert!(app.login("user021", &pw).await.is_none());
    assert!(app.login("user021", &new_pw).await.is_some());
    assert_eq!(
        admin(&app, Method::POST, "/admin/api/users/nobody/password", None)
            .await
            .status,
        404
    );

    let actions = audit_actions(&app).await;
    for want in [
        "user.create",
        "user.disable",
        "user.enable",
        "user.password_reset",
    ] {
        assert!(
            actions.iter().any(|a| a == want),
            "{want} not in {actions:?}"
        );
    }
    // The audit log never holds a password.
    let log = admin(&app, Method::GET, "/admin/api/audit", None)
        .await
        .text();
    assert!(!log.contains(&pw) && !log.contains(&new_pw) && !log.contains("chosen-secret-1"));
}

#[tokio::test]
async fn policy_limits_pause_priorities_and_broadcast_survive_a_restart() {
    let app = spawn_app().await;
    let a = app.submit(U1, "t", &tiny()).await;
    let b = app.submit(U2, "t", &tiny()).await;
    admin(
        &app,
        Method::PUT,
        "/admin/api/queue/policy",
        Some(json!({"policy": "fifo"})),
    )
    .await;
    admin(
        &app,
        Method::PUT,
        "/admin/api/queue/limits",
        Some(json!({"max_running_per_user": 3, "max_queued_per_user": 7, "max_queue_depth": 70})),
    )
    .await;
    admin(&app, Method::POST, "/admin/api/queue/pause", None).await;
    admin(
        &app,
        Method::PUT,
        "/admin/api/users/user002/priority",
        Some(json!({"level": 2})),
    )
    .await;
    admin(
        &app,
        Method::PUT,
        &format!("/admin/api/jobs/{a}/priority"),
        Some(json!({"level": 1})),
    )
    .await;
    admin(
        &app,
        Method::POST,
        &format!("/admin/api/jobs/{b}/front"),
        None,
    )
    .await;
    admin(
        &app,
        Method::POST,
        "/admin/api/broadcast",
        Some(json!({"message": "back at 2"})),
    )
    .await;
    let before = app.state.queue.settings();
    assert!(before.paused);
    let tmp = app.stop();

    let app = spawn_full(AppOptions {
        reuse: Some(tmp),
        ..Default::default()
    })
    .await;
    let after = app.state.queue.settings();
    assert_eq!(after, before);
    assert_eq!(after.policy.as_str(), "fifo");
    assert_eq!(after.max_queued_per_user, 7);
    assert_eq!(after.user_priorities.get("user002"), Some(&2));
    assert_eq!(after.front, std::slice::from_ref(&b));
    assert_eq!(waiting_ids(&app).await[0], b);
    let q = admin(&app, Method::GET, "/admin/api/queue", None)
        .await
        .json();
    assert_eq!(q["waiting"][1]["priority"], 1, "{q}");
    assert_eq!(q["paused"], true);
    // The broadcast too: restored before the first page asks.
    let got = {
        let mut v = Value::Null;
        for _ in 0..100 {
            v = app.get(U1, "/api/comfyume/broadcast").await.json()["broadcast"].clone();
            if !v.is_null() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        v
    };
    assert_eq!(got["message"], "back at 2");
}

/// What the page hears: a snapshot, then each change within the debounce.
#[tokio::test]
async fn the_live_stream_shows_new_jobs_actions_and_resumes_after_a_reconnect() {
    let (_sim, backend) = sim_backend_slots("gpu-a", 5, 1).await;
    let app = spawn_full(AppOptions {
        backends: vec![backend],
        ..Default::default()
    })
    .await;
    let mut dash = app.ws(ADMIN, "/admin/ws").await;
    let snap = next_json(&mut dash).await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["me"], ADMIN);
    for k in [
        "queue",
        "progress",
        "results",
        "participants",
        "gpus",
        "system",
        "audit",
        "broadcast",
        "room",
    ] {
        assert!(snap["sections"].get(k).is_some(), "{k} missing");
    }
    assert_eq!(snap["sections"]["gpus"]["backends"][0]["name"], "gpu-a");
    assert!(
        snap["sections"]["system"]["disk"]["filesystem_free"]
            .as_u64()
            .unwrap()
            > 0
    );

    admin(&app, Method::POST, "/admin/api/queue/pause", None).await;
    let id = app.submit(U1, "tab", &tiny()).await;
    let t0 = std::time::Instant::now();
    let msgs = messages_until(&mut dash, 5, |v| {
        v["sections"]["queue"]["waiting"]
            .as_array()
            .is_some_and(|w| w.iter().any(|j| j["id"] == id.as_str()))
    })
    .await;
    let seen = t0.elapsed();
    assert!(msgs.iter().all(|m| m["type"] == "update"));
    assert_eq!(msgs.last().unwrap()["sections"]["queue"]["paused"], true);
    eprintln!("the new job reached the dashboard after {seen:?}");

    // Resumed: it runs and its result appears among the results.
    admin(&app, Method::POST, "/admin/api/queue/resume", None).await;
    let msgs = messages_until(&mut dash, 15, |v| {
        v["sections"]["results"]
            .as_array()
            .is_some_and(|r| r.iter().any(|j| j["id"] == id.as_str()))
    })
    .await;
    let results = &msgs.last().unwrap()["sections"]["results"];
    let file = &results[0]["files"][0];
    assert_eq!(file["kind"], "image");
    // The thumbnail is a small JPEG.
    let thumb = app.get(ADMIN, file["thumb"].as_str().unwrap()).await;
    assert_eq!(thumb.status, 200);
    assert_eq!(thumb.header("content-type").as_deref(), Some("image/jpeg"));
    assert_eq!(
        app.get(U1, file["thumb"].as_str().unwrap()).await.status,
        403
    );
    assert_eq!(
        app.get(
            ADMIN,
            "/admin/api/thumb?user=user001&filename=../../comfyume.db"
        )
        .await
        .status,
        403
    );

    // A result on the room view.
    let r = admin(
        &app,
        Method::PUT,
        "/admin/api/room",
        Some(json!({"job_id": id})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    messages_until(&mut dash, 5, |v| {
        v["sections"]["room"]["job_id"] == id.as_str()
    })
    .await;
    assert_eq!(
        admin(
            &app,
            Method::PUT,
            "/admin/api/room",
            Some(json!({"job_id": id, "file": 9}))
        )
        .await
        .status,
        400
    );
    admin(&app, Method::DELETE, "/admin/api/room", None).await;

    // The audit section follows the actions.
    let msgs = messages_until(&mut dash, 5, |v| {
        v["sections"]["audit"]
            .as_array()
            .is_some_and(|a| a.first().is_some_and(|e| e["action"] == "room.clear"))
    })
    .await;
    assert!(!msgs.is_empty());

    // A reconnect starts with a whole snapshot again.
    drop(dash);
    let mut again = app.ws(ADMIN, "/admin/ws").await;
    let snap = next_json(&mut again).await;
    assert_eq!(snap["type"], "snapshot");
    assert!(
        snap["sections"]["results"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str())
    );
    let parts = &snap["sections"]["participants"];
    let u1 = parts
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == U1)
        .unwrap();
    assert_eq!(u1["done"], 1);
}

#[tokio::test]
async fn gpus_system_node_definitions_and_the_openapi_document() {
    let (_sim, backend) = sim_backend_slots("gpu-a", 5, 2).await;
    let app = spawn_full(AppOptions {
        backends: vec![backend],
        ..Default::default()
    })
    .await;
    let g = admin(&app, Method::GET, "/admin/api/gpus", None)
        .await
        .json();
    let b = &g["backends"][0];
    assert_eq!(b["name"], "gpu-a");
    assert_eq!(b["state"], "ready");
    assert_eq!(b["slots"], 2);
    let s = admin(&app, Method::GET, "/admin/api/system", None)
        .await
        .json();
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["node_definitions"]["count"].as_u64().unwrap() > 100);

    let r = admin(
        &app,
        Method::POST,
        "/admin/api/object-info/refresh",
        Some(json!({"backend": "gpu-a"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["nodes"].as_u64().unwrap() > 10);
    let s = admin(&app, Method::GET, "/admin/api/system", None)
        .await
        .json();
    assert_eq!(s["node_definitions"]["source"], "backend:gpu-a");
    assert_eq!(
        admin(
            &app,
            Method::POST,
            "/admin/api/object-info/refresh",
            Some(json!({"backend": "nope"}))
        )
        .await
        .status,
        404
    );
    assert!(
        audit_actions(&app)
            .await
            .contains(&"object_info.refresh".to_string())
    );

    let doc = admin(&app, Method::GET, "/admin/api/openapi.json", None)
        .await
        .json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/admin/api/jobs/{id}/cancel",
        "/admin/api/queue/pause",
        "/admin/api/queue/resume",
        "/admin/api/broadcast",
        "/admin/api/users/{name}/export.zip",
        "/admin/api/export.zip",
        "/admin/api/audit",
    ] {
        assert!(paths.contains_key(p), "{p} not documented");
    }
    assert!(paths["/admin/api/broadcast"].get("delete").is_some());
    assert_eq!(
        paths["/admin/api/broadcast"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["required"],
        json!(["message"])
    );
}

/// Hostile names in what the page shows reach it as data, never as markup of ours.
#[tokio::test]
async fn hostile_file_and_workflow_names_are_data() {
    let app = spawn_app().await;
    let evil = "<img src=x onerror=alert(1)>.png";
    let id = app.submit(U1, "t", &tiny()).await;
    app.store
        .transition(
            &id,
            &[comfyume_store::JobState::Queued],
            comfyume_store::JobState::Succeeded,
            comfyume_store::JobPatch {
                finished_at_ms: Some(comfyume_dispatch::queue::now_ms()),
                started_at_ms: Some(comfyume_dispatch::queue::now_ms()),
                outputs: Some(json!({"2": {"images": [{"filename": evil, "subfolder": "<script>", "type": "output"}]}})),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    app.state.queue.forget(&id);
    let snap = admin(&app, Method::GET, "/admin/api/dashboard", None)
        .await
        .json();
    let file = &snap["sections"]["results"][0]["files"][0];
    assert_eq!(file["filename"], evil);
    assert!(file["url"].as_str().unwrap().contains("%3Cimg%20src%3Dx"));
    // The shell has only our own markup; the script builds text nodes (the browser test
    // shows it on screen).
    let page = app.get(ADMIN, "/admin").await.text();
    assert!(!page.contains("onerror"));
    let js = app.get(ADMIN, "/admin/assets/app.js").await.text();
    assert!(
        !js.contains("innerHTML"),
        "the dashboard never parses text as HTML"
    );
}

/// Names in a zip's central directory (no zip64: test archives are small).
fn zip_names(zip: &[u8]) -> Vec<String> {
    let eocd = zip
        .windows(4)
        .rposition(|w| w == [0x50, 0x4b, 0x05, 0x06])
        .expect("an end of central directory record");
    let u16_at = |i: usize| u16::from_le_bytes([zip[i], zip[i + 1]]) as usize;
    let u32_at =
        |i: usize| u32::from_le_bytes([zip[i], zip[i + 1], zip[i + 2], zip[i + 3]]) as usize;
    let count = u16_at(eocd + 10);
    let mut at = u32_at(eocd + 16);
    let mut names = Vec::new();
    for _ in 0..count {
        assert_eq!(
            &zip[at..at + 4],
            [0x50, 0x4b, 0x01, 0x02],
            "central directory entry"
        );
        let (n, extra, comment) = (u16_at(at + 28), u16_at(at + 30), u16_at(at + 32));
        names.push(String::from_utf8_lossy(&zip[at + 46..at + 46 + n]).into_owned());
        at += 46 + n + extra + comment;
    }
    names
}

#[tokio::test]
async fn downloads_are_zips_of_outputs_and_workflows() {
    let (_sim, backend) = sim_backend_slots("gpu-a", 5, 1).await;
    let app = spawn_full(AppOptions {
        backends: vec![backend],
        ..Default::default()
    })
    .await;
    let id = app.submit(U1, "t", &tiny()).await;
    assert_eq!(
        app.wait_job(U1, &id, &["completed", "failed"], 20).await,
        "completed"
    );
    let r = app
        .post(
            U1,
            "/api/userdata/workflows%2Fdemo.json?overwrite=true",
            br#"{"nodes":[]}"#.to_vec(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let outputs = app.output_files(U1);
    assert!(!outputs.is_empty());

    let r = app.get(ADMIN, "/admin/api/users/user001/export.zip").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type").as_deref(), Some("application/zip"));
    assert!(
        r.header("content-disposition")
            .unwrap()
            .contains("user001-work.zip")
    );
    let names = zip_names(&r.body);
    assert!(
        names.contains(&"workflows/demo.json".to_string()),
        "{names:?}"
    );
    for f in &outputs {
        assert!(
            names.contains(&format!("outputs/{f}")),
            "{f} not in {names:?}"
        );
    }
    let all = app.get(ADMIN, "/admin/api/export.zip").await;
    assert_eq!(all.status, 200);
    let names = zip_names(&all.body);
    assert!(
        names.contains(&"user001/workflows/demo.json".to_string()),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with("user002/outputs/") || n.contains("user002"))
    );
    assert_eq!(
        app.get(ADMIN, "/admin/api/users/nobody/export.zip")
            .await
            .status,
        404
    );
    assert_eq!(
        app.get(U1, "/admin/api/users/user001/export.zip")
            .await
            .status,
        403
    );
    let actions = audit_actions(&app).await;
    assert!(
        actions.contains(&"export.participant".to_string())
            && actions.contains(&"export.everyone".to_string())
    );
}
