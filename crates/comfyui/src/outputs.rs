//! Output storage: a file fetched from a GPU server is written under a
//! temporary name, then given a name no other file has (never overwriting one),
//! so a participant's outputs are never lost or replaced.
//!
//! A published file is complete in the operating system's hands, which a crash
//! or kill of this process cannot undo; it is then synced to the disk in the
//! background, so the participant sees it without waiting for the fsync (7-13 ms
//! a file on the reference VM). Only a power loss in that moment can lose it,
//! the same exposure the store's `synchronous = NORMAL` accepts.
//!
//! A result's name can be [`reserve`]d before its bytes arrive, so the participant is told
//! about it at once while the copy runs; `/view` of a reserved name waits for the copy
//! ([`wait_pending`]) and never sees a partial file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

/// The output names reserved in this process and not yet published, each with how its
/// copy ended (`None` while it runs, then whether the file is there). Every output this
/// process writes picks its name under this lock, so no two take the same one.
static PENDING: LazyLock<Mutex<HashMap<PathBuf, watch::Receiver<Option<bool>>>>> =
    LazyLock::new(Mutex::default);

fn pending() -> MutexGuard<'static, HashMap<PathBuf, watch::Receiver<Option<bool>>>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// A name held for an output whose bytes are still on their way (see [`reserve`]). Saved
/// with [`Reserved::save_whole`] or [`NewOutput::publish_as`]; dropped before that, it frees
/// the name and tells whoever waits for it that no file will come.
#[derive(Debug)]
pub struct Reserved {
    dir: PathBuf,
    name: String,
    path: PathBuf,
    done: watch::Sender<Option<bool>>,
}

impl Reserved {
    /// The name the file will have in its folder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The folder it will be in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves a whole small file from a GPU server as [`NewOutput::publish_as`] would, in one
    /// trip to the blocking pool instead of one per step (create, write, flush, link,
    /// remove): on a busy machine each trip waits for a thread.
    pub async fn save_whole(self, data: bytes::Bytes) -> std::io::Result<String> {
        blocking(move || {
            let (part, mut file) = start_part(&self.dir)?;
            std::io::Write::write_all(&mut file, &data)?;
            self.publish(part, file)
        })
        .await
    }

    /// Gives the complete data in `part` the reserved name. Blocking.
    fn publish(self, part: PartFile, file: std::fs::File) -> std::io::Result<String> {
        // Only something outside this process can have taken the name: refused, never replaced.
        if !publish(&part.0, &self.path)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} was created by someone else meanwhile", self.name),
            ));
        }
        drop(part);
        sync_later(file, self.dir.clone(), self.path.clone());
        self.done.send_replace(Some(true));
        Ok(self.name.clone())
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        pending().remove(&self.path);
        // Published or not: a waiter learns which, once.
        self.done.send_if_modified(|v| {
            let unset = v.is_none();
            if unset {
                *v = Some(false);
            }
            unset
        });
    }
}

/// Reserves the name [`NewOutput::publish`] would give `filename` in `dir` now: a name no
/// file there has and no other output of this process holds.
pub async fn reserve(dir: &Path, filename: &str, job_id: &str) -> std::io::Result<Reserved> {
    let dir = dir.to_path_buf();
    let (filename, job_id) = (filename.to_owned(), job_id.to_owned());
    blocking(move || {
        let base = local_basename(&filename);
        // Made now, so the name can be looked up (and waited for) before its bytes land.
        std::fs::create_dir_all(&dir)?;
        let mut held = pending();
        for candidate in candidates(&base, &job_id) {
            let path = dir.join(&candidate);
            if held.contains_key(&path) {
                continue;
            }
            match std::fs::symlink_metadata(&path) {
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let (done, waiters) = watch::channel(None);
            held.insert(path.clone(), waiters);
            return Ok(Reserved {
                dir,
                name: candidate,
                path,
                done,
            });
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "every candidate name is taken",
        ))
    })
    .await
}

