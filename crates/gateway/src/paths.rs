//! Safe resolution of participant-supplied relative paths. Every file route goes
//! through here, so traversal (`..`, absolute paths, encoded separators after
//! decoding, symlinks leading out) never reaches a file outside the base folder,
//! and names the file system would refuse (too long, too deep) are refused first,
//! with a clear message, before anything is created.

use std::path::{Component, Path, PathBuf};

/// Longest name of one file or folder, in bytes (what Linux file systems allow).
pub const MAX_NAME_BYTES: usize = 255;
/// Most folders in one participant path (a workflow tree is a few levels deep).
pub const MAX_DEPTH: usize = 32;
/// Longest participant path in bytes: with the data directory in front it stays
/// far below PATH_MAX (4096), so the kernel never answers "File name too long".
pub const MAX_PATH_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path escapes its folder")]
    Traversal,
    #[error("invalid path")]
    Invalid,
    #[error("a file or folder name is longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("the path has more than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the path is longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
}

impl PathError {
    /// True for the size limits (a 400 with a message everywhere), false for
    /// traversal and malformed paths (whose status each route chooses, as ComfyUI).
    pub fn is_limit(self) -> bool {
        matches!(
            self,
            PathError::NameTooLong | PathError::TooDeep | PathError::PathTooLong
        )
    }
}

/// Joins a relative, `/`-separated path under `base` lexically. Rejects `..`,
/// absolute paths, NUL bytes, backslashes and drive prefixes, and paths beyond
/// [`MAX_NAME_BYTES`], [`MAX_DEPTH`] or [`MAX_PATH_BYTES`].
pub fn join_relative(base: &Path, rel: &str) -> Result<PathBuf, PathError> {
    if rel.contains('\0') || rel.contains('\\') {
        return Err(PathError::Invalid);
    }
    if rel.starts_with('/') {
        return Err(PathError::Traversal);
    }
    let mut out = base.to_path_buf();
    let mut depth = 0;
    for comp in Path::new(rel).components() {
        match comp {
            Component::Normal(c) => {
                if c.len() > MAX_NAME_BYTES {
                    return Err(PathError::NameTooLong);
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(PathError::TooDeep);
                }
                out.push(c)
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Traversal);
            }
        }
    }
    // Checked after the components so that `../<long>` still reads as traversal.
    if rel.len() > MAX_PATH_BYTES {
        return Err(PathError::PathTooLong);
    }
    Ok(out)
}

/// Like [`join_relative`], and also refuses a result whose existing ancestors
/// resolve (through symlinks) outside `base`. The file-system look-ups run off
/// the async runtime's threads.
pub async fn resolve_within(base: &Path, rel: &str) -> Result<PathBuf, PathError> {
    let joined = join_relative(base, rel)?;
    let base = base.to_path_buf();
    tokio::task::spawn_blocking(move || check_links(&base, joined))
        .await
        .unwrap_or(Err(PathError::Invalid))
}

/// [`resolve_within`] for code already off the runtime (or tests).
pub fn resolve_within_blocking(base: &Path, rel: &str) -> Result<PathBuf, PathError> {
    check_links(base, join_relative(base, rel)?)
}

fn check_links(base: &Path, joined: PathBuf) -> Result<PathBuf, PathError> {
    let base_real = match base.canonicalize() {
        Ok(p) => p,
        // A base that does not exist yet holds no symlinks.
        Err(_) => return Ok(joined),
    };
    // Canonicalize the deepest existing ancestor: the rest cannot be a symlink.
    let mut probe = joined.as_path();
    loop {
        if let Ok(real) = probe.canonicalize() {
            if !real.starts_with(&base_real) {
                return Err(PathError::Traversal);
            }
            return Ok(joined);
        }
        match probe.parent() {
            Some(p) if p.starts_with(base) => probe = p,
            _ => return Ok(joined),
        }
    }
}

/// A single file name: no separators, not empty, not `.`/`..`, at most
/// [`MAX_NAME_BYTES`].
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= MAX_NAME_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_traversal_forms() {
        let base = Path::new("/data/u");
        assert_eq!(join_relative(base, "../x"), Err(PathError::Traversal));
        assert_eq!(join_relative(base, "a/../../x"), Err(PathError::Traversal));
        assert_eq!(
            join_relative(base, "/etc/passwd"),
            Err(PathError::Traversal)
        );
        assert_eq!(join_relative(base, "a\\..\\b"), Err(PathError::Invalid));
        assert_eq!(join_relative(base, "a\0b"), Err(PathError::Invalid));
        assert_eq!(
            join_relative(base, "workflows/./a.json").unwrap(),
            PathBuf::from("/data/u/workflows/a.json")
        );
        assert_eq!(join_relative(base, "").unwrap(), PathBuf::from("/data/u"));
    }

    #[test]
    fn bounds_names_depth_and_length() {
        let base = Path::new("/data/u");
        let max = "n".repeat(MAX_NAME_BYTES);
        assert!(join_relative(base, &format!("workflows/{max}")).is_ok());
        assert_eq!(
            join_relative(base, &format!("workflows/{max}x")),
            Err(PathError::NameTooLong)
        );
        // Multi-byte characters count in bytes, as the file system counts them.
        assert_eq!(
            join_relative(base, &"é".repeat(128)),
            Err(PathError::NameTooLong)
        );
        let deep = vec!["d"; MAX_DEPTH].join("/");
        assert!(join_relative(base, &deep).is_ok());
        assert_eq!(
            join_relative(base, &format!("{deep}/d")),
            Err(PathError::TooDeep)
        );
        let long = vec!["x".repeat(200); 6].join("/");
        assert_eq!(join_relative(base, &long), Err(PathError::PathTooLong));
        assert!(PathError::PathTooLong.is_limit() && !PathError::Traversal.is_limit());
        // Traversal stays traversal whatever its length.
        assert_eq!(
            join_relative(base, &format!("../{}", "x".repeat(2000))),
            Err(PathError::Traversal)
        );
    }

    #[test]
    fn symlink_out_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("u");
        std::fs::create_dir_all(&base).unwrap();
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("s.txt"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, base.join("link")).unwrap();
        assert_eq!(
            resolve_within_blocking(&base, "link/s.txt"),
            Err(PathError::Traversal)
        );
        assert!(resolve_within_blocking(&base, "ok/new.txt").is_ok());
    }

    #[tokio::test]
    async fn async_resolution_matches() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("u");
        std::fs::create_dir_all(&base).unwrap();
        std::os::unix::fs::symlink("/", base.join("root")).unwrap();
        assert_eq!(
            resolve_within(&base, "root/etc").await,
            Err(PathError::Traversal)
        );
        assert_eq!(
            resolve_within(&base, "a/b.json").await.unwrap(),
            base.join("a/b.json")
        );
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_file_name("a.png"));
        assert!(!is_plain_file_name("a/b.png"));
        assert!(!is_plain_file_name(".."));
        assert!(!is_plain_file_name(""));
        assert!(!is_plain_file_name(&"a".repeat(256)));
    }
}
