//! The Templates browser: `/templates/*` as the `comfyui-workflow-templates` package serves it
//! to the frontend (`index.json`: a list of categories, each `{moduleName, title, type,
//! templates: [{name, title, description, mediaType, mediaSubtype}]}`; the workflow at
//! `{name}.json`, its thumbnail at `{name}-1.{mediaSubtype}`).
//!
//! The workshop's templates come first, as their own category: the five built into the
//! binary, then the workflow files the instructor drops in `<data>/workshop-templates/`
//! (read at every request: no rebuild, no restart). A dropped file with the name of a
//! built-in one replaces it. Each gets a title, a description (the workflow's
//! `extra.description`, if any) and a thumbnail: an image file of the same name beside it
//! (`.webp`, `.png`, `.jpg`), else a title card drawn here. The official package's
//! templates (`COMFYUME_TEMPLATES_DIR`) follow.
//!
//! Workshop files are found by name in the listing, never by joining a request path, so
//! no request reaches any other file; the official folder is read through
//! [`crate::paths::resolve_within`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::state::AppState;

/// The folder under the data directory the instructor drops workflow files in.
pub const DROP_DIR: &str = "workshop-templates";
/// The workshop category's title in the browser (and its nav entry).
pub const CATEGORY: &str = "Workshop";
/// Larger dropped files are not templates (and are not read).
const MAX_TEMPLATE_BYTES: u64 = 16 * 1024 * 1024;
/// Thumbnail image files beside a dropped workflow, in order of preference.
const THUMB_EXTS: &[&str] = &["webp", "png", "jpg", "jpeg"];
/// Generated thumbnails: square, like the official ones.
const THUMB_SIZE: u32 = 320;

/// Where a template's workflow is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workflow {
    Builtin(&'static str),
    File(PathBuf),
}

/// One workshop template as the browser lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// Its id in URLs (`{name}.json`, `{name}-1.png`) and the name the opened workflow gets.
    pub name: String,
    pub title: String,
    pub description: String,
    pub workflow: Workflow,
    /// An image file beside a dropped workflow; `None`: a generated card.
    pub thumbnail: Option<PathBuf>,
}

impl Template {
    /// The thumbnail's file type (`mediaSubtype`).
    pub fn media_subtype(&self) -> String {
        match &self.thumbnail {
            Some(p) => p
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_else(|| "png".into()),
            None => "png".into(),
        }
    }

    fn index_entry(&self) -> Value {
        json!({
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "mediaType": "image",
            "mediaSubtype": self.media_subtype(),
            "tags": [CATEGORY],
        })
    }
}

/// A template name usable in the frontend's URLs (`/templates/{name}.json`, which it does
/// not escape): `#`, `?`, `%`, slashes and control characters become `_`.
pub fn url_name(stem: &str) -> String {
    let s: String = stem
        .chars()
        .map(|c| match c {
            '#' | '?' | '%' | '/' | '\\' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() { "_".into() } else { s }
}

/// The description a dropped workflow carries (`extra.description`, or
/// `extra.comfyume.description`).
fn description_of(workflow: &Value) -> Option<String> {
    let extra = workflow.get("extra")?;
    extra
        .get("description")
        .or_else(|| extra.get("comfyume").and_then(|c| c.get("description")))
        .and_then(Value::as_str)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Whether `v` is a workflow the frontend can open (its UI format: nodes and links).
fn is_ui_workflow(v: &Value) -> bool {
    v.get("nodes").is_some_and(Value::is_array)
}

/// The workshop's templates: the built-in ones, then the dropped files (by file name).
/// Blocking: it reads the drop folder.
pub fn list_blocking(data_dir: &Path) -> Vec<Template> {
    let mut out: Vec<Template> = comfyume_templates::all()
        .iter()
        .map(|t| Template {
            name: url_name(t.name()),
            title: t.name().to_string(),
            description: t.description.to_string(),
            workflow: Workflow::Builtin(t.json),
            thumbnail: None,
        })
        .collect();
    let dir = data_dir.join(DROP_DIR);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut files: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".json")?.to_string();
            // Regular files only: never through a link, never a half-copied dot file.
            let md = e.path().symlink_metadata().ok()?;
            (!name.starts_with('.') && md.is_file() && md.len() <= MAX_TEMPLATE_BYTES)
                .then(|| (stem, e.path()))
        })
        .collect();
    files.sort();
    for (stem, path) in files {
        let workflow: Value = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) if is_ui_workflow(&v) => v,
            Ok(_) => {
                tracing::warn!(file = %path.display(), "not a workflow (no \"nodes\"); not listed as a template");
                continue;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable workflow; not listed as a template");
                continue;
            }
        };
        let thumbnail = THUMB_EXTS.iter().find_map(|ext| {
            let p = dir.join(format!("{stem}.{ext}"));
            p.symlink_metadata().is_ok_and(|m| m.is_file()).then_some(p)
        });
        let t = Template {
            name: url_name(&stem),
            title: stem.clone(),
            description: description_of(&workflow)
                .unwrap_or_else(|| "A workflow of this workshop.".to_string()),
            workflow: Workflow::File(path),
            thumbnail,
        };
        match out.iter_mut().find(|o| o.name == t.name) {
            Some(same) => *same = t,
            None => out.push(t),
        }
    }
    out
}

