//! HTTP routes, each under `/X` and `/api/X` like ComfyUI's `add_routes()`, plus `/sim/*`.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{
    DefaultBodyLimit, Multipart, Path as UrlPath, Query, RawQuery, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use comfyume_wire::shapes::jobs::{
    JobSource, JobsQuery, QueuedJob, job_detail, job_entry, job_not_found,
};
use comfyume_wire::shapes::queue::HistoryRecord;
use comfyume_wire::shapes::{
    history_window, prompt_accepted, prompt_info, queue_response, to_python_json,
};
use comfyume_wire::{PromptError, py_str, truthy, uses_server_counter};

use crate::config::Fault;
use crate::state::{QueueItem, Shared, lock, now_ms};

type S = State<Arc<Shared>>;

/// aiohttp's answer to an unhandled exception.
const SERVER_TROUBLE: &str = "500 Internal Server Error\n\nServer got itself in trouble";

pub fn router(shared: Arc<Shared>, base_path: Option<String>) -> Router {
    let limit = usize::try_from(shared.max_upload_size).unwrap_or(usize::MAX);
    let routes = Router::new()
        .merge(api_routes())
        .nest("/api", api_routes())
        .merge(sim_routes());
    let front_end_root = shared.front_end_root.clone();
    let app = crate::frontend::static_routes(routes, front_end_root.clone())
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared);
    match base_path {
        Some(base) => under_base_path(app, base.into(), front_end_root),
        None => app,
    }
}

/// Every route under a path prefix: the prefix is stripped before routing, and a request
/// outside it gets a bare 404, as for a route that does not exist. Only the frontend's own
/// static files (public package files) are also served outside it: the frontend asks for a
/// few by absolute path (`/assets/images/favicon_progress_16x16/...`).
fn under_base_path(app: Router, base: Arc<str>, front_end_root: Option<PathBuf>) -> Router {
    // The outer router has no routes: its fallback (the real router) runs after the
    // middleware, so the stripped URI is what gets routed.
    Router::new()
        .fallback_service(app)
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            strip_base_path(base.clone(), front_end_root.clone(), req, next)
        }))
}

async fn strip_base_path(
    base: Arc<str>,
    front_end_root: Option<PathBuf>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let rest = match path.strip_prefix(&*base) {
        // `/token` alone: a browser needs the slash for the frontend's relative URLs.
        Some("") => {
            let query = req
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            return (
                StatusCode::PERMANENT_REDIRECT,
                [(header::LOCATION, format!("{base}/{query}"))],
            )
                .into_response();
        }
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        _ => {
            return match front_end_root {
                Some(root) if req.method() == Method::GET && path != "/" => {
                    crate::frontend::static_file(root, req).await
                }
                _ => empty(StatusCode::NOT_FOUND),
            };
        }
    };
    let mut parts = req.uri().clone().into_parts();
    let pq = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    };
    parts.path_and_query = pq.parse().ok();
    match axum::http::Uri::from_parts(parts) {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return empty(StatusCode::BAD_REQUEST),
    }
    next.run(req).await
}

/// Only the `/sim/*` control routes (for a separate control listener).
pub fn control_router(shared: Arc<Shared>) -> Router {
    sim_routes().with_state(shared)
}

fn sim_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/sim/fault", post(sim_fault))
        .route("/sim/state", get(sim_state))
}

fn api_routes() -> Router<Arc<Shared>> {
    Router::new()
        .merge(crate::frontend::api_routes())
        .route("/ws", get(crate::ws::handler))
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/free", post(post_free))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{id}", get(get_history_id))
        // Declared with their prefix in ComfyUI: so also under `/api/api/jobs`.
        .route("/api/jobs", get(get_jobs))
        .route("/api/jobs/{id}", get(get_job))
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_one))
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route(
            "/embeddings",
            get(|| async { json_response(StatusCode::OK, &json!([])) }),
        )
}

pub fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        to_python_json(v),
    )
        .into_response()
}

fn json_text(text: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        text,
    )
        .into_response()
}

