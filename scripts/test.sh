#!/usr/bin/env bash
# test.sh - THE test command: installs the dependencies, builds rosterd with
# ASan+UBSan (build-test), the libFuzzer targets with clang (build-fuzz), a
# ThreadSanitizer rosterd (build-tsan) and a plain RelWithDebInfo rosterd for
# valgrind (build-plain), then runs every test with ctest: unit tests and
# fuzzers (2 in parallel, 5 million runs per fuzzer), then the integration
# tests serially against private PostgreSQL, RabbitMQ and SMTP servers
# (tests/fixture/servers.sh, stopped whatever happens). The integration
# tests get ROSTERD_TSAN_BIN (the worker-thread test of test_outbox.py runs
# the TSan build) and ROSTERD_PLAIN_BIN (test_valgrind.py).
# Exit status: 0 when everything passed.
#
#   sudo bash scripts/test.sh               everything (CI runs this)
#   sudo bash scripts/test.sh -L unit       only what ctest selects (args go
#                                           to one serial ctest run)
# Environment: FUZZ_RUNS (default 5000000 per fuzzer), FUZZ_MAX_SECONDS
# (default 1500: a fuzzer not done by then fails), SKIP_DEPS=1 (do not run
# install-deps.sh), JOBS (build parallelism, default nproc), CTEST_JOBS
# (parallel unit/fuzz tests, default 2).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BUILD=$ROOT/build-test
FUZZ_BUILD=$ROOT/build-fuzz
TSAN_BUILD=$ROOT/build-tsan
PLAIN_BUILD=$ROOT/build-plain
SERVERS_DIR=$BUILD/test-servers
JOBS=${JOBS:-$(nproc)}
CTEST_JOBS=${CTEST_JOBS:-2}
T0=$(date +%s)

say() { printf '\n=== test.sh: %s\n' "$*"; }

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export PYTHONDONTWRITEBYTECODE=1

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -f "$SERVERS_DIR/ports" ]; then
		bash tests/fixture/servers.sh stop "$SERVERS_DIR" >/dev/null 2>&1 || true
	fi
	exit $rc
}
trap cleanup EXIT
trap 'echo "test.sh: interrupted" >&2; exit 130' INT TERM

if [ "${SKIP_DEPS:-0}" != 1 ]; then
	say "dependencies"
	bash scripts/install-deps.sh
fi

# --- fuzzers (clang, libFuzzer) ------------------------------------------------
fuzz_caps=("-DROSTERD_FUZZ_RUNS=${FUZZ_RUNS:-5000000}" "-DROSTERD_FUZZ_MAX_SECONDS=${FUZZ_MAX_SECONDS:-1500}")
fuzz_args=(-DROSTERD_FUZZ_DIR= "${fuzz_caps[@]}")
shopt -s nullglob
fuzz_src=(tests/fuzz/fuzz_*.c)
shopt -u nullglob
if [ ${#fuzz_src[@]} -gt 0 ]; then
	say "build fuzzers (${#fuzz_src[@]}) in build-fuzz"
	CC=clang cmake -S . -B "$FUZZ_BUILD" -DROSTERD_FUZZ=ON -DROSTERD_TESTS=OFF \
		-DROSTERD_SANITIZE=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
	targets=()
	for f in "${fuzz_src[@]}"; do
		n=${f##*/}
		targets+=(--target "${n%.c}")
	done
	cmake --build "$FUZZ_BUILD" -j "$JOBS" "${targets[@]}"
	fuzz_args=("-DROSTERD_FUZZ_DIR=$FUZZ_BUILD" "${fuzz_caps[@]}")
else
	say "no tests/fuzz/fuzz_*.c: no fuzzers"
fi

# --- rosterd with ThreadSanitizer, and plain (for valgrind) -------------------
say "build build-tsan (RelWithDebInfo, TSan) and build-plain (RelWithDebInfo)"
cmake -S . -B "$TSAN_BUILD" -DROSTERD_TSAN=ON -DROSTERD_SANITIZE=OFF -DROSTERD_TESTS=OFF \
	-DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$TSAN_BUILD" -j "$JOBS" --target rosterd
cmake -S . -B "$PLAIN_BUILD" -DROSTERD_SANITIZE=OFF -DROSTERD_TESTS=OFF \
	-DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$PLAIN_BUILD" -j "$JOBS" --target rosterd
export ROSTERD_TSAN_BIN=$TSAN_BUILD/rosterd
export ROSTERD_PLAIN_BIN=$PLAIN_BUILD/rosterd

# --- rosterd with ASan+UBSan -----------------------------------------------------
say "build build-test (Debug, ASan+UBSan)"
cmake -S . -B "$BUILD" -DROSTERD_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug -DROSTERD_TESTS=ON "${fuzz_args[@]}"
cmake --build "$BUILD" -j "$JOBS"

# Servers left behind by an interrupted earlier run.
bash tests/fixture/servers.sh stop "$SERVERS_DIR" >/dev/null 2>&1 || true

# --- tests -----------------------------------------------------------------------
rc=0
if [ $# -gt 0 ]; then
	say "ctest $*"
	ctest --test-dir "$BUILD" --output-on-failure "$@" || rc=$?
else
	say "unit tests and fuzzers (ctest -j$CTEST_JOBS)"
	rc1=0
	ctest --test-dir "$BUILD" --output-on-failure -LE integration -j "$CTEST_JOBS" \
		2>&1 | tee "$BUILD/ctest-unit.log" || rc1=$?
	say "integration tests (serial)"
	rc2=0
	ctest --test-dir "$BUILD" --output-on-failure -L integration \
		2>&1 | tee "$BUILD/ctest-integration.log" || rc2=$?
	[ $rc1 = 0 ] || rc=$rc1
	[ $rc2 = 0 ] || rc=$rc2
	say "unit+fuzz: $([ $rc1 = 0 ] && echo passed || echo "FAILED ($rc1)"); integration: $([ $rc2 = 0 ] && echo passed || echo "FAILED ($rc2)")"
fi
say "$([ $rc = 0 ] && echo "ALL TESTS PASSED" || echo "TESTS FAILED (exit $rc)") in $(($(date +%s) - T0))s"
# One closing line over both ctest runs, for CI: "tests: N passed, N failed"
if [ $# -eq 0 ]; then
	tot=0 bad=0
	for f in "$BUILD/ctest-unit.log" "$BUILD/ctest-integration.log"; do
		line=$(grep -E 'tests passed, [0-9]+ tests failed out of [0-9]+' "$f" | tail -1 || true)
		n=$(echo "$line" | sed -nE 's/.* ([0-9]+) tests failed out of ([0-9]+).*/\2/p')
		b=$(echo "$line" | sed -nE 's/.* ([0-9]+) tests failed out of ([0-9]+).*/\1/p')
		if [ -z "$n" ]; then bad=$((bad + 1)); continue; fi
		tot=$((tot + n)); bad=$((bad + b))
	done
	[ $rc = 0 ] || [ $bad -gt 0 ] || bad=1
	echo "tests: $((tot > bad ? tot - bad : 0)) passed, $bad failed"
fi
exit $rc