/// If `path` is an output being copied, waits (at most `limit`) for its copy: whether the
/// file is there now. `false` at once for a name nobody reserved.
pub async fn wait_pending(path: &Path, limit: Duration) -> bool {
    let Some(mut rx) = pending().get(path).cloned() else {
        return false;
    };
    matches!(
        tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await,
        Ok(Ok(v)) if *v == Some(true)
    )
}

/// An output being written: complete data under a temporary name first, then
/// [`NewOutput::publish`] gives it its final name. Dropped unpublished (the job
/// stopped, a write failed), it leaves nothing behind.
pub struct NewOutput {
    dir: PathBuf,
    part: PartFile,
    file: tokio::fs::File,
}

impl NewOutput {
    /// Starts a file in `dir` (created if missing).
    pub async fn create(dir: &Path) -> std::io::Result<Self> {
        let dir = dir.to_path_buf();
        let (dir, part, file) = blocking(move || {
            let (part, file) = start_part(&dir)?;
            Ok((dir, part, file))
        })
        .await?;
        Ok(NewOutput {
            dir,
            part,
            file: tokio::fs::File::from_std(file),
        })
    }

    pub async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.file.write_all(chunk).await
    }

    /// Names the complete data after `filename` (its last path segment), or,
    /// when that name is taken, `<stem>_<job id>[_n].<ext>`, and syncs it in the
    /// background (see the module docs). Returns the name.
    pub async fn publish(mut self, filename: &str, job_id: &str) -> std::io::Result<String> {
        self.file.flush().await?;
        let file = self.file.into_std().await;
        let (dir, part) = (self.dir, self.part);
        let (filename, job_id) = (filename.to_owned(), job_id.to_owned());
        blocking(move || publish_named(&dir, part, file, &filename, &job_id)).await
    }

    /// Publishes under a name reserved in the same folder (see [`reserve`]).
    pub async fn publish_as(mut self, name: Reserved) -> std::io::Result<String> {
        self.file.flush().await?;
        let file = self.file.into_std().await;
        let part = self.part;
        blocking(move || name.publish(part, file)).await
    }
}

/// A new, empty part file in `dir` (created if missing). Blocking.
fn start_part(dir: &Path) -> std::io::Result<(PartFile, std::fs::File)> {
    std::fs::create_dir_all(dir)?;
    let part = PartFile::new(dir.join(format!(".comfyume-{}.part", uuid::Uuid::new_v4().simple())));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&part.0)?;
    Ok((part, file))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

/// Gives the complete data in `part` its name (see [`NewOutput::publish`]), and starts
/// its sync to the disk in the background. Blocking.
fn publish_named(
    dir: &Path,
    part: PartFile,
    file: std::fs::File,
    filename: &str,
    job_id: &str,
) -> std::io::Result<String> {
    let base = local_basename(filename);
    // Held while a name is chosen and taken: a reservation never sees it free meanwhile.
    let held = pending();
    for candidate in candidates(&base, job_id) {
        let target = dir.join(&candidate);
        if held.contains_key(&target) {
            continue;
        }
        if publish(&part.0, &target)? {
            drop(held);
            drop(part);
            sync_later(file, dir.to_path_buf(), target);
            return Ok(candidate);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "every candidate name is taken",
    ))
}

/// Syncs a published output and its directory entry to the disk in the background.
fn sync_later(file: std::fs::File, dir: PathBuf, target: PathBuf) {
    tokio::task::spawn_blocking(move || {
        let synced = file
            .sync_all()
            // The new name itself: the directory entry.
            .and_then(|()| std::fs::File::open(&dir)?.sync_all());
        if let Err(e) = synced {
            tracing::warn!(file = %target.display(), error = %e, "could not sync an output to disk");
        }
    });
}