fn empty(status: StatusCode) -> Response {
    status.into_response()
}

fn trouble() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        SERVER_TROUBLE,
    )
        .into_response()
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `host[:port]` of a Host header, split like `urlsplit('//' + host)`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Middlewares in ComfyUI's spirit: the `hang` fault, the origin check (403 when Host is a
/// loopback name and Origin names another host) and the bare 200 for OPTIONS.
async fn guard(State(shared): S, req: Request, next: Next) -> Response {
    let is_control = req.uri().path().starts_with("/sim/");
    if !is_control {
        shared.wait_not_hung().await;
    }
    let headers = req.headers();
    if let (Some(host), Some(origin)) = (
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
        headers.get(header::ORIGIN).and_then(|h| h.to_str().ok()),
    ) {
        let host = host.to_ascii_lowercase();
        let origin_netloc = origin
            .split_once("://")
            .map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""))
            .to_ascii_lowercase();
        if is_loopback(host_name(&host)) && host != origin_netloc {
            tracing::warn!(%host, origin = %origin_netloc, "request with non matching host and origin, returning 403");
            return empty(StatusCode::FORBIDDEN);
        }
    }
    if req.method() == Method::OPTIONS {
        return empty(StatusCode::OK);
    }
    next.run(req).await
}

// ---- /prompt ---------------------------------------------------------------------------

async fn get_prompt(State(shared): S) -> Response {
    let remaining = lock(&shared.inner).queue_remaining();
    json_response(StatusCode::OK, &prompt_info(remaining as u64))
}

/// Validation errors for inputs where ComfyUI 0.11.0 itself crashes with a 500 (wire answers
/// those with a ComfyUI-shaped 400; the simulator stays byte-faithful to the server).
fn comfyui_crashes_on(e: &PromptError) -> bool {
    e.error_type() == "invalid_prompt"
        && matches!(
            e.message(),
            "Invalid prompt number"
                | "Invalid extra_data"
                | "Cannot execute because the prompt is not an object of node id to node."
        )
}

async fn post_prompt(State(shared): S, body: Bytes) -> Response {
    lock(&shared.stats).prompts_received += 1;
    if shared.faults.borrow().prompt_error {
        return trouble();
    }
    // ComfyUI calls `json_data.get(...)`: anything but an object is an unhandled exception.
    let Ok(body @ Value::Object(_)) = serde_json::from_slice::<Value>(&body) else {
        return trouble();
    };

    // The number is taken (and the counter advanced) before validation, so rejected prompts
    // use up numbers too.
    let counter = uses_server_counter(&body).then(|| {
        let mut inner = lock(&shared.inner);
        inner.counter += 1;
        inner.counter - 1
    });
    let mut valid = match shared.catalog.validate(&body, shared.dirs.input_files()) {
        Ok(v) => v,
        Err(e) if comfyui_crashes_on(&e) => return trouble(),
        Err(e) => {
            lock(&shared.stats).prompts_rejected += 1;
            tracing::info!(error = %e, "invalid prompt");
            return json_response(StatusCode::BAD_REQUEST, &e.body());
        }
    };
    let number = valid.priority(counter.unwrap_or(0));
    let prompt_id = valid
        .prompt_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    valid.stamp_create_time(now_ms());
    let Value::Object(prompt) = std::mem::take(&mut valid.prompt) else {
        // Only an object of nodes passes validation.
        return trouble();
    };
    {
        let mut inner = lock(&shared.inner);
        inner.seq += 1;
        let seq = inner.seq;
        inner.pending.push(QueueItem {
            sort_key: number.as_f64().unwrap_or(0.0),
            number: number.clone(),
            seq,
            prompt_id: prompt_id.clone(),
            prompt,
            extra_data: std::mem::take(&mut valid.extra_data),
            outputs: std::mem::take(&mut valid.outputs_to_execute),
        });
        shared.broadcast_status(&inner);
    }
    lock(&shared.stats).prompts_accepted += 1;
    shared.work.notify_one();
    tracing::info!(%prompt_id, "prompt queued");
    json_response(
        StatusCode::OK,
        &prompt_accepted(&prompt_id, &number, &valid.node_errors),
    )
}

