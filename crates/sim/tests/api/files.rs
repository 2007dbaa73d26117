//! /upload/image and /view, as in traces/view_upload.txt.

use crate::helpers::*;
use reqwest::StatusCode;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

fn png(color: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(
        4,
        4,
        image::Rgb([(color >> 16) as u8, (color >> 8) as u8, color as u8]),
    );
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn upload(
    t: &TestSim,
    name: &str,
    bytes: Vec<u8>,
    fields: &[(&str, &str)],
) -> (StatusCode, Option<Value>) {
    let mut form = Form::new().part(
        "image",
        Part::bytes(bytes)
            .file_name(name.to_string())
            .mime_str("image/png")
            .unwrap(),
    );
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    let r = t
        .http
        .post(t.url("/upload/image"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).ok())
}

#[tokio::test]
async fn upload_dedups_by_content_and_renames_on_conflict() {
    let t = quick_sim().await;
    let (a, b) = (png(0xFF0000), png(0x00FF00));
    let name = |r: (StatusCode, Option<Value>)| -> Value {
        assert_eq!(r.0, StatusCode::OK);
        r.1.unwrap()
    };
    assert_eq!(
        name(upload(&t, "up.png", a.clone(), &[]).await),
        json!({"name": "up.png", "subfolder": "", "type": "input"})
    );
    assert_eq!(
        name(upload(&t, "up.png", a.clone(), &[]).await)["name"],
        "up.png"
    );
    assert_eq!(
        name(upload(&t, "up.png", b.clone(), &[]).await)["name"],
        "up (1).png"
    );
    assert_eq!(
        name(upload(&t, "up.png", b.clone(), &[]).await)["name"],
        "up (1).png"
    );
    assert_eq!(std::fs::read(t.sim.input_dir().join("up.png")).unwrap(), a);
    assert_eq!(
        name(upload(&t, "up.png", b.clone(), &[("overwrite", "true")]).await)["name"],
        "up.png"
    );
    assert_eq!(std::fs::read(t.sim.input_dir().join("up.png")).unwrap(), b);
    assert_eq!(
        name(
            upload(
                &t,
                "up.png",
                a.clone(),
                &[("subfolder", "sub/dir"), ("type", "temp")]
            )
            .await
        ),
        json!({"name": "up.png", "subfolder": "sub/dir", "type": "temp"})
    );
    assert_eq!(
        upload(&t, "up.png", a.clone(), &[("subfolder", "../..")])
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    let r = t
        .http
        .post(t.url("/api/upload/image"))
        .multipart(Form::new().text("type", "input"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // The uploaded file is listed by LoadImage and a prompt using it validates and runs.
    let info = t.get_json("/object_info/LoadImage").await;
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["up (1).png", "up.png"])
    );
    let prompt = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "up.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    });
    let id = t.queue_ok(&prompt, None).await;
    let h = t.wait_history(&id).await;
    assert_eq!(h["status"]["status_str"], "success");
    let out = &h["outputs"]["3"]["images"][0];
    assert_eq!(out["type"], "temp");
    let filename = out["filename"].as_str().unwrap();
    assert!(
        filename.starts_with("ComfyUI_temp_") && filename.ends_with("_00001_.png"),
        "{filename}"
    );
    let r = t.get(&format!("/view?filename={filename}&type=temp")).await;
    let img = image::load_from_memory(&r.bytes().await.unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(img.get_pixel(0, 0).0, [255, 0, 255], "green inverted");

    let (s, body) = t.queue_prompt(&json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    }), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["node_errors"]["1"]["errors"][0]["details"],
        "image - Invalid image file: nope.png"
    );
    t.sim.shutdown().await;
}

#[tokio::test]
async fn view_rejects_traversal_and_converts_previews() {
    let t = quick_sim().await;
    let id = t.queue_ok(&workflow("nomodel.json"), None).await;
    t.wait_history(&id).await;
    let status = |p: &str| {
        let t = &t;
        let p = p.to_string();
        async move {
            let r = t.get(&p).await;
            let s = r.status();
            (s, r.bytes().await.unwrap().len())
        }
    };
    assert_eq!(
        status("/view?filename=../etc/passwd&type=output").await,
        (StatusCode::BAD_REQUEST, 0)
    );
    assert_eq!(
        status("/view?filename=/etc/passwd&type=output").await,
        (StatusCode::BAD_REQUEST, 0)
    );
    assert_eq!(
        status("/view?filename=nomodel_00001_.png&type=bogus").await,
        (StatusCode::BAD_REQUEST, 0)
    );
    assert_eq!(
        status("/view?filename=x.png&type=output&subfolder=../..").await,
        (StatusCode::FORBIDDEN, 0)
    );
    assert_eq!(
        status("/view?filename=nomodel_00001_.png&type=input").await,
        (StatusCode::NOT_FOUND, 0)
    );
    assert_eq!(
        status("/view?type=output").await,
        (StatusCode::NOT_FOUND, 0)
    );
    assert_eq!(
        status("/view?filename=missing.png&type=output").await,
        (StatusCode::NOT_FOUND, 0)
    );
    assert_eq!(
        status("/api/view?filename=nomodel_00001_.png").await.0,
        StatusCode::OK
    );
    assert_eq!(
        status("/view?filename=nomodel_00001_.png%20%5Boutput%5D&type=input")
            .await
            .0,
        StatusCode::OK
    );

    for (query, mime, magic) in [
        ("preview=webp;50", "image/webp", &b"RIFF"[..]),
        ("preview=jpeg;80", "image/jpeg", &[0xFF, 0xD8][..]),
        ("channel=rgb", "image/png", &[0x89, b'P'][..]),
        ("channel=a", "image/png", &[0x89, b'P'][..]),
    ] {
        let r = t
            .get(&format!(
                "/view?filename=nomodel_00001_.png&type=output&{query}"
            ))
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{query}");
        assert_eq!(r.headers()["content-type"], mime, "{query}");
        assert_eq!(
            r.headers()["content-disposition"],
            "filename=\"nomodel_00001_.png\""
        );
        let body = r.bytes().await.unwrap();
        assert!(body.starts_with(magic), "{query}");
    }
    t.sim.shutdown().await;
}
