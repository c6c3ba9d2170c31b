#!/usr/bin/env bash
# Builds the reference VMM and the bench in release mode, installs QEMU
# (Debian's qemu-system-x86) when missing so that its microvm machine runs
# the same guest as a peer, and prints the table.
#
# Usage: scripts/bench.sh [--repeats N] [--iters N] [--snapshots-only | --net-only]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
    else
        echo "qemu-system-x86_64 is not installed: the QEMU column will read n/a" >&2
    fi
fi
cargo build --release --example minimal --example bench
target/release/examples/bench "$@"