// ---- queue, interrupt, free ------------------------------------------------------------

async fn get_queue(State(shared): S) -> Response {
    let inner = lock(&shared.inner);
    let running: Vec<Value> = inner.running.iter().map(QueueItem::to_json).collect();
    let mut pending: Vec<&QueueItem> = inner.pending.iter().collect();
    pending.sort_by(|a, b| a.sort_key.total_cmp(&b.sort_key).then(a.seq.cmp(&b.seq)));
    let pending: Vec<Value> = pending.into_iter().map(QueueItem::to_json).collect();
    json_response(StatusCode::OK, &queue_response(running, pending))
}

fn parse_body(body: &Bytes) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

async fn post_queue(State(shared): S, body: Bytes) -> Response {
    let Some(data) = parse_body(&body) else {
        return trouble();
    };
    let mut inner = lock(&shared.inner);
    if data.get("clear").is_some_and(truthy) {
        inner.pending.clear();
        shared.broadcast_status(&inner);
    }
    if let Some(ids) = data.get("delete").and_then(Value::as_array) {
        for id in ids {
            let id = py_str(id);
            if let Some(pos) = inner.pending.iter().position(|i| i.prompt_id == id) {
                inner.pending.remove(pos);
                shared.broadcast_status(&inner);
            }
        }
    }
    empty(StatusCode::OK)
}

async fn post_interrupt(State(shared): S, body: Bytes) -> Response {
    let target = parse_body(&body)
        .and_then(|v| v.get("prompt_id").cloned())
        .filter(truthy);
    match target {
        Some(id) => {
            let id = py_str(&id);
            let running = lock(&shared.inner)
                .running
                .as_ref()
                .is_some_and(|r| r.prompt_id == id);
            if running {
                tracing::info!(prompt_id = %id, "interrupting prompt");
                shared
                    .interrupt
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            } else {
                tracing::info!(prompt_id = %id, "prompt is not currently running, skipping interrupt");
            }
        }
        None => {
            tracing::info!("global interrupt");
            shared
                .interrupt
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    empty(StatusCode::OK)
}

async fn post_free(body: Bytes) -> Response {
    // The worker would unload models / free memory; the simulator has none.
    if !body.is_empty() && parse_body(&body).is_none() {
        return trouble();
    }
    empty(StatusCode::OK)
}

// ---- history ---------------------------------------------------------------------------

async fn get_history(State(shared): S, Query(q): Query<HashMap<String, String>>) -> Response {
    let parse = |k: &str| -> Result<Option<i64>, ()> {
        q.get(k)
            .map(|v| v.trim().parse::<i64>().map_err(|_| ()))
            .transpose()
    };
    let (Ok(max_items), Ok(offset)) = (parse("max_items"), parse("offset")) else {
        return trouble();
    };
    // A negative max_items yields what 0 does in ComfyUI's loop (nothing, or one item
    // after an explicit offset).
    let max_items = max_items.map(|m| usize::try_from(m).unwrap_or(0));
    let inner = lock(&shared.inner);
    let window = history_window(inner.history.len(), max_items, offset);
    let out: Map<String, Value> = inner
        .history
        .iter()
        .skip(window.start)
        .take(window.len())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    json_response(StatusCode::OK, &Value::Object(out))
}

async fn get_history_id(State(shared): S, UrlPath(id): UrlPath<String>) -> Response {
    let inner = lock(&shared.inner);
    let mut out = Map::new();
    if let Some(v) = inner.history.get(&id) {
        out.insert(id, v.clone());
    }
    json_response(StatusCode::OK, &Value::Object(out))
}

/// The queue and the history as the jobs API sees them: running, pending, then history.
fn job_views(inner: &crate::state::Inner, detail: bool, only: Option<&str>) -> Vec<Value> {
    let render = |src: &JobSource<'_>| {
        if detail {
            job_detail(src)
        } else {
            job_entry(src)
        }
    };
    let wanted = |id: &str| only.is_none_or(|o| o == id);
    let mut out = Vec::new();
    let queued = |item: &QueueItem, running: bool| {
        let extra = Value::Object(item.extra_data.clone());
        let q = QueuedJob {
            number: &item.number,
            prompt_id: &item.prompt_id,
            extra_data: &extra,
        };
        render(&if running {
            JobSource::InProgress(q)
        } else {
            JobSource::Pending(q)
        })
    };
    if let Some(item) = inner.running.as_ref().filter(|i| wanted(&i.prompt_id)) {
        out.push(queued(item, true));
    }
    for item in inner.pending.iter().filter(|i| wanted(&i.prompt_id)) {
        out.push(queued(item, false));
    }
    for (id, item) in inner.history.iter().filter(|(id, _)| wanted(id)) {
        if let Some(r) = HistoryRecord::from_item(id, item) {
            out.push(render(&JobSource::Finished(&r)));
        }
    }
    out
}

/// `GET /api/jobs`: filtered, sorted and paged as ComfyUI's jobs API does; bad
/// parameters get its 400 `{"error": ...}`.
async fn get_jobs(State(shared): S, RawQuery(raw): RawQuery) -> Response {
    let q = match JobsQuery::parse(raw.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return json_response(status, &e.body());
        }
    };
    let jobs = job_views(&lock(&shared.inner), false, None);
    json_response(StatusCode::OK, &q.apply(jobs))
}