async fn list(state: &AppState) -> Vec<Template> {
    let dir = state.settings.data_dir.clone();
    crate::fsx::blocking(move || Ok(list_blocking(&dir)))
        .await
        .unwrap_or_default()
}

/// The workshop category of `index.json`.
pub fn category(templates: &[Template]) -> Value {
    json!({
        "moduleName": "default",
        "title": CATEGORY,
        "type": "image",
        // Listed under "Getting started" in the browser's navigation, first.
        "isEssential": true,
        "icon": "icon-[lucide--graduation-cap]",
        "templates": templates.iter().map(Template::index_entry).collect::<Vec<_>>(),
    })
}

/// What a request under `/templates/` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want<'a> {
    /// `index.json`, or `index.{locale}.json`.
    Index(Option<&'a str>),
    FuseOptions,
    /// `{name}.json`
    Workflow(&'a str),
    /// `{name}-{n}.{ext}`
    Thumbnail(&'a str),
    Other,
}

fn parse(rest: &str) -> Want<'_> {
    if rest == "index.json" {
        return Want::Index(None);
    }
    if let Some(loc) = rest
        .strip_prefix("index.")
        .and_then(|r| r.strip_suffix(".json"))
        .filter(|l| {
            !l.is_empty()
                && l.len() <= 16
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
    {
        return Want::Index(Some(loc));
    }
    if rest == "fuse_options.json" {
        return Want::FuseOptions;
    }
    if let Some(name) = rest.strip_suffix(".json") {
        return Want::Workflow(name);
    }
    if let Some((stem, ext)) = rest.rsplit_once('.')
        && THUMB_EXTS.contains(&ext.to_ascii_lowercase().as_str())
        && let Some((name, n)) = stem.rsplit_once('-')
        && !n.is_empty()
        && n.chars().all(|c| c.is_ascii_digit())
    {
        return Want::Thumbnail(name);
    }
    Want::Other
}

fn json_response(v: &Value) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        v.to_string(),
    )
        .into_response()
}

/// The search settings the frontend asks for (the package's own, when it has none).
const FUSE_OPTIONS: &str = r#"{"keys":[{"name":"name","weight":0.3},{"name":"title","weight":0.3},{"name":"description","weight":0.1}],"threshold":0.4}"#;

/// `GET /templates/{*rest}`.
pub async fn serve(
    State(state): State<AppState>,
    UrlPath(rest): UrlPath<String>,
    req: Request,
) -> Response {
    let official = state.settings.templates_dir.clone();
    match parse(&rest) {
        Want::Index(locale) => {
            let mut index = vec![category(&list(&state).await)];
            if let Some(dir) = &official {
                index.extend(official_index(dir, locale).await);
            }
            json_response(&Value::Array(index))
        }
        Want::FuseOptions => match official_file(official.as_deref(), &rest, req).await {
            Some(r) => r,
            None => (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                FUSE_OPTIONS,
            )
                .into_response(),
        },
        Want::Workflow(name) => {
            let found = list(&state).await.into_iter().find(|t| t.name == name);
            match found {
                Some(t) => workflow_response(&t).await,
                None => or_not_found(official_file(official.as_deref(), &rest, req).await),
            }
        }
        Want::Thumbnail(name) => {
            let found = list(&state).await.into_iter().find(|t| t.name == name);
            match found {
                Some(t) => thumbnail_response(&t, req).await,
                None => or_not_found(official_file(official.as_deref(), &rest, req).await),
            }
        }
        Want::Other => or_not_found(official_file(official.as_deref(), &rest, req).await),
    }
}

fn or_not_found(r: Option<Response>) -> Response {
    r.unwrap_or_else(|| StatusCode::NOT_FOUND.into_response())
}

async fn workflow_response(t: &Template) -> Response {
    match &t.workflow {
        Workflow::Builtin(json) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *json,
        )
            .into_response(),
        Workflow::File(path) => match tokio::fs::read(path).await {
            Ok(bytes) => (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                bytes,
            )
                .into_response(),
            // Removed since it was listed.
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        },
    }
}

