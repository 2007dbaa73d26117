//! The gateway's file-system work, kept off the async runtime's threads: every
//! function here is either async over `tokio::fs` or runs its blocking calls in
//! `spawn_blocking`. Handlers use these instead of `std::fs` and `Path::exists`
//! (a slow disk must stall one blocking thread, not every participant's
//! requests); `tests/no_blocking_fs.rs` holds the handlers to that.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// What a path names (following links: the paths were resolved first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Missing,
    File,
    Dir,
    Other,
}

pub async fn kind(path: &Path) -> Kind {
    of(tokio::fs::metadata(path).await)
}

/// [`kind`] of the path itself: a link is `Other`, never what it points to.
pub async fn kind_no_follow(path: &Path) -> Kind {
    of(tokio::fs::symlink_metadata(path).await)
}

fn of(md: io::Result<std::fs::Metadata>) -> Kind {
    match md {
        Ok(md) if md.is_file() => Kind::File,
        Ok(md) if md.is_dir() => Kind::Dir,
        Ok(_) => Kind::Other,
        Err(_) => Kind::Missing,
    }
}

/// Runs blocking file work on tokio's blocking pool; a panic there is an error.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Files at least this long are sent in [`crate::export::CHUNK`]-sized reads.
const BIG_FILE: u64 = 4 * crate::export::CHUNK as u64;

/// tower-http's file service (ranges, conditional requests) for a file of `len` bytes.
/// Big files (videos) are read in 256 KiB pieces: a 2 GB `/view` took 0.87-1.14 s instead
/// of 1.41-1.88 s with the default 64 KiB. Small files keep the default, so an image view
/// does not reserve a buffer many times its size.
fn serve_file(path: &Path, len: u64) -> tower_http::services::ServeFile {
    let service = tower_http::services::ServeFile::new(path);
    if len >= BIG_FILE {
        service.with_buf_chunk_size(crate::export::CHUNK)
    } else {
        service
    }
}

/// A participant's file, opened for sending in one trip to the blocking pool (the
/// path resolved, the file's length and time read, and a small file read whole).
#[derive(Debug)]
pub struct Opened {
    pub path: PathBuf,
    pub len: u64,
    pub modified: Option<SystemTime>,
    /// The whole file when it is shorter than [`BIG_FILE`], else its first bytes (for
    /// content sniffing).
    pub bytes: Vec<u8>,
    pub whole: bool,
}

impl Opened {
    /// The leading bytes, for content sniffing.
    pub fn head(&self) -> &[u8] {
        &self.bytes[..self.bytes.len().min(crate::sniff::HEAD_LEN)]
    }
}

/// Why [`open_within`] has nothing to send.
#[derive(Debug)]
pub enum OpenError {
    /// The subfolder leads out of the base, or is malformed or too long.
    Subfolder(crate::paths::PathError),
    /// The same, of the file name.
    Name(crate::paths::PathError),
    Io(io::Error),
}

/// `base/subfolder/name`, resolved within `base` (no link leads out) and opened for
/// [`send`], all in one trip to the blocking pool; `None` when it is not a regular file.
pub async fn open_within(
    base: &Path,
    subfolder: &str,
    name: &str,
) -> Result<Option<Opened>, OpenError> {
    use crate::paths::resolve_within_blocking;
    let (base, subfolder, name) = (base.to_owned(), subfolder.to_owned(), name.to_owned());
    tokio::task::spawn_blocking(move || {
        let folder = resolve_within_blocking(&base, &subfolder).map_err(OpenError::Subfolder)?;
        let path = resolve_within_blocking(&folder, &name).map_err(OpenError::Name)?;
        open_blocking(path).map_err(OpenError::Io)
    })
    .await
    .unwrap_or_else(|e| Err(OpenError::Io(io::Error::other(e))))
}

/// Opens `path` for [`send`]: `None` when it is not a regular file (links followed: the
/// caller resolved the path within the participant's folder first). Blocking.
fn open_blocking(path: PathBuf) -> io::Result<Option<Opened>> {
    use std::io::Read;
    let head = crate::sniff::HEAD_LEN;
    // Asked before opening: opening a FIFO would wait for a writer.
    match std::fs::metadata(&path) {
        Ok(md) if md.is_file() => {}
        _ => return Ok(None),
    }
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let md = file.metadata()?;
    let len = md.len();
    let whole = len < BIG_FILE;
    let want = if whole { len } else { head as u64 };
    let mut bytes = Vec::with_capacity(usize::try_from(want).unwrap_or(head));
    file.take(want).read_to_end(&mut bytes)?;
    // A file that changed length since the metadata: take what was read as the whole.
    let len = if whole { bytes.len() as u64 } else { len };
    Ok(Some(Opened {
        path,
        len,
        modified: md.modified().ok(),
        bytes,
        whole,
    }))
}

