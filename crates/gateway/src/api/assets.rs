//! `/api/assets` and `/api/tags` (ComfyUI v0.11.0's asset API, `app/assets/api`) over the
//! participant's own files: their uploads (tag `input`) and results (tag `output`), never
//! anyone else's. Registered at the root only (ComfyUI adds them to the app directly, so
//! `/api/api/assets` is a 404), and under the participant's prefix.
//!
//! An asset's id is a UUID derived from its owner, kind and path: stable across requests and
//! restarts, and meaningless to anybody else (a look-up by id only ever searches the
//! caller's own files).

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::auth::Participant;
use crate::scope::Scope;
use crate::state::AppState;
use crate::{fsx, headers, sniff};

/// One of the participant's files as an asset.
#[derive(Debug, Clone, PartialEq)]
pub struct Asset {
    pub id: String,
    /// `input` or `output`.
    pub kind: &'static str,
    /// Relative to the participant's folder of that kind (`video/clip.mp4`).
    pub rel: String,
    pub name: String,
    pub size: u64,
    pub mime_type: Option<String>,
    pub created: f64,
    pub modified: f64,
}

/// The asset id of `user`'s `kind` file `rel`.
pub fn asset_id(user: &str, kind: &str, rel: &str) -> String {
    let d = Sha256::digest(format!("{user}\0{kind}\0{rel}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

/// Every input and output file of `user` (no folders, no hidden files, never through links).
pub async fn list_user_assets(state: &AppState, user: &str) -> Vec<Asset> {
    let dirs = state.user_dirs(user);
    let mut out = Vec::new();
    for (kind, dir) in [("input", &dirs.inputs), ("output", &dirs.outputs)] {
        for e in fsx::walk(dir, dir, true).await {
            if e.is_dir {
                continue;
            }
            out.push(Asset {
                id: asset_id(user, kind, &e.rel),
                kind,
                mime_type: mime_guess::from_path(&e.name)
                    .first()
                    .map(|m| m.to_string()),
                rel: e.rel,
                name: e.name,
                size: e.size,
                created: e.created,
                modified: e.modified,
            });
        }
    }
    out
}

/// RFC 3339, UTC (what `new Date()` reads exactly; ComfyUI prints its naive UTC times).
fn iso(secs: f64) -> String {
    let nanos = (secs * 1e9) as i128;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// `/api/view?...` for the file, under the participant's prefix when the request had one.
fn preview_url(a: &Asset, scope: Option<&Scope>) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let (sub, file) = match a.rel.rsplit_once('/') {
        Some((s, f)) => (s, f),
        None => ("", a.rel.as_str()),
    };
    let prefix = scope
        .and_then(|s| s.user.as_deref())
        .map(|u| format!("/{u}"))
        .unwrap_or_default();
    let mut url = format!("{prefix}/api/view?type={}&filename={}", a.kind, enc(file));
    if !sub.is_empty() {
        url.push_str(&format!("&subfolder={}", enc(sub)));
    }
    url
}

/// The asset in ComfyUI's shape (`schemas_out`).
fn asset_json(a: &Asset, scope: Option<&Scope>) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "asset_hash": null,
        "size": a.size,
        "mime_type": a.mime_type,
        "tags": [a.kind],
        "preview_url": preview_url(a, scope),
        "user_metadata": {"filename": a.rel},
        "created_at": iso(a.created),
        "updated_at": iso(a.modified),
        "last_access_time": iso(a.modified),
    })
}

/// ComfyUI's asset API error body.
fn error(status: StatusCode, code: &str, message: &str, details: Value) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message, "details": details}})),
    )
        .into_response()
}

fn invalid(field: &str, msg: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "INVALID_QUERY",
        "Validation failed.",
        json!({"errors": [{"loc": [field], "msg": msg, "type": "value_error"}]}),
    )
}

/// The query of `GET /api/assets`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    pub include_tags: Vec<String>,
    pub exclude_tags: Vec<String>,
    pub name_contains: Option<String>,
    pub metadata_filter: Map<String, Value>,
    pub limit: usize,
    pub offset: usize,
    pub sort: String,
    pub desc: bool,
}

