//! Every file-ish parameter, attacked: `..`, absolute paths, encoded separators
//! and dots, backslashes, NUL, and symlinks inside the participant's folder that
//! point outside. Nothing outside user001's own folders may be read or written:
//! canaries outside stay byte-identical and their content never comes back.

use crate::helpers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use helpers::{PASSWORD, TestApp, png, spawn_app};
use reqwest::Method;
use serde_json::json;

const U: &str = "user001";
const CANARY: &str = "CANARY-9d1e-do-not-serve";

/// Canaries outside user001's folders: at the temp root, in the data dir, and
/// in user002's folders. Returns the root to snapshot.
async fn plant_canaries(app: &TestApp) -> PathBuf {
    let root = app.data_dir.parent().unwrap().to_path_buf();
    std::fs::write(root.join("canary.txt"), CANARY).unwrap();
    std::fs::write(app.data_dir.join("canary.txt"), CANARY).unwrap();
    let mut c = image::RgbaImage::from_pixel(3, 3, image::Rgba([77, 88, 99, 255]));
    c.put_pixel(0, 0, image::Rgba([77, 88, 99, 200]));
    c.save(root.join("canary.png")).unwrap();
    assert_eq!(
        app.post("user002", "/api/userdata/canary.txt", CANARY)
            .await
            .status,
        200
    );
    assert_eq!(
        app.post_json("user002", "/api/settings", &json!({"C": CANARY}))
            .await
            .status,
        200
    );
    app.upload(
        "user002",
        "/api/upload/image",
        "canary.png",
        std::fs::read(root.join("canary.png")).unwrap(),
        &[],
    )
    .await;
    // user001's own folders exist (first request provisions them).
    assert_eq!(app.get(U, "/api/settings").await.status, 200);
    root
}