async fn thumbnail_response(t: &Template, req: Request) -> Response {
    if let Some(path) = &t.thumbnail {
        let mut resp = match tower_http::services::ServeFile::new(path)
            .oneshot(req)
            .await
        {
            Ok(r) => r.map(Body::new),
            Err(e) => match e {},
        };
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return resp;
    }
    let png = generated_thumbnail(&t.title).await;
    (
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        png,
    )
        .into_response()
}

/// Title cards already drawn, by title (a few per workshop).
fn thumbnail_cache() -> &'static Mutex<HashMap<String, Bytes>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Bytes>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// A title card for `title`: "Flux.2 Klein 4B - text to image" reads FLUX.2 KLEIN 4B large,
/// TEXT TO IMAGE below; the colours follow the title, so each template has its own.
pub async fn generated_thumbnail(title: &str) -> Bytes {
    if let Some(b) = thumbnail_cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(title)
    {
        return b.clone();
    }
    let (big, rest) = match title.split_once(" - ") {
        // "text to video (distilled)": the parenthesis on a line of its own, whole.
        Some((a, b)) => match b.split_once(" (") {
            Some((b1, b2)) => (a.to_string(), vec![b1.to_string(), format!("({b2}")]),
            None => (a.to_string(), vec![b.to_string()]),
        },
        None => (title.to_string(), Vec::new()),
    };
    let seed = title.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let png = tokio::task::spawn_blocking(move || {
        comfyume_sim::title_card_png(THUMB_SIZE, THUMB_SIZE, seed, &big, &rest)
    })
    .await
    .unwrap_or_default();
    let png = Bytes::from(png);
    let mut cache = thumbnail_cache().lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= 256 {
        cache.clear();
    }
    cache.insert(title.to_string(), png.clone());
    png
}

/// The official package's categories: its `index.{locale}.json` when it has one, else its
/// `index.json`; none when it has neither or it is not a list.
async fn official_index(dir: &Path, locale: Option<&str>) -> Vec<Value> {
    let mut names = Vec::new();
    if let Some(l) = locale {
        names.push(format!("index.{l}.json"));
    }
    names.push("index.json".into());
    for name in names {
        let Ok(bytes) = tokio::fs::read(dir.join(&name)).await else {
            continue;
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(cats)) => return cats,
            _ => {
                tracing::warn!(file = %dir.join(&name).display(), "the official template index is not a JSON list; leaving it out");
                return Vec::new();
            }
        }
    }
    Vec::new()
}

