//! Output storage: a file fetched from a GPU server is written under a
//! temporary name, then given a name no other file has (never overwriting one),
//! so a participant's outputs are never lost or replaced.
//!
//! A published file is complete in the operating system's hands, which a crash
//! or kill of this process cannot undo; it is then synced to the disk in the
//! background, so the participant sees it without waiting for the fsync (7-13 ms
//! a file on the reference VM). Only a power loss in that moment can lose it,
//! the same exposure the store's `synchronous = NORMAL` accepts.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

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
}

/// A whole small file from a GPU server saved as [`NewOutput`] would save it, in one trip to
/// the blocking pool instead of one per step (create, write, flush, link, remove): on a busy
/// machine each trip waits for a thread, and the participant's `executed` waits for this.
pub async fn save_whole(
    dir: &Path,
    data: bytes::Bytes,
    filename: &str,
    job_id: &str,
) -> std::io::Result<String> {
    let dir = dir.to_path_buf();
    let (filename, job_id) = (filename.to_owned(), job_id.to_owned());
    blocking(move || {
        let (part, mut file) = start_part(&dir)?;
        std::io::Write::write_all(&mut file, &data)?;
        publish_named(&dir, part, file, &filename, &job_id)
    })
    .await
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
    for candidate in candidates(&base, job_id) {
        let target = dir.join(&candidate);
        if publish(&part.0, &target)? {
            drop(part);
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || {
                let synced = file
                    .sync_all()
                    // The new name itself: the directory entry.
                    .and_then(|()| std::fs::File::open(&dir)?.sync_all());
                if let Err(e) = synced {
                    tracing::warn!(file = %target.display(), error = %e, "could not sync an output to disk");
                }
            });
            return Ok(candidate);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "every candidate name is taken",
    ))
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
        let mut names: Vec<String> = std::fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
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