/// Sends `file` as the answer to `req`. A small file read whole goes out from memory when
/// the request is a plain GET or HEAD: `/view` of an image is one trip to the blocking pool
/// instead of one per open, stat and 64 KiB read, which on busy cores showed as time
/// before the result appeared. Ranges and conditional requests, and big files, go to
/// tower-http's file service.
pub async fn send(file: Opened, req: axum::extract::Request) -> axum::response::Response {
    use axum::http::{HeaderValue, Method, header};
    use tower::ServiceExt;
    let plain = matches!(*req.method(), Method::GET | Method::HEAD)
        && ![
            header::RANGE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
        ]
        .iter()
        .any(|h| req.headers().contains_key(h));
    if file.whole && plain {
        let mut resp = axum::response::Response::new(axum::body::Body::from(file.bytes));
        let h = resp.headers_mut();
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(file.len));
        if let Some(v) = file
            .modified
            .and_then(|t| HeaderValue::from_str(&httpdate::fmt_http_date(t)).ok())
        {
            h.insert(header::LAST_MODIFIED, v);
        }
        return resp;
    }
    match serve_file(&file.path, file.len).oneshot(req).await {
        Ok(r) => r.map(axum::body::Body::new),
        Err(e) => match e {},
    }
}

/// Seconds since the epoch, as ComfyUI reports file times.
pub fn secs(t: io::Result<SystemTime>) -> f64 {
    t.ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One entry of a listing: its path relative to the listed folder (`/`-joined).
#[derive(Debug, Clone)]
pub struct Entry {
    pub rel: String,
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub modified: f64,
    pub created: f64,
}

fn rel_string(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Files and folders below `dir` (relative to `root`), sorted by name within
/// each folder. Dot files are skipped (ComfyUI's glob does; our in-progress
/// writes are dot files), and links are never followed.
pub async fn walk(root: &Path, dir: &Path, recurse: bool) -> Vec<Entry> {
    let (root, dir) = (root.to_path_buf(), dir.to_path_buf());
    blocking(move || {
        let mut out = Vec::new();
        walk_blocking(&root, &dir, recurse, &mut out);
        Ok(out)
    })
    .await
    .unwrap_or_default()
}

fn walk_blocking(root: &Path, dir: &Path, recurse: bool, out: &mut Vec<Entry>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        if !md.is_dir() && !md.is_file() {
            continue;
        }
        let modified = secs(md.modified());
        out.push(Entry {
            rel: rel_string(root, &e.path()),
            name,
            is_dir: md.is_dir(),
            size: md.len(),
            modified,
            created: md.created().ok().map(|t| secs(Ok(t))).unwrap_or(modified),
        });
        if md.is_dir() && recurse {
            walk_blocking(root, &e.path(), true, out);
        }
    }
}

/// (name relative to `dir`, modified time) of every file below `dir`.
pub async fn list_files(dir: &Path) -> Vec<(String, SystemTime)> {
    let dir = dir.to_path_buf();
    blocking(move || {
        let mut out = Vec::new();
        fn visit(root: &Path, d: &Path, out: &mut Vec<(String, SystemTime)>) {
            let Ok(rd) = std::fs::read_dir(d) else { return };
            for e in rd.flatten() {
                let Ok(md) = e.path().symlink_metadata() else {
                    continue;
                };
                if md.is_dir() {
                    visit(root, &e.path(), out);
                } else if md.is_file() {
                    let rel = e
                        .path()
                        .strip_prefix(root)
                        .map(|p| p.to_string_lossy().into_owned());
                    if let Ok(rel) = rel {
                        if rel.starts_with('.') || rel.contains("/.") {
                            continue; // in-progress uploads and other hidden files
                        }
                        out.push((rel, md.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
                    }
                }
            }
        }
        visit(&dir, &dir, &mut out);
        out.sort();
        Ok(out)
    })
    .await
    .unwrap_or_default()
}

/// Creates `dir` and its missing parents; answers the folders it created, so
/// that a write that fails afterwards leaves nothing behind ([`remove_created`]).
pub async fn create_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = dir.to_path_buf();
    blocking(move || {
        let mut missing = Vec::new();
        let mut p = dir.as_path();
        while std::fs::symlink_metadata(p).is_err() {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(parent) => p = parent,
                None => break,
            }
        }
        std::fs::create_dir_all(&dir)?;
        missing.reverse();
        Ok(missing)
    })
    .await
}

/// Removes folders [`create_dirs`] made, deepest first, if still empty.
pub async fn remove_created(dirs: Vec<PathBuf>) {
    for d in dirs.iter().rev() {
        let _ = tokio::fs::remove_dir(d).await;
    }
}

/// A temp file in the target's folder, removed when dropped (after a publish
/// by hard link it is only a second name).
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A hidden name for an in-progress write: short, whatever the target's length.
fn temp_name(dir: &Path) -> PathBuf {
    dir.join(format!(".comfyume-{}.tmp", uuid::Uuid::new_v4().simple()))
}

fn write_temp(dir: &Path, bytes: &[u8]) -> io::Result<Temp> {
    use std::io::Write;
    let tmp = Temp(temp_name(dir));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp.0)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(tmp)
}

