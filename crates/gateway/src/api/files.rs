//! `/upload/image`, `/upload/mask` and `/view`: each participant's own input,
//! output and temp folders, with ComfyUI's de-duplication, status codes and
//! preview conversions.

use std::io::Cursor;
use std::path::{Path as FsPath, PathBuf};
use std::time::SystemTime;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Multipart, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Participant;
use crate::error::{ApiError, ApiResult};
use crate::paths::{MAX_NAME_BYTES, PathError, is_plain_file_name, resolve_within};
use crate::state::{AppState, UserDirs};
use crate::{fsx, headers, sniff};

/// The folder for ComfyUI's `type` parameter.
fn type_dir(dirs: &UserDirs, kind: &str) -> Option<PathBuf> {
    match kind {
        "input" => Some(dirs.inputs.clone()),
        "output" => Some(dirs.outputs.clone()),
        "temp" => Some(dirs.temp.clone()),
        _ => None,
    }
}

/// (name relative to `dir`, modified time) of every file below `dir`.
pub async fn list_files(dir: &FsPath) -> Vec<(String, SystemTime)> {
    crate::fsx::list_files(dir).await
}

struct Upload {
    name: String,
    bytes: Bytes,
    overwrite: bool,
    subfolder: String,
    kind: String,
    original_ref: Option<String>,
}

async fn read_upload(mut mp: Multipart) -> ApiResult<Upload> {
    let mut up = Upload {
        name: String::new(),
        bytes: Bytes::new(),
        overwrite: false,
        subfolder: String::new(),
        kind: "input".into(),
        original_ref: None,
    };
    let mut have_image = false;
    while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
        match field.name().unwrap_or("") {
            "image" => {
                up.name = field.file_name().unwrap_or("").to_string();
                up.bytes = field.bytes().await.map_err(multipart_error)?;
                have_image = true;
            }
            "overwrite" => {
                let v = field.text().await.map_err(multipart_error)?;
                up.overwrite = v == "true" || v == "1";
            }
            "subfolder" => up.subfolder = field.text().await.map_err(multipart_error)?,
            "type" => up.kind = field.text().await.map_err(multipart_error)?,
            "original_ref" => up.original_ref = Some(field.text().await.map_err(multipart_error)?),
            _ => {}
        }
    }
    if !have_image || up.name.is_empty() {
        return Err(ApiError::Empty(StatusCode::BAD_REQUEST));
    }
    Ok(up)
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::Text(
            status,
            "The upload is larger than the server's limit.".into(),
        )
    } else {
        ApiError::Text(
            StatusCode::BAD_REQUEST,
            format!("Malformed upload: {}", e.body_text()),
        )
    }
}

async fn save_upload(
    state: &AppState,
    who: &Participant,
    up: &Upload,
    bytes: &[u8],
) -> ApiResult<Value> {
    let dirs = state.user_dirs(&who.name);
    let base = type_dir(&dirs, &up.kind).ok_or(ApiError::Empty(StatusCode::BAD_REQUEST))?;
    if up.name.len() > MAX_NAME_BYTES {
        return Err(ApiError::bad_request(format!(
            "Invalid file name: longer than {MAX_NAME_BYTES} bytes."
        )));
    }
    if !is_plain_file_name(&up.name) || up.name.starts_with('.') {
        return Err(ApiError::Empty(StatusCode::BAD_REQUEST));
    }
    // Every check before the first folder is made.
    let folder = resolve_within(&base, &up.subfolder)
        .await
        .map_err(|e| ApiError::path(e, ApiError::Empty(StatusCode::BAD_REQUEST)))?;
    // Held until the file is written: two uploads at once cannot share the room left.
    let quota = state.settings.user_quota_bytes;
    let lock = crate::quota::lock_for(&who.name);
    let _guard = match quota {
        Some(_) => Some(lock.lock().await),
        None => None,
    };
    if quota.is_some() {
        let used = crate::quota::usage(state, &who.name).await.total();
        crate::quota::check(quota, used, bytes.len() as u64)?;
    }
    let created = fsx::create_dirs(&folder).await?;
    match fsx::publish_upload(&folder, &up.name, bytes, up.overwrite).await {
        Ok((final_name, duplicate)) => {
            if !duplicate {
                metrics::counter!(crate::telemetry::UPLOAD_BYTES).increment(bytes.len() as u64);
            }
            Ok(json!({"name": final_name, "subfolder": up.subfolder, "type": up.kind}))
        }
        Err(e) => {
            fsx::remove_created(created).await;
            Err(e.into())
        }
    }
}