/// A file of the official package's folder (`COMFYUME_TEMPLATES_DIR`), if configured and
/// there; never outside it.
async fn official_file(dir: Option<&Path>, rest: &str, req: Request) -> Option<Response> {
    let dir = dir?;
    let path = crate::paths::resolve_within(dir, rest).await.ok()?;
    if crate::fsx::kind(&path).await != crate::fsx::Kind::File {
        return None;
    }
    let mut resp = match tower_http::services::ServeFile::new(&path)
        .oneshot(req)
        .await
    {
        Ok(r) => r.map(Body::new),
        Err(e) => match e {},
    };
    if rest.ends_with(".json") {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_apart() {
        assert_eq!(parse("index.json"), Want::Index(None));
        assert_eq!(parse("index.fr.json"), Want::Index(Some("fr")));
        assert_eq!(parse("index.zh-TW.json"), Want::Index(Some("zh-TW")));
        assert_eq!(parse("fuse_options.json"), Want::FuseOptions);
        assert_eq!(
            parse("Flux.2 Klein 4B - text to image.json"),
            Want::Workflow("Flux.2 Klein 4B - text to image")
        );
        assert_eq!(
            parse("Flux.2 Klein 4B - text to image-1.png"),
            Want::Thumbnail("Flux.2 Klein 4B - text to image")
        );
        assert_eq!(parse("default-2.webp"), Want::Thumbnail("default"));
        assert_eq!(parse("a-x.webp"), Want::Other);
        assert_eq!(parse("sub/thing.mp3"), Want::Other);
        assert_eq!(parse("index.../x.json"), Want::Workflow("index.../x"));
    }

    #[test]
    fn names_are_safe_in_the_frontend_urls() {
        assert_eq!(
            url_name("Flux.2 Klein 4B - text to image"),
            "Flux.2 Klein 4B - text to image"
        );
        assert_eq!(url_name("50% off #1?"), "50_ off _1_");
        assert_eq!(url_name("..hidden"), "hidden");
        assert_eq!(url_name(""), "_");
    }

    #[test]
    fn dropped_files_are_listed_after_the_built_in_ones() {
        let dir = tempfile::tempdir().unwrap();
        let drop = dir.path().join(DROP_DIR);
        std::fs::create_dir_all(&drop).unwrap();
        let wf = |desc: &str| {
            json!({"nodes": [], "links": [], "extra": {"description": desc}}).to_string()
        };
        std::fs::write(drop.join("B day two.json"), wf("Second day")).unwrap();
        std::fs::write(drop.join("A day one.json"), wf("First day")).unwrap();
        std::fs::write(drop.join("A day one.webp"), b"RIFF").unwrap();
        std::fs::write(drop.join("broken.json"), "{not json").unwrap();
        std::fs::write(
            drop.join("api-format.json"),
            r#"{"1": {"class_type": "X"}}"#,
        )
        .unwrap();
        std::fs::write(drop.join(".partial.json"), wf("x")).unwrap();
        std::fs::write(drop.join("notes.txt"), "x").unwrap();
        // Replaces the built-in template of the same name, in its place.
        std::fs::write(drop.join("Start here - empty canvas.json"), wf("Ours")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", drop.join("link.json")).unwrap();
        let l = list_blocking(dir.path());
        let names: Vec<&str> = l.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Start here - empty canvas",
                "Flux.2 Klein 9B - text to image",
                "Flux.2 Klein 4B - text to image",
                "LTX-2 - text to video",
                "LTX-2 - text to video (distilled)",
                "A day one",
                "B day two"
            ]
        );
        assert_eq!(l[0].description, "Ours");
        assert!(matches!(l[0].workflow, Workflow::File(_)));
        assert_eq!(l[5].description, "First day");
        assert_eq!(l[5].media_subtype(), "webp");
        assert_eq!(l[6].media_subtype(), "png");
        assert!(l[1].description.contains("9B"));
        let cat = category(&l);
        assert_eq!(cat["title"], CATEGORY);
        assert_eq!(cat["templates"][5]["mediaSubtype"], "webp");
        assert_eq!(
            cat["templates"][2]["title"],
            "Flux.2 Klein 4B - text to image"
        );
    }

    #[tokio::test]
    async fn title_cards_are_pngs_of_their_own() {
        let a = generated_thumbnail("Flux.2 Klein 4B - text to image").await;
        let b = generated_thumbnail("LTX-2 - text to video").await;
        assert!(a.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_ne!(a, b);
        let img = image::load_from_memory(&a).unwrap();
        assert_eq!((img.width(), img.height()), (THUMB_SIZE, THUMB_SIZE));
    }
}