/// Tags given as `a,b` or repeated, trimmed, lower-cased, each once.
fn tags(pairs: &[(String, String)], key: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, v) in pairs.iter().filter(|(k, _)| k == key) {
        for t in v.split(',') {
            let t = t.trim().to_lowercase();
            if !t.is_empty() && !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

fn last<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Parses `GET /api/assets`'s query as ComfyUI's `ListAssetsQuery` does (limit 1-500,
/// default 20; offset >= 0; sort by name, created_at (default), updated_at, size or
/// last_access_time; order asc or desc (default)); the field at fault otherwise.
pub fn parse_list_query(pairs: &[(String, String)]) -> Result<ListQuery, (String, String)> {
    let bad = |f: &str, m: &str| (f.to_string(), m.to_string());
    let int =
        |key: &str, default: usize, min: usize, max: usize| -> Result<usize, (String, String)> {
            match last(pairs, key) {
                None | Some("") => Ok(default),
                Some(v) => match v.trim().parse::<i64>() {
                    Ok(n) if n >= min as i64 && n <= max as i64 => Ok(n as usize),
                    Ok(_) => Err(bad(key, &format!("must be between {min} and {max}"))),
                    Err(_) => Err(bad(key, "must be an integer")),
                },
            }
        };
    let limit = int("limit", 20, 1, 500)?;
    let offset = int("offset", 0, 0, i64::MAX as usize)?;
    let sort = match last(pairs, "sort").unwrap_or("created_at") {
        s @ ("name" | "created_at" | "updated_at" | "size" | "last_access_time") => s.to_string(),
        _ => {
            return Err(bad(
                "sort",
                "must be one of name, created_at, updated_at, size, last_access_time",
            ));
        }
    };
    let desc = match last(pairs, "order").unwrap_or("desc") {
        "desc" => true,
        "asc" => false,
        _ => return Err(bad("order", "must be asc or desc")),
    };
    let metadata_filter = match last(pairs, "metadata_filter") {
        None | Some("") => Map::new(),
        Some(v) => match serde_json::from_str::<Value>(v) {
            Ok(Value::Object(m)) => m,
            _ => return Err(bad("metadata_filter", "must be a JSON object")),
        },
    };
    Ok(ListQuery {
        include_tags: tags(pairs, "include_tags"),
        exclude_tags: tags(pairs, "exclude_tags"),
        name_contains: last(pairs, "name_contains")
            .map(str::to_lowercase)
            .filter(|s| !s.is_empty()),
        metadata_filter,
        limit,
        offset,
        sort,
        desc,
    })
}

/// The page of `assets` the query asks for, and how many matched in all.
pub fn select(mut assets: Vec<Asset>, q: &ListQuery) -> (Vec<Asset>, usize) {
    assets.retain(|a| {
        q.include_tags.iter().all(|t| t == a.kind)
            && !q.exclude_tags.iter().any(|t| t == a.kind)
            && q.name_contains
                .as_ref()
                .is_none_or(|n| a.name.to_lowercase().contains(n))
            && q.metadata_filter.iter().all(|(k, v)| match k.as_str() {
                "filename" => v.as_str() == Some(a.rel.as_str()),
                _ => false,
            })
    });
    let key = |a: &Asset| -> (f64, String) {
        match q.sort.as_str() {
            "name" => (0.0, a.name.to_lowercase()),
            "size" => (a.size as f64, String::new()),
            "created_at" => (a.created, String::new()),
            _ => (a.modified, String::new()),
        }
    };
    assets.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.total_cmp(&kb.0)
            .then_with(|| ka.1.cmp(&kb.1))
            .then_with(|| a.rel.cmp(&b.rel))
            .then_with(|| a.kind.cmp(b.kind))
    });
    if q.desc {
        assets.reverse();
    }
    let total = assets.len();
    let page = assets.into_iter().skip(q.offset).take(q.limit).collect();
    (page, total)
}

/// `GET /api/assets`
pub async fn list(
    State(state): State<AppState>,
    who: Participant,
    scope: Option<axum::Extension<Scope>>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let q = match parse_list_query(&pairs) {
        Ok(q) => q,
        Err((field, msg)) => return invalid(&field, &msg),
    };
    let (page, total) = select(list_user_assets(&state, &who.name).await, &q);
    let scope = scope.as_ref().map(|s| &s.0);
    let has_more = q.offset + page.len() < total;
    Json(json!({
        "assets": page.iter().map(|a| asset_json(a, scope)).collect::<Vec<_>>(),
        "total": total,
        "has_more": has_more,
    }))
    .into_response()
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ASSET_NOT_FOUND",
        &format!("AssetInfo {id} not found"),
        json!({"id": id}),
    )
}

