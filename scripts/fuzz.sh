#!/usr/bin/env bash
# A bounded run of every cargo-fuzz target in fuzz/ (FUZZ_SECONDS each, 20 by
# default: about a minute in all), starting from the seed corpus in the
# repository. New inputs the fuzzer finds go to a temp folder, never into the
# repository. `--sanitizer none` is what runs on stable Rust (the address
# sanitizer needs nightly); libFuzzer still finds panics, overflows checked in
# debug assertions, timeouts and out-of-memory. A crash leaves its input in
# fuzz/artifacts/TARGET/: add it to fuzz/corpus/TARGET/ once fixed, so that
# `cargo test -p comfyume-wire --test fuzz_seeds` keeps it fixed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds="${FUZZ_SECONDS:-20}"
targets=(prompt_validator ws_codec backend_message)
echo "[fuzz] building ${targets[*]} (release, --sanitizer none)"
cargo fuzz build --sanitizer none -O
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    echo "[fuzz] $t for ${seconds}s"
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a leak or a bomb.
    dict=()
    [ -f "dict/$t.dict" ] && dict=(-dict="dict/$t.dict")
    cargo fuzz run --sanitizer none -O "$t" "$work/$t" "corpus/$t" -- "${dict[@]}" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$work/$t.log" 2>&1 || { tail -n 60 "$work/$t.log"; echo "[fuzz] $t FAILED"; exit 1; }
    grep -E '^(Done|stat::number_of_executed_units)' "$work/$t.log" | tail -n 1 | sed "s/^/[fuzz] $t: /"
done
echo "[fuzz] ok"