/// `GET /api/jobs/{id}`: one job with its outputs, status and workflow; 404 when unknown.
async fn get_job(State(shared): S, UrlPath(id): UrlPath<String>) -> Response {
    let found = job_views(&lock(&shared.inner), true, Some(&id))
        .into_iter()
        .next();
    match found {
        Some(job) => json_response(StatusCode::OK, &job),
        None => json_response(StatusCode::NOT_FOUND, &job_not_found()),
    }
}

async fn post_history(State(shared): S, body: Bytes) -> Response {
    let Some(data) = parse_body(&body) else {
        return trouble();
    };
    let mut inner = lock(&shared.inner);
    if data.get("clear").is_some_and(truthy) {
        inner.history.clear();
    }
    if let Some(ids) = data.get("delete").and_then(Value::as_array) {
        for id in ids {
            inner.history.shift_remove(&py_str(id));
        }
    }
    empty(StatusCode::OK)
}

// ---- files -----------------------------------------------------------------------------

/// Join a relative path below `base`, refusing absolute paths and `..` that leave it.
pub fn safe_join(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = base.to_path_buf();
    let mut depth = 0usize;
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return None;
                }
                out.pop();
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn guess_mime(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "svg" => "image/svg+xml",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "wav" => "audio/x-wav",
        "json" => "application/json",
        "txt" => "text/plain",
        // ComfyUI forces html/js/css to download.
        _ => "application/octet-stream",
    }
}

fn file_response(content_type: &str, filename: &str, body: Vec<u8>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    (StatusCode::OK, headers, Body::from(body)).into_response()
}

