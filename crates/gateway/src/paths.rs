//! Safe resolution of participant-supplied relative paths. Every file route goes
//! through here, so traversal (`..`, absolute paths, encoded separators after
//! decoding, symlinks leading out) never reaches a file outside the base folder.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path escapes its folder")]
    Traversal,
    #[error("invalid path")]
    Invalid,
}

/// Joins a relative, `/`-separated path under `base` lexically. Rejects `..`,
/// absolute paths, NUL bytes, backslashes and drive prefixes.
pub fn join_relative(base: &Path, rel: &str) -> Result<PathBuf, PathError> {
    if rel.contains('\0') || rel.contains('\\') {
        return Err(PathError::Invalid);
    }
    if rel.starts_with('/') {
        return Err(PathError::Traversal);
    }
    let mut out = base.to_path_buf();
    for comp in Path::new(rel).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Traversal);
            }
        }
    }
    Ok(out)
}

/// Like [`join_relative`], and also refuses a result whose existing ancestors
/// resolve (through symlinks) outside `base`.
pub fn resolve_within(base: &Path, rel: &str) -> Result<PathBuf, PathError> {
    let joined = join_relative(base, rel)?;
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

/// A single file name: no separators, not empty, not `.`/`..`.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= 255
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
    fn symlink_out_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("u");
        std::fs::create_dir_all(&base).unwrap();
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("s.txt"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, base.join("link")).unwrap();
        assert_eq!(
            resolve_within(&base, "link/s.txt"),
            Err(PathError::Traversal)
        );
        assert!(resolve_within(&base, "ok/new.txt").is_ok());
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_file_name("a.png"));
        assert!(!is_plain_file_name("a/b.png"));
        assert!(!is_plain_file_name(".."));
        assert!(!is_plain_file_name(""));
    }
}
