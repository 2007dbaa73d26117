//! Thumbnails of participants' images for the Results view: at most 320 px, JPEG, made
//! once per file version and kept in a small cache (the page shows 24 at a time, the
//! originals can be megabytes each).

use std::collections::{HashMap, VecDeque};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use comfyume_gateway::AppState;
use comfyume_gateway::paths::resolve_within;
use serde::Deserialize;

use crate::{Admin, Instructor, bad, not_found};

const SIDE: u32 = 320;
const KEPT: usize = 256;

type Key = (PathBuf, SystemTime, u64);

#[derive(Default)]
pub struct Thumbs {
    cache: Mutex<(HashMap<Key, Bytes>, VecDeque<Key>)>,
}

impl Thumbs {
    fn get(&self, k: &Key) -> Option<Bytes> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(k)
            .cloned()
    }

    fn put(&self, k: Key, v: Bytes) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.0.insert(k.clone(), v).is_none() {
            c.1.push_back(k);
        }
        while c.1.len() > KEPT {
            if let Some(old) = c.1.pop_front() {
                c.0.remove(&old);
            }
        }
    }
}

#[derive(Deserialize)]
pub struct ThumbQuery {
    user: String,
    filename: String,
    #[serde(default)]
    subfolder: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// `GET /admin/api/thumb?user=&filename=&subfolder=&type=output`.
pub async fn thumb(
    State(state): State<AppState>,
    Extension(admin): Extension<Admin>,
    _: Instructor,
    Query(q): Query<ThumbQuery>,
) -> Response {
    if !comfyume_store::valid_user_name(&q.user) {
        return bad("no such participant");
    }
    if q.kind.as_deref().is_some_and(|k| k != "output") {
        return bad("thumbnails are of outputs only");
    }
    let base = state.user_dirs(&q.user).outputs;
    let Ok(folder) = resolve_within(&base, &q.subfolder).await else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let Ok(path) = resolve_within(&folder, &q.filename).await else {
        return StatusCode::FORBIDDEN.into_response();
    };
    let Ok(meta) = tokio::fs::metadata(&path).await else {
        return not_found("no such file");
    };
    if !meta.is_file() {
        return not_found("no such file");
    }
    let key: Key = (
        path.clone(),
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
    );
    let bytes = match admin.thumbs.get(&key) {
        Some(b) => b,
        None => {
            let made = tokio::task::spawn_blocking(move || -> Option<Vec<u8>> {
                let img = image::open(&path).ok()?;
                let small = img.thumbnail(SIDE, SIDE).to_rgb8();
                let mut buf = Cursor::new(Vec::new());
                let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 80);
                small.write_with_encoder(enc).ok()?;
                Some(buf.into_inner())
            })
            .await
            .ok()
            .flatten();
            let Some(made) = made else {
                return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not an image").into_response();
            };
            let b = Bytes::from(made);
            admin.thumbs.put(key, b.clone());
            b
        }
    };
    (
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        bytes,
    )
        .into_response()
}