/// Part files (`.comfyume-<id>.part`) below `root` not written to for `older_than`: left
/// behind by a process killed mid-copy (a copy under way writes to its part file as the bytes
/// arrive, and gives up within its transfer timeout). Removed; returns how many. Links are
/// not followed. Blocking.
pub fn remove_stale_parts(root: &Path, older_than: Duration) -> usize {
    fn walk(dir: &Path, depth: usize, older_than: Duration, removed: &mut usize) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            let name = e.file_name();
            let name = name.to_string_lossy();
            if md.is_dir() && depth > 0 {
                walk(&e.path(), depth - 1, older_than, removed);
            } else if md.is_file()
                && name.starts_with(".comfyume-")
                && name.ends_with(".part")
                && md
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age >= older_than)
                && std::fs::remove_file(e.path()).is_ok()
            {
                *removed += 1;
            }
        }
    }
    let mut removed = 0;
    // The participants' folders, then their output subfolders.
    walk(root, MAX_SUBFOLDER_DEPTH + 1, older_than, &mut removed);
    removed
}

/// A downloaded file not yet given its name; removed if the job stops first.
struct PartFile(PathBuf);

impl PartFile {
    fn new(path: PathBuf) -> Self {
        PartFile(path)
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Gives the finished file `target`'s name without ever replacing a file:
/// `Ok(false)` if the name is taken.
fn publish(part: &Path, target: &Path) -> std::io::Result<bool> {
    // A hard link appears complete and fails if the name exists.
    match std::fs::hard_link(part, target) {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(_) => {}
    }
    // Filesystems without hard links: claim the name, then move the data in.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    std::fs::rename(part, target)?;
    Ok(true)
}

/// `name`, then `<stem>_<id8>.<ext>`, then `<stem>_<id8>_<n>.<ext>`.
pub(crate) fn candidates(name: &str, job_id: &str) -> impl Iterator<Item = String> {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (name[..i].to_owned(), name[i..].to_owned()),
        _ => (name.to_owned(), String::new()),
    };
    let tag: String = safe_segment(job_id).chars().take(8).collect();
    let first = name.to_owned();
    std::iter::once(first)
        .chain(std::iter::once(format!("{stem}_{tag}{ext}")))
        .chain((2..10_000).map(move |n| format!("{stem}_{tag}_{n}{ext}")))
}

/// The file name part of a backend name, safe as a local file name.
pub(crate) fn local_basename(filename: &str) -> String {
    let base = filename
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .trim_start_matches('.');
    if base.is_empty() {
        "output".to_owned()
    } else {
        base.to_owned()
    }
}

/// Most folders kept of a backend's output subfolder.
const MAX_SUBFOLDER_DEPTH: usize = 8;

/// A backend's output `subfolder` as a relative path that stays inside the folder it is
/// joined to: `/`-separated, no empty, `.`, `..` or hidden (dot) component (our in-progress
/// files are dot files), no control characters or backslashes, each component at most 255
/// bytes, at most 8 deep. `""` for none.
pub fn safe_subfolder(subfolder: &str) -> String {
    subfolder
        .split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .map(|c| {
            let clean: String = c
                .chars()
                .map(|ch| if ch.is_control() { '_' } else { ch })
                .collect();
            let clean = clean.trim_start_matches('.');
            let mut cut = clean.len().min(255);
            while !clean.is_char_boundary(cut) {
                cut -= 1;
            }
            clean[..cut].to_owned()
        })
        .filter(|c| !c.is_empty())
        .take(MAX_SUBFOLDER_DEPTH)
        .collect::<Vec<_>>()
        .join("/")
}

/// A path segment from a user or job name: letters, digits, `-`, `_`, `.`.
pub fn safe_segment(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let out = out.trim_start_matches('.').to_owned();
    if out.is_empty() { "_".to_owned() } else { out }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A whole output saved as the ComfyUI client saves one: its name reserved, then written.
    async fn save_whole(
        dir: &Path,
        data: bytes::Bytes,
        filename: &str,
        job_id: &str,
    ) -> std::io::Result<String> {
        reserve(dir, filename, job_id).await?.save_whole(data).await
    }

    /// Every name in `dir`, sorted (part files included).
    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn candidate_names_never_repeat_the_first() {
        let c: Vec<String> = candidates("nomodel_00001_.png", "0123456789abcdef")
            .take(3)
            .collect();
        assert_eq!(
            c,
            [
                "nomodel_00001_.png",
                "nomodel_00001__01234567.png",
                "nomodel_00001__01234567_2.png"
            ]
        );
        let c: Vec<String> = candidates("README", "ab").take(2).collect();
        assert_eq!(c, ["README", "README_ab"]);
        assert_eq!(local_basename("video/../x.mp4"), "x.mp4");
        assert_eq!(local_basename(".."), "output");
        assert_eq!(safe_segment("../al ice"), "_al_ice");
    }

    /// Saved whole or written piece by piece, an output gets the same names, never
    /// replaces a file, and leaves no part file behind.
    #[tokio::test]
    async fn a_whole_output_is_saved_as_a_streamed_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("video");
        let first = save_whole(
            &sub,
            bytes::Bytes::from_static(b"one"),
            "x/clip.mp4",
            "abcdef0123",
        )
        .await
        .unwrap();
        assert_eq!(first, "clip.mp4");
        let mut streamed = NewOutput::create(&sub).await.unwrap();
        streamed.write(b"tw").await.unwrap();
        streamed.write(b"o").await.unwrap();
        let second = streamed.publish("clip.mp4", "abcdef0123").await.unwrap();
        assert_eq!(second, "clip_abcdef01.mp4");
        let third = save_whole(
            &sub,
            bytes::Bytes::from_static(b"three"),
            "clip.mp4",
            "abcdef0123",
        )
        .await
        .unwrap();
        assert_eq!(third, "clip_abcdef01_2.mp4");
        assert_eq!(
            names_in(&sub),
            ["clip.mp4", "clip_abcdef01.mp4", "clip_abcdef01_2.mp4"]
        );
        assert_eq!(std::fs::read(sub.join(&first)).unwrap(), b"one");
        assert_eq!(std::fs::read(sub.join(&second)).unwrap(), b"two");
        assert_eq!(std::fs::read(sub.join(&third)).unwrap(), b"three");
        // A folder that cannot be made: an error, and nothing written.
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let blocked = dir.path().join("file").join("sub");
        assert!(
            save_whole(&blocked, bytes::Bytes::from_static(b"x"), "a.png", "j")
                .await
                .is_err()
        );
    }

