//! Issue 13 item 8: no blocking file-system call on the async runtime's threads.
//! A slow disk (or a participant's folder with 10,000 files) must stall one of
//! tokio's blocking threads, not every participant's requests. The handlers
//! reach the disk only through `tokio::fs` and `fsx` (whose blocking work runs
//! in `spawn_blocking`); this holds the request-path sources to that.

use std::path::Path;

/// Calls that block the calling thread on the file system.
const BLOCKING: &[&str] = &[
    "std::fs::",
    ".canonicalize()",
    ".exists()",
    ".is_file()",
    ".is_dir()",
    ".symlink_metadata()",
    "read_dir(",
    "resolve_within_blocking(",
];

/// The request-path sources (the files other engineers own are theirs to hold to it).
const HANDLERS: &[&str] = &[
    "src/api/files.rs",
    "src/api/assets.rs",
    "src/api/userdata.rs",
    "src/api/settings.rs",
    "src/api/queue.rs",
    "src/api/system.rs",
    "src/api/object_info.rs",
    "src/api/mod.rs",
    "src/paths.rs",
    "src/error.rs",
    "src/headers.rs",
    "src/limits.rs",
    "src/sniff.rs",
    "src/lib.rs",
];

/// The part of a source file before its unit tests (tests may block).
fn non_test(src: &str) -> &str {
    src.split("#[cfg(test)]").next().unwrap_or(src)
}

#[test]
fn request_handlers_never_block_on_the_file_system() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for file in HANDLERS {
        let src = std::fs::read_to_string(root.join(file)).unwrap();
        for (n, line) in non_test(&src).lines().enumerate() {
            // A type name is no call.
            let code = line
                .split("//")
                .next()
                .unwrap_or("")
                .replace("std::fs::Metadata", "Metadata");
            for pat in BLOCKING {
                // paths.rs runs its link checks inside spawn_blocking (see check_links).
                let allowed = *file == "src/paths.rs"
                    && (line.contains("canonicalize") || line.contains("resolve_within_blocking"));
                if code.contains(pat) && !allowed {
                    found.push(format!("{file}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "blocking file-system calls on the runtime:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scan_sees_what_it_looks_for() {
    // A scan that cannot fail proves nothing: the old handlers' calls are caught.
    let old = "if !path.is_file() {\n    let text = std::fs::read_to_string(\"/proc/meminfo\");\n}";
    let hits = BLOCKING.iter().filter(|p| old.contains(*p)).count();
    assert_eq!(hits, 2);
}
