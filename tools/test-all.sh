#!/usr/bin/env bash
# Runs every check and test of the project. Installs what a fresh machine
# lacks (as root, from Debian's packages). Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc)
command -v ld >/dev/null || need_apt+=(binutils)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v tc >/dev/null || need_apt+=(iproute2)
if ((${#need_apt[@]})); then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
if [[ "${CI:-}" == "true" && ! -e /dev/kvm ]]; then
    echo "error: /dev/kvm is missing on CI" >&2
    exit 1
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --release -- -D warnings
# Two test threads at a time: each test runs guests in two or three vmm
# processes, and the machine has two cores.
cargo test --workspace --release -- --test-threads=2
