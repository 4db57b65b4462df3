#!/usr/bin/env bash
# run.sh BINARY CORPUS_DIR SECONDS: run one libFuzzer target for a bounded
# time on a scratch copy of its seed corpus (the checked-in seeds are never
# written to), with the memory limits the decoder promises to respect:
# no single allocation over 64 MiB, no more than 2 GiB resident.
# Prints "fuzz: NAME runs=N crashes=N" and exits non-zero on any crash,
# leak, timeout or OOM; the reproducer and the log are then kept in
# ${FUZZ_ARTIFACTS:-/tmp}/rosterd-fuzz-NAME-PID/ and their path printed.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 BINARY CORPUS_DIR SECONDS" >&2
  exit 2
fi
bin=$1
seeds=$2
secs=$3
name=$(basename "$bin")

if [ ! -x "$bin" ]; then
  echo "fuzz: $name: no such binary: $bin" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/rosterd-fuzz.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/corpus" "$work/artifacts"
if [ -d "$seeds" ]; then
  find "$seeds" -maxdepth 1 -type f -exec cp {} "$work/corpus/" \;
fi

# UBSan findings abort (also if the binary was built without
# -fno-sanitize-recover); LeakSanitizer runs at the end of every input.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}

set +e
"$bin" \
  -max_total_time="$secs" \
  -malloc_limit_mb=64 \
  -rss_limit_mb=2048 \
  -timeout=10 \
  -max_len=65536 \
  -print_final_stats=1 \
  -artifact_prefix="$work/artifacts/" \
  "$work/corpus" >"$work/log" 2>&1
rc=$?
set -e

runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$work/log" | tail -n 1)
crashes=$(find "$work/artifacts" -type f | wc -l)
echo "fuzz: $name runs=${runs:-0} crashes=$crashes"

if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ] || [ -z "$runs" ]; then
  keep="${FUZZ_ARTIFACTS:-/tmp}/rosterd-fuzz-$name-$$"
  mkdir -p "$keep"
  cp "$work/log" "$keep/log"
  find "$work/artifacts" -type f -exec cp {} "$keep/" \;
  echo "fuzz: $name failed (exit $rc); log and reproducers in $keep" >&2
  tail -n 40 "$work/log" >&2
  exit 1
fi
