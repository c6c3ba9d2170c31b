#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 60; CI uses a short run, run it longer
#                       (hours) to search deeper.
#   TARGET...           default: every target in fuzz/Cargo.toml.
# FUZZ_SEED=N fixes libFuzzer's seed, so that a short run explores the same
# inputs each time (CI uses it); without it every run explores new ground.
#
# Installs cargo-fuzz when missing, builds the targets once with the nightly
# toolchain and AddressSanitizer, writes the seed corpus (generated from
# code by the make_corpus program) into fuzz/corpus/, and fails if any
# target finds a crash (the input is left in fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(virtio_queue virtio_blk virtio_rng virtio_console virtio_net virtio_vsock mmio_transport serial i8042 boot_image api_request snapshot_state)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "error: a nightly toolchain is needed for cargo-fuzz" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz build
cargo +nightly run --quiet --release --bin make_corpus -- corpus

failed=0
for t in "${targets[@]}"; do
    echo "== fuzz $t for ${secs}s"
    seed_arg=()
    if [ -n "${FUZZ_SEED:-}" ]; then
        seed_arg=(-seed="$FUZZ_SEED")
    fi
    if ! cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 "${seed_arg[@]}" \
        > "target/fuzz-$t.log" 2>&1; then
        echo "FAILED: $t (see fuzz/target/fuzz-$t.log and fuzz/artifacts/$t/)"
        grep -E "panicked|SUMMARY" -A3 "target/fuzz-$t.log" | head -20 || true
        failed=1
    else
        grep -E "^Done|stat::number_of_executed_units" "target/fuzz-$t.log" | head -2 || true
    fi
done
exit $failed