pub async fn upload_image(
    State(state): State<AppState>,
    who: Participant,
    mp: Multipart,
) -> ApiResult<Json<Value>> {
    let up = read_upload(mp).await?;
    let bytes = up.bytes.clone();
    Ok(Json(save_upload(&state, &who, &up, &bytes).await?))
}

#[derive(Deserialize)]
struct FileRef {
    filename: String,
    #[serde(default)]
    subfolder: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

/// `/upload/mask`: the uploaded image's alpha becomes the alpha of the
/// participant's original image (the mask editor's save).
pub async fn upload_mask(
    State(state): State<AppState>,
    who: Participant,
    mp: Multipart,
) -> ApiResult<Json<Value>> {
    let up = read_upload(mp).await?;
    let Some(orig) = up
        .original_ref
        .as_deref()
        .and_then(|s| serde_json::from_str::<FileRef>(s).ok())
    else {
        return Err(ApiError::Empty(StatusCode::BAD_REQUEST));
    };
    let dirs = state.user_dirs(&who.name);
    let base = type_dir(&dirs, orig.kind.as_deref().unwrap_or("output"))
        .ok_or(ApiError::Empty(StatusCode::BAD_REQUEST))?;
    let folder = resolve_within(&base, &orig.subfolder)
        .await
        .map_err(|e| ApiError::path(e, ApiError::forbidden()))?;
    if !is_plain_file_name(&orig.filename) {
        return Err(ApiError::Empty(StatusCode::BAD_REQUEST));
    }
    // resolve_within: a link named like the original must not lead outside.
    let orig_path = resolve_within(&folder, &orig.filename)
        .await
        .map_err(|e| ApiError::path(e, ApiError::forbidden()))?;
    let mask_bytes = up.bytes.clone();
    let merged = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let original = image::open(&orig_path).map_err(|e| e.to_string())?;
        let mask = image::load_from_memory(&mask_bytes)
            .map_err(|e| e.to_string())?
            .to_rgba8();
        let mut out = original.to_rgba8();
        if out.dimensions() != mask.dimensions() {
            return Err("mask size differs from the original image".into());
        }
        for (px, m) in out.pixels_mut().zip(mask.pixels()) {
            px.0[3] = m.0[3];
        }
        let mut buf = Cursor::new(Vec::new());
        out.write_to(&mut buf, image::ImageFormat::Png)
            .map_err(|e| e.to_string())?;
        Ok(buf.into_inner())
    })
    .await
    .map_err(|e| ApiError::Io(std::io::Error::other(e)))?;
    let merged = match merged {
        Ok(b) => b,
        Err(msg) => return Err(ApiError::Text(StatusCode::BAD_REQUEST, msg)),
    };
    Ok(Json(save_upload(&state, &who, &up, &merged).await?))
}

#[derive(Deserialize)]
pub struct ViewQuery {
    filename: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    subfolder: Option<String>,
    preview: Option<String>,
    channel: Option<String>,
}

/// How long `/view` waits for a result still being copied from the GPU server (a video
/// can take a while); past it the answer is 404, as for a file that is not there.
const PENDING_OUTPUT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

