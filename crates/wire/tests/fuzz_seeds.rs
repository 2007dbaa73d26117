//! The fuzz targets of `fuzz/` (cargo-fuzz, run for a bounded time by
//! `scripts/test.sh`), also run in every `cargo test`: each target over its
//! whole seed corpus (which keeps every input a fuzz run ever crashed on),
//! then over a bounded proptest loop of random and mutated inputs.

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::PathBuf;

use proptest::prelude::*;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 3] = [
    ("prompt_validator", targets::prompt_validator),
    ("ws_codec", targets::ws_codec),
    ("backend_message", targets::backend_message),
];

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn run(target: Target, name: &str, data: &[u8]) {
    let result = std::panic::catch_unwind(|| target(data));
    assert!(
        result.is_ok(),
        "{name} panicked on {:?}",
        String::from_utf8_lossy(data)
    );
}

#[test]
fn every_seed_passes_every_target() {
    for (name, target) in TARGETS {
        let corpus = seeds(name);
        assert!(corpus.len() >= 5, "{name}: {} seeds", corpus.len());
        for data in &corpus {
            run(target, name, data);
        }
    }
}

/// A seed with a few bytes changed, inserted or cut (what a fuzzer does first).
fn mutated() -> impl Strategy<Value = (usize, usize, Vec<u8>)> {
    (
        0..3usize,
        any::<prop::sample::Index>(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8),
    )
        .prop_map(|(t, pick, edits)| {
            let (name, _) = TARGETS[t];
            let corpus = seeds(name);
            let mut data = corpus[pick.index(corpus.len())].clone();
            for (at, byte, op) in edits {
                let i = if data.is_empty() {
                    0
                } else {
                    at.index(data.len())
                };
                match op {
                    0 if !data.is_empty() => data[i] = byte,
                    1 => data.insert(i, byte),
                    _ if !data.is_empty() => {
                        data.truncate(i);
                    }
                    _ => data.push(byte),
                }
            }
            (t, pick.index(1000), data)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn mutated_seeds_never_panic((t, _, data) in mutated()) {
        let (name, target) = TARGETS[t];
        run(target, name, &data);
    }

    #[test]
    fn random_bytes_never_panic(t in 0..3usize, data in prop::collection::vec(any::<u8>(), 0..256)) {
        let (name, target) = TARGETS[t];
        run(target, name, &data);
    }
}
