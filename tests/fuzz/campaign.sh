#!/usr/bin/env bash
# tests/fuzz/campaign.sh - a long fuzzing run outside CI, one target at a
# time (one process, nice 10), and its grown corpora minimized for the tree.
#
#   tests/fuzz/campaign.sh BUILD OUT NAME:SECONDS...
#     BUILD  a build folder configured with clang and -DCHAT_FUZZ=ON
#            (build-fuzz/, as `make test` CI=true makes it)
#     OUT    a work folder: OUT/NAME/{corpus,merged,log,merge.log,crash-*}
#     NAME   frame dispatch admin login friend one2one group offline
#   CHAT_FUZZ_KEEP=1 then replaces the target's corpus in tests/fuzz/ with
#   OUT/NAME/merged (the seeds plus what -merge=1 kept of the grown corpus);
#   frame shares corpus/ with dispatch, so only dispatch writes it back.
# One line per target at the end: executions, coverage (libFuzzer's cov:,
# edges), corpus size, crash files.  docs/fuzzing.md has the last run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=$(cd "$1" && pwd)
OUT=$2
shift 2
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

corpus_of() {
    case $1 in
        frame | dispatch) echo "$ROOT/tests/fuzz/corpus" ;;
        *) echo "$ROOT/tests/fuzz/corpus_$1" ;;
    esac
}

summary=()
for arg in "$@"; do
    name=${arg%%:*} secs=${arg##*:}
    bin=$BUILD/tests/fuzz/fuzz_$name
    src=$(corpus_of "$name")
    w=$OUT/$name
    rm -rf "$w"
    mkdir -p "$w/corpus" "$w/merged"
    cp -r "$src/." "$w/corpus/"
    echo "==> fuzz_$name for $secs s" >&2
    nice -n 10 "$bin" -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="$w/" "$w/corpus" >"$w/log" 2>&1 || true
    cp -r "$src/." "$w/merged/"
    nice -n 10 "$bin" -merge=1 "$w/merged" "$w/corpus" >"$w/merge.log" 2>&1
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$w/log")
    cov=$(grep -o 'cov: [0-9]*' "$w/log" | tail -1 | cut -d' ' -f2)
    crashes=$(find "$w" -maxdepth 1 -name 'crash-*' -o -maxdepth 1 -name 'leak-*' \
              -o -maxdepth 1 -name 'timeout-*' | wc -l)
    size=$(du -sk --apparent-size "$w/merged" | cut -f1)
    line="fuzz_$name seconds=$secs execs=${execs:-?} cov=${cov:-?} corpus=$(ls "$w/merged" | wc -l)files/${size}KiB crashes=$crashes"
    summary+=("$line")
    echo "$line" >&2
    if [[ "${CHAT_FUZZ_KEEP:-0}" == 1 && "$name" != frame && "$crashes" == 0 ]]; then
        rm -rf "$src" && cp -r "$w/merged" "$src"
    fi
done
printf '%s\n' "${summary[@]}"