/// Writes `bytes` to `path` through a temp file and a rename, so a reader (or
/// a crash, or a full disk) never sees a half-written file.
pub async fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let path = path.to_path_buf();
    let bytes = bytes.to_vec();
    blocking(move || {
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::other("no parent folder"))?;
        let tmp = write_temp(dir, &bytes)?;
        std::fs::rename(&tmp.0, &path)?;
        Ok(())
    })
    .await
}

/// `name`, then ComfyUI's `name (1).ext`, `name (2).ext`, …, each shortened (in
/// its stem) to fit [`crate::paths::MAX_NAME_BYTES`].
pub fn upload_candidates(name: &str) -> impl Iterator<Item = String> + '_ {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    std::iter::once(name.to_string()).chain((1..10_000).map(move |i| {
        let suffix = format!(" ({i}){ext}");
        let room = crate::paths::MAX_NAME_BYTES.saturating_sub(suffix.len());
        let mut cut = stem.len().min(room);
        while !stem.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}{suffix}", &stem[..cut])
    }))
}

fn same_bytes(path: &Path, digest: &[u8; 32]) -> bool {
    // Only a regular file's bytes: never read through a link.
    path.symlink_metadata().is_ok_and(|m| m.is_file())
        && std::fs::read(path).is_ok_and(|b| Sha256::digest(&b).as_slice() == digest)
}

/// Publishes an upload under ComfyUI's naming rules without a window between
/// choosing the name and writing it: the bytes go to a temp file first, then a
/// hard link claims the name only if it is free (two uploads of one name each
/// get their own). Identical bytes keep the existing name (nothing written);
/// `overwrite` replaces atomically. Answers (final name, was a duplicate).
pub async fn publish_upload(
    folder: &Path,
    name: &str,
    bytes: &[u8],
    overwrite: bool,
) -> io::Result<(String, bool)> {
    let (folder, name, bytes) = (folder.to_path_buf(), name.to_string(), bytes.to_vec());
    blocking(move || {
        let tmp = write_temp(&folder, &bytes)?;
        if overwrite {
            std::fs::rename(&tmp.0, folder.join(&name))?;
            return Ok((name, false));
        }
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        for candidate in upload_candidates(&name) {
            let target = folder.join(&candidate);
            match std::fs::hard_link(&tmp.0, &target) {
                Ok(()) => return Ok((candidate, false)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                // No hard links here: claim the name, then move the bytes in.
                Err(_) => match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                {
                    Ok(_) => {
                        std::fs::rename(&tmp.0, &target)?;
                        return Ok((candidate, false));
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                },
            }
            if same_bytes(&target, &digest) {
                return Ok((candidate, true));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "every candidate name is taken",
        ))
    })
    .await
}

/// The text of `/proc/meminfo` (empty where there is none).
pub async fn meminfo() -> String {
    tokio::fs::read_to_string("/proc/meminfo")
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_comfyui_and_fit() {
        let c: Vec<String> = upload_candidates("up.png").take(3).collect();
        assert_eq!(c, ["up.png", "up (1).png", "up (2).png"]);
        let long = format!("{}.png", "é".repeat(125));
        for c in upload_candidates(&long).take(20) {
            assert!(c.len() <= 255, "{}", c.len());
            assert!(c.ends_with(".png"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_uploads_of_one_name_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let d = dir.path().to_path_buf();
            tasks.push(tokio::spawn(async move {
                let bytes = vec![i; 1000 + i as usize];
                let (name, dup) = publish_upload(&d, "a.png", &bytes, false).await.unwrap();
                (name, dup, bytes)
            }));
        }
        let mut names = std::collections::HashMap::new();
        for t in tasks {
            let (name, dup, bytes) = t.await.unwrap();
            assert!(!dup);
            assert_eq!(std::fs::read(dir.path().join(&name)).unwrap(), bytes);
            assert!(names.insert(name, bytes).is_none());
        }
        assert!(names.contains_key("a.png") && names.contains_key("a (15).png"));
        // Identical bytes again: the name they already have, nothing new written.
        let (name, dup) = publish_upload(dir.path(), "a.png", &[0u8; 1000], false)
            .await
            .unwrap();
        assert!(dup);
        assert_eq!(names[&name], vec![0u8; 1000]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 16);
    }

    #[tokio::test]
    async fn created_folders_are_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let made = create_dirs(&dir.path().join("a/b/c")).await.unwrap();
        assert_eq!(made.len(), 3);
        remove_created(made).await;
        assert!(!dir.path().join("a").exists());
    }
}
