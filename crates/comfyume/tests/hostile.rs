//! Issue 9 "Hostile input": a corpus of attacks on every participant and admin
//! route, each with the status it must get. Traversal in every path and query
//! parameter, encoded separators and dots, NUL, invalid UTF-8, over-long names
//! and deep paths, huge and deeply nested JSON, oversize and malformed uploads,
//! other participants' ids, missing and forged credentials and cookies, and
//! cross-site requests. None may answer 500 (or kill the server).

use crate::helpers;

use helpers::{ADMIN, PASSWORD, TestApp, png, spawn_app_with, workflow};
use reqwest::Method;
use serde_json::json;

const U: &str = "user001";
const U2: &str = "user002";

/// Who sends a case.
#[derive(Clone)]
enum Auth {
    None,
    Basic(&'static str),
    WrongPassword(&'static str),
    Header(String),
    Cookie(String),
}

#[derive(Clone)]
enum Body {
    None,
    Bytes(Vec<u8>),
    Multipart(Vec<(&'static str, String)>, Option<(String, Vec<u8>)>),
}

struct Case {
    what: String,
    method: Method,
    path: String,
    auth: Auth,
    headers: Vec<(&'static str, String)>,
    body: Body,
    expect: &'static [u16],
}

fn case(what: &str, method: Method, path: &str, expect: &'static [u16]) -> Case {
    Case {
        what: what.to_string(),
        method,
        path: path.to_string(),
        auth: Auth::Basic(U),
        headers: Vec::new(),
        body: Body::None,
        expect,
    }
}

impl Case {
    fn auth(mut self, a: Auth) -> Self {
        self.auth = a;
        self
    }
    fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = Body::Bytes(b.into());
        self
    }
    fn header(mut self, k: &'static str, v: &str) -> Self {
        self.headers.push((k, v.to_string()));
        self
    }
    fn upload(mut self, fields: &[(&'static str, &str)], file: Option<(&str, Vec<u8>)>) -> Self {
        self.body = Body::Multipart(
            fields.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            file.map(|(n, b)| (n.to_string(), b)),
        );
        self
    }
}

fn get(what: &str, path: &str, expect: &'static [u16]) -> Case {
    case(what, Method::GET, path, expect)
}

fn post(what: &str, path: &str, body: impl Into<Vec<u8>>, expect: &'static [u16]) -> Case {
    case(what, Method::POST, path, expect).body(body)
}

/// `[[[[…]]]]` nested `depth` deep: serde_json refuses past 128, never overflowing the stack.
fn nested(depth: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(depth * 2 + 16);
    v.extend_from_slice(b"{\"prompt\":");
    v.extend(std::iter::repeat_n(b'[', depth));
    v.extend(std::iter::repeat_n(b']', depth));
    v.push(b'}');
    v
}

const TRAVERSALS: &[&str] = &[
    "..%2F..%2Fcomfyume.db",
    "%2e%2e%2f%2e%2e%2fcomfyume.db",
    "..%5C..%5Ccomfyume.db",
    "%2Fetc%2Fpasswd",
    "a%00b",
];

async fn corpus(app: &TestApp) -> Vec<Case> {
    let long = "n".repeat(300);
    let deep = vec!["d"; 40].join("%2F");
    let mut cases = Vec::new();

    // ---- traversal and bad bytes in every path parameter ----
    for t in TRAVERSALS {
        cases.push(get("userdata file", &format!("/api/userdata/{t}"), &[403]));
        cases.push(post(
            "userdata write",
            &format!("/api/userdata/{t}"),
            "{}",
            &[403],
        ));
        cases.push(case(
            "userdata delete",
            Method::DELETE,
            &format!("/api/userdata/{t}"),
            &[403],
        ));
        cases.push(post(
            "move source",
            &format!("/api/userdata/{t}/move/x.json"),
            "",
            &[403],
        ));
        cases.push(post(
            "move dest",
            &format!("/api/userdata/workflows%2Fa.json/move/{t}"),
            "",
            &[403, 404],
        ));
        cases.push(get("settings id", &format!("/api/settings/{t}"), &[200]));
        cases.push(get("models folder", &format!("/api/models/{t}"), &[404]));
        cases.push(get(
            "experiment folder",
            &format!("/api/experiment/models/{t}"),
            &[404],
        ));
        cases.push(get(
            "object_info class",
            &format!("/api/object_info/{t}"),
            &[200],
        ));
        cases.push(get(
            "subgraph id",
            &format!("/api/global_subgraphs/{t}"),
            &[404],
        ));
        cases.push(get(
            "view_metadata folder",
            &format!("/api/view_metadata/{t}"),
            &[404],
        ));
        cases.push(get("history id", &format!("/api/history/{t}"), &[200]));
        cases.push(get("job id", &format!("/api/api/jobs/{t}"), &[404]));
        cases.push(get(
            "internal files kind",
            &format!("/internal/files/{t}"),
            &[400],
        ));
        cases.push(
            case(
                "admin user priority",
                Method::PUT,
                &format!("/admin/api/users/{t}/priority"),
                &[404],
            )
            .auth(Auth::Basic(ADMIN))
            .body(r#"{"level":1}"#),
        );
        cases.push(
            case(
                "admin job priority",
                Method::PUT,
                &format!("/admin/api/jobs/{t}/priority"),
                &[404],
            )
            .auth(Auth::Basic(ADMIN))
            .body(r#"{"level":1}"#),
        );
    }
    // Invalid UTF-8 in a path parameter: refused as a bad URL.
    for p in [
        "/api/userdata/%FF%FE",
        "/api/settings/%C0%AE",
        "/api/history/%FF",
        "/api/api/jobs/%FF",
    ] {
        cases.push(get("invalid UTF-8 path", p, &[400]));
    }
    cases.push(post(
        "invalid UTF-8 setting",
        "/api/settings/%FF",
        "1",
        &[400],
    ));
    // Over-long and deep names.
    cases.push(get(
        "long userdata name",
        &format!("/api/userdata/{long}"),
        &[400],
    ));
    cases.push(post(
        "long userdata write",
        &format!("/api/userdata/{long}.json"),
        "{}",
        &[400],
    ));
    cases.push(post(
        "deep userdata write",
        &format!("/api/userdata/{deep}%2Fa.json"),
        "{}",
        &[400],
    ));
    cases.push(post(
        "long move dest",
        &format!("/api/userdata/workflows%2Fa.json/move/{long}"),
        "",
        &[400],
    ));

    // ---- traversal and bad bytes in every query parameter ----
    for t in TRAVERSALS {
        cases.push(get(
            "view filename",
            &format!("/api/view?filename={t}&type=input"),
            &[400],
        ));
        cases.push(get(
            "view subfolder",
            &format!("/api/view?filename=a.png&type=input&subfolder={t}"),
            &[400, 403, 404],
        ));
        cases.push(get(
            "view type",
            &format!("/api/view?filename=a.png&type={t}"),
            &[400],
        ));
        cases.push(get(
            "userdata dir",
            &format!("/api/userdata?dir={t}"),
            &[403],
        ));
        cases.push(get(
            "v2 userdata path",
            &format!("/api/v2/userdata?path={t}"),
            &[400],
        ));
        cases.push(get(
            "history max_items",
            &format!("/api/history?max_items={t}"),
            &[400],
        ));
        cases.push(get(
            "history offset",
            &format!("/api/history?offset={t}"),
            &[400],
        ));
        cases.push(get(
            "jobs status",
            &format!("/api/api/jobs?status={t}"),
            &[400],
        ));
        cases.push(get(
            "jobs sort_by",
            &format!("/api/api/jobs?sort_by={t}"),
            &[400],
        ));
        cases.push(get(
            "jobs workflow_id",
            &format!("/api/api/jobs?workflow_id={t}"),
            &[200],
        ));
    }
    cases.push(get(
        "view filename, invalid UTF-8",
        "/api/view?filename=%FF%FE.png&type=input",
        &[400, 404],
    ));
    cases.push(get(
        "view filename, overlong UTF-8 dots",
        "/api/view?filename=%C0%AE%C0%AE%2Fx&type=input",
        &[400, 404],
    ));
    cases.push(get(
        "view filename, long",
        &format!("/api/view?filename={long}.png&type=input"),
        &[400],
    ));
    cases.push(get(
        "view subfolder, deep",
        &format!("/api/view?filename=a.png&type=input&subfolder={deep}"),
        &[400],
    ));
    cases.push(get(
        "view preview, absurd quality",
        "/api/view?filename=a.png&type=input&preview=webp;99999999999",
        &[404],
    ));
    cases.push(get("view, no filename", "/api/view", &[404]));
    cases.push(get(
        "userdata dir, deep",
        &format!("/api/userdata?dir={deep}"),
        &[400],
    ));
    cases.push(get("userdata dir, root", "/api/userdata?dir=%2F", &[403]));
    cases.push(get(
        "jobs limit, negative",
        "/api/api/jobs?limit=-5",
        &[400],
    ));
    // ComfyUI's int(): past the last job, an empty page.
    cases.push(get(
        "jobs offset, huge",
        "/api/api/jobs?offset=99999999999999999999999",
        &[200, 400],
    ));
    cases.push(get(
        "history max_items, huge",
        "/api/history?max_items=99999999999999999999999",
        &[400],
    ));
    cases.push(get(
        "ws without upgrade, long client id",
        &format!("/ws?clientId={}", "c".repeat(5000)),
        &[400, 426],
    ));

    // ---- hostile JSON ----
    cases.push(post("prompt, not JSON", "/api/prompt", "{", &[400]));
    cases.push(post(
        "prompt, invalid UTF-8",
        "/api/prompt",
        vec![0xff, 0xfe, b'{'],
        &[400],
    ));
    cases.push(post(
        "prompt, nested 100,000 deep",
        "/api/prompt",
        nested(100_000),
        &[400],
    ));
    cases.push(post(
        "prompt, 9 MB",
        "/api/prompt",
        vec![b' '; 9 * 1024 * 1024],
        &[413],
    ));
    cases.push(post(
        "prompt, wrong types",
        "/api/prompt",
        r#"{"prompt": 5, "extra_data": [], "number": "x"}"#,
        &[400],
    ));
    cases.push(post(
        "prompt, node of wrong type",
        "/api/prompt",
        r#"{"prompt": {"1": [1,2]}}"#,
        &[400],
    ));
    cases.push(post(
        "prompt, traversal id",
        "/api/prompt",
        serde_json::to_vec(&json!({"prompt": workflow("nomodel.json"), "prompt_id": "../../x"}))
            .unwrap(),
        &[400],
    ));
    cases.push(post(
        "settings, nested",
        "/api/settings",
        nested(100_000),
        &[400],
    ));
    cases.push(post("settings, array", "/api/settings", "[1,2]", &[400]));
    cases.push(post(
        "settings, 9 MB",
        "/api/settings",
        vec![b' '; 9 * 1024 * 1024],
        &[413],
    ));
    cases.push(post(
        "setting, not JSON",
        "/api/settings/Comfy.X",
        "{",
        &[400],
    ));
    cases.push(post(
        "userdata, 9 MB",
        "/api/userdata/workflows%2Fbig.json",
        vec![b' '; 9 * 1024 * 1024],
        &[413],
    ));
    cases.push(post(
        "queue, wrong types",
        "/api/queue",
        r#"{"clear": "yes", "delete": 5}"#,
        &[400],
    ));
    // Unknown keys are skipped (without recursion), as ComfyUI ignores them.
    cases.push(post(
        "queue, nested unknown key",
        "/api/queue",
        nested(100_000),
        &[200],
    ));
    cases.push(post(
        "history, wrong types",
        "/api/history",
        r#"{"delete": {"a": 1}}"#,
        &[400],
    ));
    cases.push(post(
        "interrupt, garbage",
        "/api/interrupt",
        vec![0xff; 64],
        &[200],
    ));
    cases.push(post(
        "users, system prefix",
        "/api/users",
        r#"{"username": "__x"}"#,
        &[400],
    ));
    cases.push(
        case(
            "admin policy, traversal",
            Method::PUT,
            "/admin/api/queue/policy",
            &[400],
        )
        .auth(Auth::Basic(ADMIN))
        .body(r#"{"policy": "../../x"}"#),
    );
    cases.push(
        case(
            "admin limits, wrong types",
            Method::PUT,
            "/admin/api/queue/limits",
            &[400],
        )
        .auth(Auth::Basic(ADMIN))
        .body(r#"{"max_queue_depth": -1}"#),
    );
    cases.push(
        case(
            "admin priority, out of range",
            Method::PUT,
            "/admin/api/users/user001/priority",
            &[400],
        )
        .auth(Auth::Basic(ADMIN))
        .body(r#"{"level": 300}"#),
    );

    // ---- uploads ----
    let pic = png(2, 2, [1, 2, 3, 255]);
    let up = |what: &str,
              fields: &[(&'static str, &str)],
              file: Option<(&str, Vec<u8>)>,
              expect: &'static [u16]| {
        case(what, Method::POST, "/api/upload/image", expect).upload(fields, file)
    };
    cases.push(up(
        "upload, 2 MB over a 1 MB limit",
        &[],
        Some(("big.png", vec![0; 2 * 1024 * 1024])),
        &[413],
    ));
    cases.push(up("upload, no image", &[("type", "input")], None, &[400]));
    cases.push(up(
        "upload, traversal name",
        &[],
        Some(("../x.png", pic.clone())),
        &[200, 400],
    ));
    cases.push(up(
        "upload, hidden name",
        &[],
        Some((".x.png", pic.clone())),
        &[400],
    ));
    cases.push(up(
        "upload, backslash name",
        &[],
        Some(("a\\b.png", pic.clone())),
        &[200, 400],
    ));
    cases.push(up(
        "upload, long name",
        &[],
        Some((&format!("{long}.png"), pic.clone())),
        &[400],
    ));
    cases.push(up(
        "upload, traversal subfolder",
        &[("subfolder", "../../x")],
        Some(("a.png", pic.clone())),
        &[400],
    ));
    cases.push(up(
        "upload, absolute subfolder",
        &[("subfolder", "/etc")],
        Some(("a.png", pic.clone())),
        &[400],
    ));
    cases.push(up(
        "upload, NUL subfolder",
        &[("subfolder", "a\0b")],
        Some(("a.png", pic.clone())),
        &[400],
    ));
    cases.push(up(
        "upload, deep subfolder",
        &[("subfolder", &vec!["d"; 2000].join("/"))],
        Some(("a.png", pic.clone())),
        &[400],
    ));
    cases.push(up(
        "upload, bad type",
        &[("type", "../x")],
        Some(("a.png", pic.clone())),
        &[400],
    ));
    cases.push(up(
        "upload, markup as an image",
        &[],
        Some((
            "x.xhtml",
            b"<html xmlns=\"http://www.w3.org/1999/xhtml\"><script>1</script></html>".to_vec(),
        )),
        &[200],
    ));
    cases.push(
        case(
            "mask, traversal original",
            Method::POST,
            "/api/upload/mask",
            &[403],
        )
        .upload(
            &[(
                "original_ref",
                r#"{"filename":"a.png","subfolder":"../../..","type":"input"}"#,
            )],
            Some(("m.png", pic.clone())),
        ),
    );
    cases.push(
        case(
            "mask, original_ref not JSON",
            Method::POST,
            "/api/upload/mask",
            &[400],
        )
        .upload(&[("original_ref", "{")], Some(("m.png", pic.clone()))),
    );
    cases.push(
        case(
            "mask, not an image",
            Method::POST,
            "/api/upload/mask",
            &[400, 404],
        )
        .upload(
            &[("original_ref", r#"{"filename":"x.xhtml","type":"input"}"#)],
            Some(("m.png", b"nope".to_vec())),
        ),
    );
    cases.push(
        post(
            "upload, junk multipart",
            "/api/upload/image",
            "--x\r\nnot a part",
            &[400],
        )
        .header("content-type", "multipart/form-data; boundary=x"),
    );
    cases.push(
        post(
            "upload, JSON instead of multipart",
            "/api/upload/image",
            "{}",
            &[400],
        )
        .header("content-type", "application/json"),
    );

    // ---- other participants' things ----
    let theirs = app.submit(U2, "tab", &workflow("nomodel.json")).await;
    cases.push(get("their workspace", "/user002/api/settings", &[403]));
    cases.push(get(
        "their files",
        "/user002/api/view?filename=a.png&type=input",
        &[403],
    ));
    cases.push(get(
        "their userdata",
        "/user002/api/userdata/comfy.settings.json",
        &[403],
    ));
    cases.push(get("their socket", "/user002/ws?clientId=x", &[403]));
    cases.push(get(
        "their history entry",
        &format!("/api/history/{theirs}"),
        &[200],
    ));
    cases.push(get("their job", &format!("/api/api/jobs/{theirs}"), &[404]));
    cases.push(post(
        "delete their job",
        "/api/queue",
        serde_json::to_vec(&json!({"delete": [theirs]})).unwrap(),
        &[200],
    ));
    cases.push(post(
        "interrupt their job",
        "/api/interrupt",
        serde_json::to_vec(&json!({"prompt_id": theirs})).unwrap(),
        &[200],
    ));
    cases.push(post(
        "delete their history",
        "/api/history",
        serde_json::to_vec(&json!({"delete": [theirs]})).unwrap(),
        &[200],
    ));
    cases.push(get(
        "the admin API as a participant",
        "/admin/api/queue",
        &[403],
    ));
    cases.push(
        case(
            "the admin API as a participant (write)",
            Method::PUT,
            "/admin/api/queue/policy",
            &[403],
        )
        .body(r#"{"policy":"fifo"}"#),
    );
    cases.push(
        get(
            "an unknown participant, as admin",
            "/usernope/api/settings",
            &[404],
        )
        .auth(Auth::Basic(ADMIN)),
    );

    // ---- missing and forged credentials ----
    let basic = |s: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    };
    for (what, auth) in [
        ("no credentials", Auth::None),
        ("wrong password", Auth::WrongPassword(U)),
        (
            "name in another case",
            Auth::Header(basic(&format!("USER001:{PASSWORD}"))),
        ),
        (
            "forged session cookie",
            Auth::Cookie("comfyume_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()),
        ),
        (
            "huge session cookie",
            Auth::Cookie(format!("comfyume_session={}", "A".repeat(8000))),
        ),
        (
            "cookie with bad bytes",
            Auth::Cookie("comfyume_session=%00%FF;;;=".into()),
        ),
        ("not base64", Auth::Header("Basic !!!###".into())),
        ("no colon", Auth::Header(basic("user001"))),
        ("bearer token", Auth::Header("Bearer abc".into())),
        (
            "long user name",
            Auth::Header(basic(&format!("{}:x", "u".repeat(5000)))),
        ),
        (
            "NUL in the name",
            Auth::Header(basic(&format!("user001\0:{PASSWORD}"))),
        ),
    ] {
        for (method, path) in [
            (Method::GET, "/api/settings"),
            (Method::POST, "/api/prompt"),
            (Method::GET, "/user001/api/view?filename=a.png"),
            (Method::GET, "/admin/api/queue"),
            (Method::GET, "/api/userdata/..%2F..%2Fcomfyume.db"),
        ] {
            cases.push(
                case(&format!("{what}: {method} {path}"), method, path, &[401]).auth(auth.clone()),
            );
        }
    }

    // ---- cross-site requests (the browser resends Basic credentials) ----
    for origin in [
        "http://evil.example",
        "null",
        "http://127.0.0.1.evil.example",
    ] {
        cases.push(
            post(
                "cross-site prompt",
                "/api/prompt",
                serde_json::to_vec(&json!({"prompt": workflow("nomodel.json")})).unwrap(),
                &[403],
            )
            .header("origin", origin),
        );
        cases.push(
            post("cross-site settings", "/api/settings", r#"{"a":1}"#, &[403])
                .header("origin", origin),
        );
        cases.push(
            post("cross-site upload", "/api/upload/image", "x", &[403]).header("origin", origin),
        );
        cases.push(
            case(
                "cross-site userdata delete",
                Method::DELETE,
                "/api/userdata/comfy.settings.json",
                &[403],
            )
            .header("origin", origin),
        );
        cases.push(
            case(
                "cross-site admin write",
                Method::PUT,
                "/admin/api/queue/policy",
                &[403],
            )
            .auth(Auth::Basic(ADMIN))
            .body(r#"{"policy":"fifo"}"#)
            .header("origin", origin),
        );
        cases.push(
            get("cross-site WebSocket", "/ws?clientId=x", &[403])
                .header("origin", origin)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        );
    }
    cases
}

async fn send(app: &TestApp, c: &Case) -> helpers::Resp {
    let mut rb = app.request(c.method.clone(), &c.path);
    rb = match &c.auth {
        Auth::None => rb,
        Auth::Basic(u) => rb.basic_auth(u, Some(PASSWORD)),
        Auth::WrongPassword(u) => rb.basic_auth(u, Some("not the password")),
        Auth::Header(h) => rb.header("authorization", h.as_str()),
        Auth::Cookie(c) => rb.header("cookie", c.as_str()),
    };
    for (k, v) in &c.headers {
        rb = rb.header(*k, v.as_str());
    }
    rb = match &c.body {
        Body::None => rb,
        Body::Bytes(b) => rb.body(b.clone()),
        Body::Multipart(fields, file) => {
            let mut form = reqwest::multipart::Form::new();
            if let Some((name, bytes)) = file {
                form = form.part(
                    "image",
                    reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.clone()),
                );
            }
            for (k, v) in fields {
                form = form.text(*k, v.clone());
            }
            rb.multipart(form)
        }
    };
    TestApp::send(rb).await
}

#[tokio::test]
async fn every_hostile_request_gets_its_status_and_none_a_500() {
    // A small upload limit, so that an oversize upload is cheap to send.
    let app = spawn_app_with(|s| s.max_upload_bytes = 1024 * 1024).await;
    // The participants exist and user001 has a workflow to move.
    assert_eq!(app.get(U, "/api/settings").await.status, 200);
    assert_eq!(app.get(U2, "/api/settings").await.status, 200);
    assert_eq!(
        app.post(U, "/api/userdata/workflows%2Fa.json", "{}")
            .await
            .status,
        200
    );
    let db = std::fs::read(app.data_dir.join("comfyume.db"))
        .unwrap()
        .len();
    let cases = corpus(&app).await;
    assert!(cases.len() > 250, "{} cases", cases.len());
    let mut wrong = Vec::new();
    for c in &cases {
        let r = send(&app, c).await;
        let code = r.status.as_u16();
        if !c.expect.contains(&code) || code >= 500 {
            wrong.push(format!(
                "{} {} ({}): got {code}, want {:?}: {}",
                c.method,
                c.path.chars().take(120).collect::<String>(),
                c.what,
                c.expect,
                r.text().chars().take(200).collect::<String>()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );

    // Nothing escaped, nobody else's job was touched, and the server is well.
    assert!(app.data_dir.join("comfyume.db").is_file());
    assert!(
        std::fs::read(app.data_dir.join("comfyume.db"))
            .unwrap()
            .len()
            >= db
    );
    let q = app.get(U2, "/api/queue").await.json();
    assert_eq!(q["queue_pending"].as_array().unwrap().len(), 1, "{q}");
    assert_eq!(app.anon_get("/healthz", &[]).await.status, 200);
    assert_eq!(app.get(U, "/api/settings").await.status, 200);
}

/// Requests no well-behaved client can build: raw bytes on the socket.
#[tokio::test]
async fn raw_malformed_targets_are_refused_cleanly() {
    let app = spawn_app_with(|_| {}).await;
    assert_eq!(app.get(U, "/api/settings").await.status, 200);
    for (target, expect) in [
        ("/api/userdata/..%2f..%2fcomfyume.db", &[403u16][..]),
        ("/../../etc/passwd", &[400, 404]),
        ("/user001/../user002/api/settings", &[400, 403, 404]),
        (
            "/api/view?filename=..%c0%af..%c0%afetc%c0%afpasswd&type=input",
            &[400, 404],
        ),
        ("/api/userdata?dir=%%%", &[400, 403, 404]),
        ("/api/userdata/%", &[400, 403, 404]),
        ("/%00", &[400, 404]),
    ] {
        let (code, body) = app.raw(U, target).await;
        assert!(
            expect.contains(&code),
            "{target}: got {code}, want {expect:?}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(app.anon_get("/healthz", &[]).await.status, 200);
}
