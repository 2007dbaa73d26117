//! Shared by the test crates that start another package's binary (included with
//! `#[path]`: test crates cannot depend on each other's test code).

use std::path::{Path, PathBuf};

/// A binary of another workspace package: `$<NAME>_BIN` if set, else the one cargo
/// built beside this test (`cargo test --workspace` builds every package's binaries),
/// built now if missing or older than the sources of `crates` (cargo only builds a
/// package's own binaries for its tests).
pub fn workspace_bin(package: &str, bin: &str, crates: &[&str]) -> PathBuf {
    let var = format!("{}_BIN", bin.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let path = exe.parent().unwrap().parent().unwrap().join(bin);
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let stale = match built {
        None => true,
        Some(t) => crates
            .iter()
            .any(|c| newest_source(&root.join("crates").join(c).join("src")) > Some(t)),
    };
    if stale {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.current_dir(&root).status().expect("cargo runs");
        assert!(status.success(), "cargo build -p {package} failed");
    }
    assert!(path.exists(), "{} missing", path.display());
    path
}

fn newest_source(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest_source(&p)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}
