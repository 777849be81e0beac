#!/usr/bin/env bash
# Run the test suite with one pytest process per test file, TEST_JOBS (default 4) at a time, largest
# files first: on a GPU machine the tests are dominated by single-threaded Triton compiles, so parallel
# files cut the wall time. Writes OUTDIR/tests/<file>.log and .xml (JUnit) per file, prints
# "<file> rc=<status>" per file, and exits non-zero when any file failed (pytest status 5, a file
# without tests, counts as passed). Used by bench/gpu_suite.sh.
#
# Each pytest runs under its own `timeout -s INT -k 5 TEST_FILE_TIMEOUT_S` (default 600), so none
# outlives the step: an interrupted pytest still writes its log and JUnit XML, one stuck in C code (a
# compile, a CUDA sync) is killed 5 s later.
#
# Usage: bench/run_tests.sh OUTDIR [TESTS_DIR (default tests)]
set -u -o pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTDIR [TESTS_DIR]" >&2
    exit 2
fi
mkdir -p "$1/tests"
OUTDIR=$(cd "$1" && pwd)
TESTS_DIR=${2:-tests}
# shellcheck disable=SC2016  # $0/$1 expand in the inner sh: the out directory and the test file
ls -S "$TESTS_DIR"/test_*.py | xargs -P "${TEST_JOBS:-4}" -I{} sh -c '
    n=$(basename "$1" .py)
    timeout -s INT -k 5 "${TEST_FILE_TIMEOUT_S:-600}" \
        "${PYTHON:-python3}" -m pytest "$1" -q -p no:cacheprovider --junitxml "$0/tests/$n.xml" > "$0/tests/$n.log" 2>&1
    rc=$?
    echo "$n rc=$rc"
    [ $rc -eq 0 ] || [ $rc -eq 5 ]' "$OUTDIR" {}
rc=$?
tail -n 3 "$OUTDIR"/tests/*.log
exit "$rc"
