//! Embeds the git commit the binary was built from (`comfyume_build_info`): the
//! `COMFYUME_GIT_COMMIT` variable if set (a build from a source tarball), else `git
//! rev-parse`, else `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Rebuild when HEAD moves: the HEAD file, the branch's ref, and packed refs (only paths
/// that exist: a missing one would make cargo rerun this on every build).
fn watch_head() {
    let mut paths = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(r) = git(&["rev-parse", "--symbolic-full-name", "HEAD"]) {
        paths.push(git(&["rev-parse", "--git-path", &r]));
    }
    paths.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for p in paths.into_iter().flatten() {
        if Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=COMFYUME_GIT_COMMIT");
    let commit = match std::env::var("COMFYUME_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            watch_head();
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    // Only a label value: keep it to safe characters.
    let commit: String = commit
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(64)
        .collect();
    println!("cargo:rustc-env=COMFYUME_GIT_COMMIT={commit}");
}