pub async fn view(
    State(state): State<AppState>,
    who: Participant,
    Query(q): Query<ViewQuery>,
    req: Request,
) -> ApiResult<Response> {
    // ComfyUI: no filename parameter is a 404, an empty one a 400.
    let Some(mut filename) = q.filename else {
        return Err(ApiError::not_found());
    };
    if filename.is_empty() {
        return Err(ApiError::Empty(StatusCode::BAD_REQUEST));
    }
    let mut kind = q.kind.unwrap_or_else(|| "output".into());
    // "name.png [output]" overrides type, as in ComfyUI's annotated names.
    for tag in ["output", "input", "temp"] {
        if let Some(stripped) = filename.strip_suffix(&format!(" [{tag}]")) {
            filename = stripped.to_string();
            kind = tag.to_string();
        }
    }
    if filename.starts_with('/') || filename.contains("..") {
        return Err(ApiError::Empty(StatusCode::BAD_REQUEST));
    }
    let dirs = state.user_dirs(&who.name);
    let base = type_dir(&dirs, &kind).ok_or(ApiError::Empty(StatusCode::BAD_REQUEST))?;
    let base_name = FsPath::new(&filename)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let subfolder = q.subfolder.as_deref().unwrap_or("");
    let open = || async {
        fsx::open_within(&base, subfolder, &filename)
            .await
            .map_err(|e| match e {
                fsx::OpenError::Subfolder(e) => ApiError::path(e, ApiError::forbidden()),
                // A backslash or NUL in the name: a malformed request.
                fsx::OpenError::Name(PathError::Invalid) => {
                    ApiError::Empty(StatusCode::BAD_REQUEST)
                }
                // Through a link out of the participant's folder.
                fsx::OpenError::Name(PathError::Traversal) => ApiError::forbidden(),
                fsx::OpenError::Name(limit) => {
                    ApiError::path(limit, ApiError::Empty(StatusCode::BAD_REQUEST))
                }
                fsx::OpenError::Io(e) => ApiError::Io(e),
            })
    };
    let file = match open().await? {
        Some(file) => file,
        None => {
            // A result its owner was just told about may still be on its way from the GPU
            // server (see comfyume_comfyui::outputs::reserve): served once it is complete.
            let path = base.join(subfolder).join(&filename);
            comfyume_comfyui::outputs::wait_pending(&path, PENDING_OUTPUT_WAIT).await;
            // Looked for again whatever the wait said: the copy may have landed between the
            // first look and the wait.
            open().await?.ok_or_else(ApiError::not_found)?
        }
    };

    if let Some(preview) = q.preview.as_deref() {
        let (fmt, quality) = preview.split_once(';').unwrap_or((preview, "90"));
        let quality: u8 = quality.parse().unwrap_or(90).clamp(1, 100);
        if let Some((ct, bytes)) =
            convert(&file.path, Conversion::Preview(fmt.to_string(), quality)).await
        {
            return Ok(image_response(ct, bytes, &base_name));
        }
    }
    if let Some(channel) = q.channel.as_deref().filter(|c| *c == "rgb" || *c == "a") {
        let conv = if channel == "rgb" {
            Conversion::Rgb
        } else {
            Conversion::Alpha
        };
        if let Some((ct, bytes)) = convert(&file.path, conv).await {
            return Ok(image_response(ct, bytes, &base_name));
        }
    }
    // Inline only as the media type its bytes are, whatever it is called.
    let media = sniff::media_type(file.head(), &base_name);
    // The plain file; Range requests (video scrubbing) go to tower-http.
    let mut resp = fsx::send(file, req).await;
    headers::participant_file(resp.headers_mut(), media, &base_name);
    Ok(resp)
}

enum Conversion {
    Preview(String, u8),
    Rgb,
    Alpha,
}

async fn convert(path: &FsPath, conv: Conversion) -> Option<(&'static str, Vec<u8>)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let img = image::open(&path).ok()?;
        let mut buf = Cursor::new(Vec::new());
        let ct = match conv {
            Conversion::Preview(fmt, quality) if fmt == "jpeg" => {
                let rgb = img.to_rgb8();
                let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality);
                rgb.write_with_encoder(enc).ok()?;
                "image/jpeg"
            }
            Conversion::Preview(_, _) => {
                // The image crate's WebP encoder is lossless; quality is ignored.
                img.to_rgba8()
                    .write_to(&mut buf, image::ImageFormat::WebP)
                    .ok()?;
                "image/webp"
            }
            Conversion::Rgb => {
                img.to_rgb8()
                    .write_to(&mut buf, image::ImageFormat::Png)
                    .ok()?;
                "image/png"
            }
            Conversion::Alpha => {
                let rgba = img.to_rgba8();
                let mut out = image::RgbaImage::new(rgba.width(), rgba.height());
                for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
                    o.0 = [0, 0, 0, p.0[3]];
                }
                out.write_to(&mut buf, image::ImageFormat::Png).ok()?;
                "image/png"
            }
        };
        Some((ct, buf.into_inner()))
    })
    .await
    .ok()
    .flatten()
}

fn image_response(ct: &'static str, bytes: Vec<u8>, name: &str) -> Response {
    let mut resp = bytes.into_response();
    headers::participant_file(resp.headers_mut(), Some(ct), name);
    resp
}

/// The participant's input files by kind, for their view of `object_info`.
pub async fn user_files(state: &AppState, user: &str) -> comfyume_wire::object_info::UserFiles {
    let dirs = state.user_dirs(user);
    let all: Vec<String> = list_files(&dirs.inputs)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let by_ext = |exts: &[&str]| -> Vec<String> {
        all.iter()
            .filter(|n| {
                let l = n.to_ascii_lowercase();
                exts.iter().any(|e| l.ends_with(e))
            })
            .cloned()
            .collect()
    };
    // A result reused as an input (`x.png [output]`) names one of these.
    let outputs = list_files(&dirs.outputs)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    comfyume_wire::object_info::UserFiles {
        outputs,
        images: by_ext(&[
            ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff",
        ]),
        videos: by_ext(&[".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".webp"]),
        audio: by_ext(&[".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus"]),
        all,
    }
}
