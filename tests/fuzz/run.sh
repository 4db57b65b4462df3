#!/usr/bin/env bash
# run.sh BINARY CORPUS_DIR RUNS [MAX_SECONDS]: run one libFuzzer target for
# RUNS executions (default in the test command: 5,000,000) on a scratch copy
# of its seed corpus (the checked-in seeds are never written to), with the
# memory limits the decoder promises to respect: no single allocation over
# 64 MiB, no more than 2 GiB resident. MAX_SECONDS (default 1500) only caps
# a runaway: a target that has not reached RUNS by then FAILS (too slow for
# the promised number of runs), it does not pass quietly.
# Extra libFuzzer flags of a target (e.g. a smaller -max_len) may be given
# in tests/fuzz/NAME.options (one line next to the source; only -max_len=N
# and -runs=N are read; -runs=N caps RUNS for a target whose inputs are
# slow, so that it finishes well inside MAX_SECONDS on a slow machine).
# Prints "fuzz: NAME runs=N crashes=N seconds=N" and exits non-zero on any
# crash, leak, timeout, OOM or too few runs; the reproducer and the log are
# then kept in ${FUZZ_ARTIFACTS:-/tmp}/rosterd-fuzz-NAME-PID/ and their path
# printed.
set -euo pipefail

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
  echo "usage: $0 BINARY CORPUS_DIR RUNS [MAX_SECONDS]" >&2
  exit 2
fi
bin=$1
seeds=$2
want_runs=$3
secs=${4:-1500}
name=$(basename "$bin")
opts_file="$(dirname "$0")/$name.options"
extra=()
if [ -f "$opts_file" ]; then
  read -r -a extra <"$opts_file"
fi
max_len=-max_len=65536
for o in "${extra[@]}"; do
  case $o in
    -max_len=*) max_len=$o ;;
    -runs=*) if [ "${o#-runs=}" -lt "$want_runs" ]; then want_runs=${o#-runs=}; fi ;;
  esac
done

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

t0=$(date +%s)
set +e
"$bin" \
  -runs="$want_runs" \
  -max_total_time="$secs" \
  -malloc_limit_mb=64 \
  -rss_limit_mb=2048 \
  -timeout=10 \
  "$max_len" \
  -print_final_stats=1 \
  -artifact_prefix="$work/artifacts/" \
  "$work/corpus" >"$work/log" 2>&1
rc=$?
set -e
took=$(($(date +%s) - t0))

runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$work/log" | tail -n 1)
crashes=$(find "$work/artifacts" -type f | wc -l)
echo "fuzz: $name runs=${runs:-0} crashes=$crashes seconds=$took"

short=0
if [ -n "$runs" ] && [ "$runs" -lt "$want_runs" ]; then
  echo "fuzz: $name: only $runs of $want_runs runs within ${secs}s" >&2
  short=1
fi
if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ] || [ -z "$runs" ] || [ "$short" -ne 0 ]; then
  keep="${FUZZ_ARTIFACTS:-/tmp}/rosterd-fuzz-$name-$$"
  mkdir -p "$keep"
  cp "$work/log" "$keep/log"
  find "$work/artifacts" -type f -exec cp {} "$keep/" \;
  echo "fuzz: $name failed (exit $rc); log and reproducers in $keep" >&2
  tail -n 40 "$work/log" >&2
  exit 1
fi