    /// A reserved name is held until its bytes land: no other output takes it, a waiter
    /// gets the file once it is complete, and a reservation given up frees the name and
    /// leaves nothing behind.
    #[tokio::test]
    async fn a_reserved_name_is_held_until_its_file_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("video");
        let first = reserve(&d, "clip.mp4", "abcdef0123").await.unwrap();
        assert_eq!(first.name(), "clip.mp4");
        assert!(d.is_dir(), "the folder exists before the file");
        let path = d.join("clip.mp4");
        assert!(!path.exists());
        // Taken meanwhile by another output, reserved or published whole.
        let second = reserve(&d, "clip.mp4", "abcdef0123").await.unwrap();
        assert_eq!(second.name(), "clip_abcdef01.mp4");
        let other = save_whole(
            &d,
            bytes::Bytes::from_static(b"other"),
            "clip.mp4",
            "abcdef0123",
        )
        .await
        .unwrap();
        assert_eq!(other, "clip_abcdef01_2.mp4");
        // A waiter gets the complete file, not before.
        let waiter = tokio::spawn({
            let path = path.clone();
            async move {
                let ok = wait_pending(&path, Duration::from_secs(30)).await;
                (ok, std::fs::read(&path).ok())
            }
        });
        tokio::task::yield_now().await;
        let mut streamed = NewOutput::create(first.dir()).await.unwrap();
        streamed.write(b"fir").await.unwrap();
        streamed.write(b"st").await.unwrap();
        assert_eq!(streamed.publish_as(first).await.unwrap(), "clip.mp4");
        assert_eq!(waiter.await.unwrap(), (true, Some(b"first".to_vec())));
        // Published: nothing left to wait for.
        assert!(!wait_pending(&path, Duration::from_secs(30)).await);
        // Given up (the copy failed): a waiter hears at once, the name is free again.
        let gone = d.join(second.name());
        let waiter = tokio::spawn({
            let gone = gone.clone();
            async move { wait_pending(&gone, Duration::from_secs(30)).await }
        });
        tokio::task::yield_now().await;
        drop(second);
        assert!(!waiter.await.unwrap());
        assert_eq!(
            reserve(&d, "clip.mp4", "abcdef0123").await.unwrap().name(),
            "clip_abcdef01.mp4"
        );
        assert_eq!(
            names_in(&d),
            ["clip.mp4", "clip_abcdef01_2.mp4"],
            "no part file left"
        );
    }

    /// A reserved name that something outside this process took meanwhile is never
    /// overwritten: the save fails and that file stays as it was.
    #[tokio::test]
    async fn a_reserved_name_taken_from_outside_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let name = reserve(dir.path(), "a.png", "j").await.unwrap();
        std::fs::write(dir.path().join("a.png"), b"theirs").unwrap();
        let err = name
            .save_whole(bytes::Bytes::from_static(b"ours"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(dir.path().join("a.png")).unwrap(), b"theirs");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Only part files nobody has written to lately go: not a copy under way, not anyone's
    /// output, not what a link points at.
    #[test]
    fn stale_part_files_are_removed_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let video = root.path().join("user001").join("video");
        std::fs::create_dir_all(&video).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(7200);
        let write = |path: &Path, aged: bool| {
            let f = std::fs::File::create(path).unwrap();
            if aged {
                f.set_modified(old).unwrap();
            }
        };
        write(&video.join(".comfyume-a.part"), true);
        write(&root.path().join("user001").join(".comfyume-b.part"), true);
        write(&video.join(".comfyume-c.part"), false);
        write(&video.join("clip.mp4"), true);
        write(&video.join(".comfyume-d.partial"), true);
        let elsewhere = tempfile::tempdir().unwrap();
        write(&elsewhere.path().join(".comfyume-e.part"), true);
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("user002")).unwrap();
        assert_eq!(
            remove_stale_parts(root.path(), Duration::from_secs(3600)),
            2
        );
        assert_eq!(
            names_in(&video),
            [".comfyume-c.part", ".comfyume-d.partial", "clip.mp4"]
        );
        assert_eq!(names_in(&root.path().join("user001")), ["video"]);
        assert_eq!(names_in(elsewhere.path()), [".comfyume-e.part"]);
    }

    #[test]
    fn subfolders_stay_inside() {
        assert_eq!(safe_subfolder(""), "");
        assert_eq!(safe_subfolder("video"), "video");
        assert_eq!(safe_subfolder("ComfyUI/2024-05-01"), "ComfyUI/2024-05-01");
        assert_eq!(safe_subfolder("../../etc"), "etc");
        assert_eq!(safe_subfolder("/abs/./x/"), "abs/x");
        assert_eq!(safe_subfolder("a\\..\\b"), "a/b");
        assert_eq!(
            safe_subfolder(".hidden/.comfyume-x.part"),
            "hidden/comfyume-x.part"
        );
        assert_eq!(safe_subfolder("...."), "");
        assert_eq!(safe_subfolder("a\nb"), "a_b");
        assert_eq!(safe_subfolder(&"d/".repeat(20)), ["d"; 8].join("/"));
        assert!(safe_subfolder(&"é".repeat(200)).len() <= 255);
    }
}