async fn view(State(shared): S, Query(q): Query<HashMap<String, String>>) -> Response {
    let delay = shared.faults.borrow().slow_view_ms;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let Some(raw) = q.get("filename") else {
        return empty(StatusCode::NOT_FOUND);
    };
    let (name, annotated_dir) = shared.dirs.annotated(raw);
    if name.is_empty() {
        return empty(StatusCode::BAD_REQUEST);
    }
    if name.starts_with('/') || name.contains("..") {
        return empty(StatusCode::BAD_REQUEST);
    }
    let dir = match annotated_dir {
        Some(d) => d.to_path_buf(),
        None => match shared
            .dirs
            .by_type(q.get("type").map_or("output", String::as_str))
        {
            Some(d) => d.to_path_buf(),
            None => return empty(StatusCode::BAD_REQUEST),
        },
    };
    let dir = match q.get("subfolder") {
        Some(sub) => match safe_join(&dir, sub) {
            Some(d) => d,
            None => return empty(StatusCode::FORBIDDEN),
        },
        None => dir,
    };
    let filename = Path::new(name)
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let file = dir.join(&filename);
    let Ok(bytes) = tokio::fs::read(&file).await else {
        return empty(StatusCode::NOT_FOUND);
    };
    let channel = q.get("channel").map(String::as_str);
    if let Some(preview) = q.get("preview") {
        let Ok(img) = image::load_from_memory(&bytes) else {
            return trouble();
        };
        let parts: Vec<&str> = preview.split(';').collect();
        let mut format = parts.first().copied().unwrap_or("webp");
        if !matches!(format, "webp" | "jpeg") || channel.is_some_and(|c| c.contains('a')) {
            format = "webp";
        }
        let quality = parts
            .last()
            .and_then(|p| p.parse::<u8>().ok())
            .unwrap_or(90);
        let body = if format == "jpeg" {
            crate::imaging::jpeg(&img.to_rgb8(), quality)
        } else if channel == Some("rgb") {
            crate::imaging::webp_rgba(&image::DynamicImage::ImageRgb8(img.to_rgb8()).to_rgba8())
        } else {
            crate::imaging::webp_rgba(&img.to_rgba8())
        };
        return file_response(&format!("image/{format}"), &filename, body);
    }
    match channel.unwrap_or("rgba") {
        "rgb" => {
            let Ok(img) = image::load_from_memory(&bytes) else {
                return trouble();
            };
            file_response(
                "image/png",
                &filename,
                crate::imaging::png_rgb(&img.to_rgb8()),
            )
        }
        "a" => {
            let Ok(img) = image::load_from_memory(&bytes) else {
                return trouble();
            };
            let rgba = img.to_rgba8();
            let alpha = image::RgbaImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Rgba([0, 0, 0, rgba.get_pixel(x, y).0[3]])
            });
            file_response("image/png", &filename, crate::imaging::png_rgba(&alpha))
        }
        _ => file_response(guess_mime(&filename), &filename, bytes),
    }
}

async fn upload_image(State(shared): S, mut multipart: Multipart) -> Response {
    let mut image: Option<(String, Bytes)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_string();
                if name == "image" {
                    let filename = field.file_name().unwrap_or_default().to_string();
                    match field.bytes().await {
                        Ok(b) => image = Some((filename, b)),
                        Err(_) => return empty(StatusCode::BAD_REQUEST),
                    }
                } else if let Ok(text) = field.text().await {
                    fields.insert(name, text);
                }
            }
            Ok(None) => break,
            Err(e) => return (e.status(), e.body_text()).into_response(),
        }
    }
    let Some((filename, data)) = image else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if filename.is_empty() {
        return empty(StatusCode::BAD_REQUEST);
    }
    let upload_type = fields
        .get("type")
        .cloned()
        .unwrap_or_else(|| "input".into());
    let Some(base) = shared.dirs.by_type(&upload_type).map(Path::to_path_buf) else {
        // ComfyUI's get_dir_by_type leaves the directory unbound: an unhandled exception.
        return trouble();
    };
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let Some(folder) = safe_join(&base, &subfolder) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let Some(mut path) = safe_join(&folder, &filename) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if tokio::fs::create_dir_all(&folder).await.is_err() {
        return trouble();
    }
    let overwrite = fields
        .get("overwrite")
        .is_some_and(|o| o == "true" || o == "1");
    let mut name = filename.clone();
    let mut duplicate = false;
    if !overwrite {
        let (stem, ext) = match filename.rfind('.') {
            Some(i) if i > 0 => (&filename[..i], &filename[i..]),
            _ => (filename.as_str(), ""),
        };
        let digest = Sha256::digest(&data);
        let mut i = 1;
        while path.exists() {
            // Identical bytes under this name: hand the name back, write nothing.
            if tokio::fs::read(&path)
                .await
                .is_ok_and(|existing| Sha256::digest(&existing) == digest)
            {
                duplicate = true;
                break;
            }
            name = format!("{stem} ({i}){ext}");
            path = folder.join(&name);
            i += 1;
        }
    }
    if !duplicate && tokio::fs::write(&path, &data).await.is_err() {
        return trouble();
    }
    json_response(
        StatusCode::OK,
        &json!({"name": name, "subfolder": subfolder, "type": upload_type}),
    )
}