/// Every file outside user001's folders (the database excepted: sign-ins write it).
fn snapshot(app: &TestApp, root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let d = app.dirs(U);
    let own = [d.user_data, d.inputs, d.outputs, d.temp];
    let mut out = BTreeMap::new();
    fn walk(p: &Path, own: &[PathBuf], out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let path = e.path();
            if own.contains(&path) || e.file_name().to_string_lossy().starts_with("comfyume.db") {
                continue;
            }
            let md = path.symlink_metadata().unwrap();
            if md.is_dir() {
                walk(&path, own, out);
            } else if md.is_symlink() {
                out.insert(
                    path.clone(),
                    std::fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                );
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    walk(root, &own, &mut out);
    out
}

fn assert_clean(r: &helpers::Resp, what: &str) {
    assert!(
        !r.text().contains(CANARY),
        "{what}: the canary's content came back"
    );
    assert!(
        !r.text().contains("root:x:0:0"),
        "{what}: /etc/passwd came back"
    );
}

/// Path-segment forms of a relative path (what the frontend URL-encodes).
const FILE_ATTACKS: &[&str] = &[
    "..%2F..%2F..%2Fcanary.txt",
    "..%2F..%2Fcanary.txt",
    "..%2Fuser002%2Fcanary.txt",
    "..%2Fuser002%2Fcomfy.settings.json",
    "%2e%2e%2F%2e%2e%2Fcanary.txt",
    "%2E%2E%2Fuser002%2Fcanary.txt",
    "workflows%2F..%2F..%2Fuser002%2Fcanary.txt",
    "%2Fetc%2Fpasswd",
    "%2Fcanary.txt",
    "..%5C..%5Ccanary.txt",
    "..%5Cuser002%5Ccanary.txt",
    "workflows%2Fa.json%00.png",
    "..%00%2Fcanary.txt",
];

#[tokio::test]
async fn userdata_paths_cannot_leave_the_participants_folder() {
    let app = spawn_app().await;
    let root = plant_canaries(&app).await;
    // The absolute path of a canary, as a path segment.
    let abs = root
        .join("canary.txt")
        .to_string_lossy()
        .replace('/', "%2F");
    app.post(U, "/api/userdata/workflows%2Fmine.json", "{}")
        .await;
    let before = snapshot(&app, &root);

    let mut attacks: Vec<String> = FILE_ATTACKS.iter().map(|s| s.to_string()).collect();
    attacks.push(abs);
    for a in &attacks {
        for prefix in ["/api", "", "/user001/api"] {
            let r = app.get(U, &format!("{prefix}/userdata/{a}")).await;
            assert_eq!(r.status, 403, "GET {prefix}/userdata/{a}");
            assert_clean(&r, a);
            let r = app
                .post(U, &format!("{prefix}/userdata/{a}"), "pwned")
                .await;
            assert_eq!(r.status, 403, "POST {prefix}/userdata/{a}");
            let r = app.delete(U, &format!("{prefix}/userdata/{a}")).await;
            assert_eq!(r.status, 403, "DELETE {prefix}/userdata/{a}");
            let r = app
                .post(
                    U,
                    &format!("{prefix}/userdata/{a}/move/workflows%2Fgot.json"),
                    "",
                )
                .await;
            assert_eq!(r.status, 403, "move from {a}");
            let r = app
                .post(
                    U,
                    &format!("{prefix}/userdata/workflows%2Fmine.json/move/{a}"),
                    "",
                )
                .await;
            assert_eq!(r.status, 403, "move to {a}");
        }
    }
    // Double-encoded: a literal, harmless name inside the folder (never decoded twice into `..`).
    for a in [
        "..%252F..%252Fcanary.txt",
        "%252e%252e%252Fuser002%252Fcanary.txt",
    ] {
        let r = app.get(U, &format!("/api/userdata/{a}")).await;
        assert_eq!(r.status, 404, "{a}");
        assert_eq!(
            app.delete(U, &format!("/api/userdata/{a}")).await.status,
            404,
            "{a}"
        );
    }
    for dir in [
        "..",
        "../user002",
        "/etc",
        "%2e%2e",
        "workflows%2F..%2F..",
        "..%5Cuser002",
        "%2Fetc",
    ] {
        let r = app.get(U, &format!("/api/userdata?dir={dir}")).await;
        assert_eq!(r.status, 403, "list dir={dir}");
        assert_clean(&r, dir);
    }
    assert_eq!(
        app.get(U, "/api/userdata/workflows%2Fmine.json")
            .await
            .status,
        200,
        "the source was not moved"
    );
    assert!(!app.dirs(U).user_data.join("workflows/got.json").exists());
    assert_eq!(
        snapshot(&app, &root),
        before,
        "something outside user001's folder changed"
    );
}

#[tokio::test]
async fn the_v2_listing_path_cannot_leave_the_participants_folder() {
    let app = spawn_app().await;
    let root = plant_canaries(&app).await;
    for p in [
        "..",
        "../user002",
        "/etc",
        "%2e%2e%2Fuser002",
        "workflows%2F..%2F..%2F..",
        "..%5Cuser002",
        "%2F",
    ] {
        let r = app.get(U, &format!("/api/v2/userdata?path={p}")).await;
        // ComfyUI: "Invalid path requested" (400) for a path outside the user's folder.
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (400, "Invalid path requested"),
            "path={p}"
        );
    }
    let r = app.get(U, "/api/v2/userdata").await;
    assert_eq!(r.status, 200);
    assert_clean(&r, "v2 root");
    assert!(!r.text().contains("canary"), "{}", r.text());
    let _ = root;
}

#[tokio::test]
async fn view_parameters_cannot_leave_the_participants_folders() {
    let app = spawn_app().await;
    let root = plant_canaries(&app).await;
    std::fs::write(app.dirs(U).inputs.join("mine.txt"), "mine").unwrap();
    let abs = root
        .join("canary.txt")
        .to_string_lossy()
        .replace('/', "%2F");
    let mut bad_names: Vec<String> = [
        "../canary.txt",
        "..%2F..%2F..%2Fcanary.txt",
        "%2e%2e%2F%2e%2e%2Fcanary.txt",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "..%5C..%5Ccanary.txt",
        "a%5Cmine.txt",
        "mine.txt%00.png",
        "%00",
        "../user002/canary.png",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    bad_names.push(abs);
    for name in &bad_names {
        for kind in ["input", "output", "temp"] {
            let r = app
                .get(U, &format!("/api/view?filename={name}&type={kind}"))
                .await;
            assert_eq!(r.status, 400, "filename={name}&type={kind}");
            assert_clean(&r, name);
        }
    }
    for sub in [
        "..",
        "../..",
        "../../..",
        "/tmp",
        "%2Fetc",
        "%2e%2e%2F%2e%2e",
        "..%5C..",
        "..%2Fuser002",
        "a%2F..%2F..%2F..",
    ] {
        for file in ["canary.txt", "canary.png", "passwd"] {
            let r = app
                .get(
                    U,
                    &format!("/api/view?filename={file}&type=input&subfolder={sub}"),
                )
                .await;
            assert_eq!(r.status, 403, "subfolder={sub} filename={file}");
            assert_clean(&r, sub);
        }
    }
    // Annotated names are checked the same way.
    let r = app
        .get(U, "/api/view?filename=..%2Fcanary.txt%20%5Binput%5D")
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        app.get(U, "/api/view?filename=mine.txt&type=input")
            .await
            .text(),
        "mine"
    );
}

fn raw_form(name: &str, bytes: Vec<u8>, fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    // No percent-encoding of the file name: browsers send it raw.
    let mut form = reqwest::multipart::Form::new().percent_encode_noop().part(
        "image",
        reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
    );
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    form
}

async fn upload_raw(
    app: &TestApp,
    path: &str,
    name: &str,
    bytes: Vec<u8>,
    fields: &[(&str, &str)],
) -> helpers::Resp {
    TestApp::send(
        app.request(Method::POST, path)
            .basic_auth(U, Some(PASSWORD))
            .multipart(raw_form(name, bytes, fields)),
    )
    .await
}

#[tokio::test]
async fn upload_subfolders_and_names_cannot_leave_the_participants_folders() {
    let app = spawn_app().await;
    let root = plant_canaries(&app).await;
    let before = snapshot(&app, &root);
    let img = png(2, 2, [5, 5, 5, 255]);
    let abs = root.to_string_lossy().into_owned();
    let subs = [
        "..",
        "../..",
        "../../..",
        "../user002",
        "/tmp",
        abs.as_str(),
        "a/../../..",
        "..\\..",
        "a\0b",
        "./../..",
    ];
    for sub in subs {
        for kind in ["input", "temp", "output"] {
            for p in [
                "/api/upload/image",
                "/upload/image",
                "/user001/api/upload/image",
            ] {
                let r = upload_raw(
                    &app,
                    p,
                    "evil.png",
                    img.clone(),
                    &[("subfolder", sub), ("type", kind), ("overwrite", "true")],
                )
                .await;
                assert_eq!(r.status, 400, "{p} subfolder={sub:?} type={kind}");
            }
        }
    }
    for name in [
        "../evil.png",
        "../../../canary.txt",
        "..\\evil.png",
        "/tmp/evil.png",
        "a/b.png",
        "..",
        ".",
        "x\0.png",
    ] {
        let r = upload_raw(
            &app,
            "/api/upload/image",
            name,
            img.clone(),
            &[("overwrite", "true")],
        )
        .await;
        assert_eq!(r.status, 400, "file name {name:?}");
    }
    assert_eq!(
        snapshot(&app, &root),
        before,
        "an upload landed outside user001's folders"
    );
    assert_eq!(
        app.get(U, "/internal/files/input").await.json(),
        json!([]),
        "nothing landed inside either"
    );
}

#[tokio::test]
async fn a_mask_cannot_name_an_original_outside_the_participants_folders() {
    let app = spawn_app().await;
    let root = plant_canaries(&app).await;
    app.upload(
        U,
        "/api/upload/image",
        "mine.png",
        png(3, 3, [1, 1, 1, 255]),
        &[],
    )
    .await;
    let before = snapshot(&app, &root);
    let abs = root.join("canary.png").to_string_lossy().into_owned();
    let refs = [
        (
            json!({"filename": "../../../canary.png", "subfolder": "", "type": "input"}),
            400,
        ),
        (
            json!({"filename": "../../user002/canary.png", "type": "input"}),
            400,
        ),
        (json!({"filename": abs, "type": "input"}), 400),
        (
            json!({"filename": "canary.png", "subfolder": "../../..", "type": "input"}),
            403,
        ),
        (
            json!({"filename": "canary.png", "subfolder": "../user002", "type": "input"}),
            403,
        ),
        (
            json!({"filename": "canary.png", "subfolder": "/", "type": "input"}),
            403,
        ),
        (
            json!({"filename": "..\\..\\canary.png", "type": "input"}),
            400,
        ),
        (json!({"filename": "mine.png", "type": "bogus"}), 400),
    ];
    for (r#ref, status) in refs {
        let r = app
            .upload(
                U,
                "/api/upload/mask",
                "m.png",
                png(3, 3, [0, 0, 0, 0]),
                &[("original_ref", &r#ref.to_string()), ("type", "input")],
            )
            .await;
        assert_eq!(r.status, status, "original_ref {ref}");
    }
    assert_eq!(snapshot(&app, &root), before);
    assert_eq!(
        app.get(U, "/internal/files/input").await.json(),
        json!(["mine.png"]),
        "no mask was saved"
    );
}

#[tokio::test]
async fn symlinks_inside_the_participants_folder_lead_nowhere() {
    use std::os::unix::fs::symlink;
    let app = spawn_app().await;
    let root = plant_canaries(&app).await;
    let d = app.dirs(U);
    symlink(&root, d.user_data.join("link")).unwrap();
    symlink(
        root.join("canary.txt"),
        d.user_data.join("workflows/evil.json"),
    )
    .unwrap();
    symlink(app.dirs("user002").user_data, d.user_data.join("theirs")).unwrap();
    symlink(root.join("canary.png"), d.inputs.join("evil.png")).unwrap();
    symlink(&root, d.inputs.join("out")).unwrap();
    symlink(&root, d.outputs.join("out")).unwrap();
    app.post(U, "/api/userdata/workflows%2Fmine.json", "{}")
        .await;
    let before = snapshot(&app, &root);

    for f in [
        "link%2Fcanary.txt",
        "workflows%2Fevil.json",
        "theirs%2Fcanary.txt",
        "theirs%2Fcomfy.settings.json",
    ] {
        let r = app.get(U, &format!("/api/userdata/{f}")).await;
        assert_eq!(r.status, 403, "GET {f}");
        assert_clean(&r, f);
        assert_eq!(
            app.post(U, &format!("/api/userdata/{f}"), "pwned")
                .await
                .status,
            403,
            "POST {f}"
        );
        assert_eq!(
            app.delete(U, &format!("/api/userdata/{f}")).await.status,
            403,
            "DELETE {f}"
        );
        let r = app
            .post(
                U,
                &format!("/api/userdata/{f}/move/workflows%2Fgot.json"),
                "",
            )
            .await;
        assert_eq!(r.status, 403, "move from {f}");
    }
    for dest in ["link%2Fnew.json", "theirs%2Fnew.json", "link%2Fcanary.txt"] {
        let r = app
            .post(
                U,
                &format!("/api/userdata/workflows%2Fmine.json/move/{dest}"),
                "",
            )
            .await;
        assert_eq!(r.status, 403, "move to {dest}");
        assert_eq!(
            app.post(U, &format!("/api/userdata/{dest}"), "pwned")
                .await
                .status,
            403,
            "POST {dest}"
        );
    }
    for dir in ["link", "theirs"] {
        assert_eq!(
            app.get(U, &format!("/api/userdata?dir={dir}")).await.status,
            403,
            "list {dir}"
        );
        assert_eq!(
            app.get(U, &format!("/api/v2/userdata?path={dir}"))
                .await
                .status,
            400,
            "v2 {dir}"
        );
    }
    // Listings do not follow links.
    for p in [
        "/api/userdata?dir=workflows&recurse=true",
        "/api/v2/userdata",
        "/internal/files/input",
        "/internal/files/output",
    ] {
        let r = app.get(U, p).await;
        assert_eq!(r.status, 200, "{p}");
        assert!(
            !r.text().contains("canary") && !r.text().contains("evil"),
            "{p}: {}",
            r.text()
        );
    }
    let info = app.get(U, "/api/object_info/LoadImage").await.json();
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!([])
    );

    // /view through a linked file or folder.
    for q in [
        "filename=evil.png&type=input",
        "filename=canary.png&type=input&subfolder=out",
        "filename=canary.txt&type=output&subfolder=out",
        "filename=canary.png&subfolder=out",
    ] {
        let r = app.get(U, &format!("/api/view?{q}")).await;
        assert_eq!(r.status, 403, "{q}");
        assert_clean(&r, q);
        assert!(r.body.is_empty());
    }
    // Uploads into a linked folder, and a mask over a linked original.
    let r = app
        .upload(
            U,
            "/api/upload/image",
            "x.png",
            png(2, 2, [1, 1, 1, 255]),
            &[("subfolder", "out")],
        )
        .await;
    assert_eq!(r.status, 400);
    let r = app
        .upload(
            U,
            "/api/upload/mask",
            "m.png",
            png(3, 3, [0, 0, 0, 0]),
            &[
                (
                    "original_ref",
                    r#"{"filename":"evil.png","subfolder":"","type":"input"}"#,
                ),
                ("type", "input"),
            ],
        )
        .await;
    assert_eq!(
        r.status, 403,
        "the mask editor must not read through a link"
    );
    let r = app
        .upload(
            U,
            "/api/upload/mask",
            "m.png",
            png(3, 3, [0, 0, 0, 0]),
            &[
                (
                    "original_ref",
                    r#"{"filename":"canary.png","subfolder":"out","type":"input"}"#,
                ),
                ("type", "input"),
            ],
        )
        .await;
    assert_eq!(r.status, 403);
    // An upload named like a link is never compared with the link's target
    // (identical bytes would otherwise answer "same file" and reveal its content).
    let canary_png = std::fs::read(root.join("canary.png")).unwrap();
    let r = app
        .upload(U, "/api/upload/image", "evil.png", canary_png, &[])
        .await;
    assert_eq!(r.json()["name"], "evil (1).png");
    // Overwriting an upload whose name is a link replaces the link, not its target.
    let r = app
        .upload(
            U,
            "/api/upload/image",
            "evil.png",
            png(2, 2, [3, 3, 3, 255]),
            &[("overwrite", "true")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        !d.inputs
            .join("evil.png")
            .symlink_metadata()
            .unwrap()
            .is_symlink()
    );

    assert_eq!(
        snapshot(&app, &root),
        before,
        "something outside user001's folders changed"
    );
}

#[tokio::test]
async fn raw_dot_segments_never_reach_a_file_outside() {
    let app = spawn_app().await;
    let _root = plant_canaries(&app).await;
    for target in [
        "/../canary.txt",
        "/../../canary.txt",
        "/assets/../../canary.txt",
        "/assets/..%2F..%2Fcanary.txt",
        "/%2e%2e/%2e%2e/canary.txt",
        "/user001/../../canary.txt",
        "/user001/assets/../../../canary.txt",
        "/api/userdata/../../canary.txt",
        "/api/userdata/..%2F..%2F..%2Fcanary.txt",
        "/templates/../../canary.txt",
        "/templates/..%2F..%2Fcanary.txt",
        "/extensions/../../canary.txt",
        "/assets/..%5C..%5Ccanary.txt",
    ] {
        let (status, body) = app.raw(U, target).await;
        assert!(matches!(status, 400 | 403 | 404), "{target}: {status}");
        assert!(
            !String::from_utf8_lossy(&body).contains(CANARY),
            "{target} served the canary"
        );
    }
}