/// The caller's asset with this id (a canonical UUID), if any.
async fn find(state: &AppState, user: &str, id: &str) -> Option<Asset> {
    let id = uuid::Uuid::parse_str(id).ok()?.to_string();
    list_user_assets(state, user)
        .await
        .into_iter()
        .find(|a| a.id == id)
}

/// `GET /api/assets/{id}`: one of the caller's assets; anyone else's id is unknown.
pub async fn get_one(
    State(state): State<AppState>,
    who: Participant,
    scope: Option<axum::Extension<Scope>>,
    Path(id): Path<String>,
) -> Response {
    match find(&state, &who.name, &id).await {
        Some(a) => Json(asset_json(&a, scope.as_ref().map(|s| &s.0))).into_response(),
        None => not_found(&id),
    }
}

/// `GET /api/assets/{id}/content[?disposition=inline|attachment]`: the file, sent as the
/// media type its bytes are (else an opaque download), like `/view`.
pub async fn content(
    State(state): State<AppState>,
    who: Participant,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    req: Request,
) -> Response {
    let Some(a) = find(&state, &who.name, &id).await else {
        return not_found(&id);
    };
    let dirs = state.user_dirs(&who.name);
    let base = if a.kind == "input" {
        dirs.inputs
    } else {
        dirs.outputs
    };
    // Listed from this folder a moment ago; resolved again so a link put there since
    // cannot lead out.
    let Ok(Some(file)) = fsx::open_within(&base, "", &a.rel).await else {
        return not_found(&id);
    };
    let media = sniff::media_type(file.head(), &a.name);
    let mut resp = fsx::send(file, req).await;
    headers::participant_file(resp.headers_mut(), media, &a.name);
    if last(&pairs, "disposition") != Some("inline") {
        let name =
            percent_encoding::utf8_percent_encode(&a.name, percent_encoding::NON_ALPHANUMERIC);
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename*=UTF-8''{name}")) {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    resp
}

/// `GET /api/tags`: the tags of the caller's assets with their counts (ComfyUI's
/// `TagsList`: `prefix`, `limit` 1-1000 (100), `offset`, `order` count_desc or name_asc,
/// `include_zero`).
pub async fn tags_list(
    State(state): State<AppState>,
    who: Participant,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    // The field at fault, if any.
    let int = |key: &'static str, default: usize, max: usize| -> Result<usize, &'static str> {
        match last(&pairs, key) {
            None | Some("") => Ok(default),
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n <= max && (key != "limit" || n >= 1) => Ok(n),
                _ => Err(key),
            },
        }
    };
    let (limit, offset) = match (int("limit", 100, 1000), int("offset", 0, usize::MAX)) {
        (Ok(l), Ok(o)) => (l, o),
        (Err(key), _) | (_, Err(key)) => {
            return invalid(key, "must be a whole number (limit 1-1000)");
        }
    };
    let by_name = match last(&pairs, "order").unwrap_or("count_desc") {
        "count_desc" => false,
        "name_asc" => true,
        _ => return invalid("order", "must be count_desc or name_asc"),
    };
    let include_zero = !matches!(last(&pairs, "include_zero"), Some("false" | "0"));
    let prefix = last(&pairs, "prefix").unwrap_or("").to_lowercase();
    let assets = list_user_assets(&state, &who.name).await;
    let mut tags: Vec<(&str, usize)> = ["input", "output"]
        .into_iter()
        .map(|t| (t, assets.iter().filter(|a| a.kind == t).count()))
        .filter(|(t, n)| t.starts_with(&prefix) && (include_zero || *n > 0))
        .collect();
    if by_name {
        tags.sort_by(|a, b| a.0.cmp(b.0));
    } else {
        tags.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    }
    let total = tags.len();
    let page: Vec<Value> = tags
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(t, n)| json!({"name": t, "count": n, "type": "system"}))
        .collect();
    let has_more = offset + page.len() < total;
    Json(json!({"tags": page, "total": total, "has_more": has_more})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn asset(kind: &'static str, rel: &str, size: u64, t: f64) -> Asset {
        Asset {
            id: asset_id("u", kind, rel),
            kind,
            rel: rel.into(),
            name: rel.rsplit('/').next().unwrap().into(),
            size,
            mime_type: None,
            created: t,
            modified: t,
        }
    }

    #[test]
    fn queries_are_checked_like_comfyui() {
        let q = parse_list_query(&pairs(&[])).unwrap();
        assert_eq!(
            (q.limit, q.offset, q.sort.as_str(), q.desc),
            (20, 0, "created_at", true)
        );
        let q = parse_list_query(&pairs(&[
            ("include_tags", "Output, models"),
            ("include_tags", "output"),
            ("exclude_tags", "input"),
            ("limit", "500"),
            ("order", "asc"),
            ("sort", "size"),
        ]))
        .unwrap();
        assert_eq!(q.include_tags, ["output", "models"]);
        assert_eq!(q.exclude_tags, ["input"]);
        assert_eq!((q.limit, q.desc, q.sort.as_str()), (500, false, "size"));
        for bad in [
            ("limit", "0"),
            ("limit", "501"),
            ("limit", "x"),
            ("offset", "-1"),
            ("sort", "path"),
            ("order", "up"),
            ("metadata_filter", "[1]"),
        ] {
            assert_eq!(
                parse_list_query(&pairs(&[bad])).unwrap_err().0,
                bad.0,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn selection_filters_sorts_and_pages() {
        let all = vec![
            asset("input", "up.png", 10, 1.0),
            asset("output", "ComfyUI_00001_.png", 30, 3.0),
            asset("output", "video/clip.mp4", 20, 2.0),
        ];
        let q = |p: &[(&str, &str)]| parse_list_query(&pairs(p)).unwrap();
        let names = |v: &[Asset]| v.iter().map(|a| a.rel.clone()).collect::<Vec<_>>();
        let (page, total) = select(all.clone(), &q(&[]));
        assert_eq!(total, 3);
        assert_eq!(
            names(&page),
            ["ComfyUI_00001_.png", "video/clip.mp4", "up.png"]
        );
        let (page, total) = select(all.clone(), &q(&[("include_tags", "output")]));
        assert_eq!((total, names(&page).len()), (2, 2));
        let (page, _) = select(all.clone(), &q(&[("include_tags", "output,models")]));
        assert!(page.is_empty(), "every included tag must be there");
        let (page, _) = select(all.clone(), &q(&[("exclude_tags", "output")]));
        assert_eq!(names(&page), ["up.png"]);
        let (page, _) = select(all.clone(), &q(&[("name_contains", "CLIP")]));
        assert_eq!(names(&page), ["video/clip.mp4"]);
        let (page, _) = select(all.clone(), &q(&[("sort", "size"), ("order", "asc")]));
        assert_eq!(
            names(&page),
            ["up.png", "video/clip.mp4", "ComfyUI_00001_.png"]
        );
        let (page, total) = select(all.clone(), &q(&[("limit", "1"), ("offset", "1")]));
        assert_eq!(
            (total, names(&page)),
            (3, vec!["video/clip.mp4".to_string()])
        );
        let (page, _) = select(
            all,
            &q(&[("metadata_filter", r#"{"filename": "video/clip.mp4"}"#)]),
        );
        assert_eq!(names(&page), ["video/clip.mp4"]);
    }

    #[test]
    fn ids_are_stable_uuids_per_owner() {
        let a = asset_id("user001", "output", "x.png");
        assert_eq!(a, asset_id("user001", "output", "x.png"));
        assert_ne!(a, asset_id("user002", "output", "x.png"));
        assert_ne!(a, asset_id("user001", "input", "x.png"));
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().to_string(), a);
    }

    #[test]
    fn preview_urls_keep_the_subfolder_and_the_prefix() {
        let a = asset("output", "video/my clip.mp4", 1, 0.0);
        assert_eq!(
            preview_url(&a, None),
            "/api/view?type=output&filename=my%20clip%2Emp4&subfolder=video"
        );
        let scope = Scope {
            user: Some("user001".into()),
            original_path: String::new(),
        };
        assert!(preview_url(&a, Some(&scope)).starts_with("/user001/api/view?type=output"));
        assert_eq!(iso(0.0), "1970-01-01T00:00:00Z");
    }
}