// ---- info ------------------------------------------------------------------------------

async fn object_info(State(shared): S) -> Response {
    let files = if shared.catalog.builtin {
        shared.dirs.input_files()
    } else {
        Vec::new()
    };
    json_text(shared.catalog.object_info_text(&files))
}

async fn object_info_one(State(shared): S, UrlPath(class): UrlPath<String>) -> Response {
    let files = if shared.catalog.builtin && class == "LoadImage" {
        shared.dirs.input_files()
    } else {
        Vec::new()
    };
    json_response(
        StatusCode::OK,
        &shared.catalog.object_info_one(&class, &files),
    )
}

fn meminfo() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (0, 0);
    };
    let field = |key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

async fn system_stats() -> Response {
    let (ram_total, ram_free) = meminfo();
    let argv: Vec<String> = std::env::args().collect();
    json_response(
        StatusCode::OK,
        &json!({
            "system": {
                "os": std::env::consts::OS,
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": "0.11.0",
                "required_frontend_version": "1.37.11",
                "installed_templates_version": "0.8.24",
                "required_templates_version": "0.8.24",
                "python_version": "none (comfyume-sim, a simulator written in Rust)",
                "pytorch_version": "none (simulated)",
                "embedded_python": false,
                "argv": argv,
            },
            "devices": [{
                "name": "comfyume-sim (simulated, no GPU)",
                "type": "cpu",
                "index": null,
                "vram_total": 0,
                "vram_free": 0,
                "torch_vram_total": 0,
                "torch_vram_free": 0,
            }],
        }),
    )
}

async fn features(State(shared): S) -> Response {
    json_response(
        StatusCode::OK,
        &crate::ws::server_features(shared.max_upload_size),
    )
}

// ---- /sim ------------------------------------------------------------------------------

async fn sim_fault(State(shared): S, body: Bytes) -> Response {
    match serde_json::from_slice::<Fault>(&body) {
        Ok(fault) => {
            shared.apply_fault(fault);
            json_response(StatusCode::OK, &json!(shared.state()))
        }
        Err(e) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("bad fault: {e}")}),
        ),
    }
}

async fn sim_state(State(shared): S) -> Response {
    json_response(StatusCode::OK, &json!(shared.state()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_join_refuses_escapes() {
        let base = Path::new("/data/input");
        assert_eq!(
            safe_join(base, "a/b.png"),
            Some(PathBuf::from("/data/input/a/b.png"))
        );
        assert_eq!(
            safe_join(base, "a/../b.png"),
            Some(PathBuf::from("/data/input/b.png"))
        );
        assert_eq!(safe_join(base, "../x"), None);
        assert_eq!(safe_join(base, "/etc/passwd"), None);
        assert_eq!(safe_join(base, ""), Some(PathBuf::from("/data/input")));
    }

    #[test]
    fn origin_helpers() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("::1"));
        assert!(!is_loopback("example.com"));
        assert_eq!(host_name("127.0.0.1:8188"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8188"), "::1");
    }

    #[test]
    fn crashes_where_comfyui_does() {
        let cat = crate::catalog::Catalog::builtin();
        let err = |body: Value| cat.validate(&body, vec![]).unwrap_err();
        let graph = json!({"1": {"class_type": "PreviewAny", "inputs": {"source": "x"}}});
        for body in [
            json!({"prompt": graph, "number": "abc"}),
            json!({"prompt": graph, "extra_data": [1]}),
            json!({"prompt": 5}),
            json!({"prompt": null}),
        ] {
            assert!(comfyui_crashes_on(&err(body.clone())), "{body}");
        }
        for body in [
            json!({}),
            json!({"prompt": []}),
            json!({"prompt": {"1": {"class_type": "Nope", "inputs": {}}}}),
        ] {
            assert!(!comfyui_crashes_on(&err(body.clone())), "{body}");
        }
    }
}
