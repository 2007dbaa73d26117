//! Where the test suite's real frontend is (shared by the test crates that load it;
//! included with `#[path]`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// `$COMFYUME_TEST_FRONTEND_DIR`, else the frontend 1.37.11 that scripts/test.sh installs
/// under target/test-data (it may be missing: see [`frontend_dir`]).
pub fn installed_frontend() -> PathBuf {
    std::env::var_os("COMFYUME_TEST_FRONTEND_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/test-data/frontend/1.37.11"))
}

/// The installed frontend, which the test needs.
pub fn frontend_dir() -> PathBuf {
    let dir = installed_frontend();
    assert!(
        dir.join("index.html").is_file(),
        "the real frontend is not at {}: run scripts/install-frontend.sh target/test-data (scripts/test.sh does)",
        dir.display()
    );
    dir
}
