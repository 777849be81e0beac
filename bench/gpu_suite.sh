#!/usr/bin/env bash
# Full GPU check of fastbisenet in one go (fits one 10-minute device call by default):
#   env info -> editable install (no network) -> import check (stops here if fastbisenet does not
#   import) -> test suite with compiled Triton (no interpreter)
#   -> the benchmark stages (bench/common.py STAGES), each its own pytest process (a CUDA error in one
#      cannot poison the next) writing OUTDIR/bench-<stage>.json -> OUTDIR/report.md + PNG from all of them.
# Every step's log is tee'd into OUTDIR; later steps run even when earlier ones fail (except the
# import check); the exit status is non-zero when any step failed (OUTDIR/summary.txt says which, and
# report.md quotes it at the top). A run with end-to-end inference rows but no end_to_end.png (matplotlib
# missing) fails the report step.
#
# Usage: bench/gpu_suite.sh OUTDIR [extra pytest args for each benchmark stage, e.g. -k end_to_end]
#        bench/gpu_suite.sh --results [...]   writes to bench/results/<device>_<date>/, or
#                                             <device>_<date>_2/, _3/, ... when that exists
# Environment:
#   SUITE_BUDGET_S    total wall-clock budget in seconds (default 530)
#   TESTS_TIMEOUT_S   limit of the test-suite step (default 200)
#   TEST_JOBS         test files run in parallel, one pytest process each (default 4; bench/run_tests.sh);
#                     log and JUnit XML per file in OUTDIR/tests/; SUITE_TESTS_DIR replaces tests/
#   SKIP_TESTS=1      skip the test-suite step (benchmarks only); SKIP_INSTALL=1 skips the install
#   SUITE_BENCH_STAGES  benchmark stages to run, in order (default "headline ab sizes ops"; "more": the rest;
#                     "none" runs no benchmark)
#   SUITE_PACK        a .tgz path outside OUTDIR: OUTDIR is packed there after every step, so a run cut off
#                     by a time limit still leaves everything up to its last finished step (the device tool
#                     returns at most 8 files: pack into the tool's $OUT/run.tgz, OUTDIR elsewhere)
#   RESULTS_ROOT      parent directory for --results (default bench/results)
#   SUITE_DRY_RUN=1   print the output directory that would be used and exit (creates nothing)
#   FASTBISENET_GIT_COMMIT  commit to record when there is no .git (e.g. on a remote device): $(git rev-parse HEAD),
#                     with +dirty when the tree sent has uncommitted changes
#   PYTHON            interpreter (default python3)
#   The device tool may lower a call's time limit when little device time is left: keep SUITE_BUDGET_S about
#   60 s under the call's limit_s, or the stage in flight loses its rows (pytest-benchmark writes at exit).
#   FASTBISENET_BENCH_MODE=quick|full and the other FASTBISENET_BENCH_* knobs (bench/common.py);
#   this script defaults FASTBISENET_BENCH_MODE to full (the stages pick the rows).
#   FASTBISENET_BENCH_BUDGET_S is derived per stage from what is left of SUITE_BUDGET_S unless set.
set -u -o pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTDIR|--results [pytest args...]" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$1
shift
if [[ "$OUT" == --results ]]; then  # <device>_<date>[_N]/ (see bench/results/README.md)
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    SLUG=$(echo "${GPU:-unknown-device}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
    BASE="${RESULTS_ROOT:-$HERE/results}/${SLUG:-unknown-device}_$(date -u +%Y-%m-%d)"
    OUT=$BASE
    N=2
    while [[ -e "$OUT" ]]; do  # a second run on the same day and device: _2, _3, ...
        OUT="${BASE}_$N"
        N=$((N + 1))
    done
fi
if [[ "${SUITE_DRY_RUN:-0}" == 1 ]]; then
    echo "outdir: $OUT"
    exit 0
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ -n "${SUITE_PACK:-}" ]]; then
    mkdir -p "$(dirname "$SUITE_PACK")"
    SUITE_PACK="$(cd "$(dirname "$SUITE_PACK")" && pwd)/$(basename "$SUITE_PACK")"
    if [[ "$SUITE_PACK" == "$OUT"/* ]]; then
        echo "SUITE_PACK ($SUITE_PACK) must be outside OUTDIR ($OUT): the archive would pack itself" >&2
        exit 2
    fi
fi
cd "$HERE/.."

START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-530}
export FASTBISENET_BENCH_MODE=${FASTBISENET_BENCH_MODE:-full}
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1  # a stage cut off by a time limit keeps its log
PY=${PYTHON:-python3}  # the device image's PyTorch interpreter is a plain python3
export PYTHON=$PY  # bench/run_tests.sh
FAILED=()
: > "$OUT/summary.txt"

elapsed() { echo $(( $(date +%s) - START )); }

note() { echo "=== $*" | tee -a "$OUT/summary.txt"; }

pack() {  # OUTDIR -> SUITE_PACK (atomically), when asked for; a failure is noted, not fatal
    [[ -n "${SUITE_PACK:-}" ]] || return 0
    if ! tar czf "$SUITE_PACK.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" 2> "$SUITE_PACK.err" \
            || ! mv -f "$SUITE_PACK.part" "$SUITE_PACK"; then
        note "[pack] failed: $(tr '\n' ' ' < "$SUITE_PACK.err")"
    fi
    rm -f "$SUITE_PACK.err"
}

finish() {
    note "total $(elapsed) s; failed steps: ${FAILED[*]:-none}"
    pack
    [[ ${#FAILED[@]} -eq 0 ]]
    exit $?
}

step() {  # step NAME COMMAND... : run, tee into OUTDIR/NAME.log, record the status; returns it
    local name=$1
    shift
    local t0
    t0=$(date +%s)
    note "[$name] $* ($(elapsed) s elapsed)"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    note "[$name] rc=$rc in $(( $(date +%s) - t0 )) s"
    if [[ $rc -ne 0 ]]; then
        FAILED+=("$name(rc=$rc)")
    fi
    pack
    return "$rc"
}

bench_stage() {  # bench_stage STAGE LIMIT_S [pytest args]: one stage's rows; "no rows selected" (5) is no failure
    local stage=$1 limit=$2
    shift 2
    FASTBISENET_BENCH_STAGES=$stage timeout -s INT -k 20 "$limit" \
        "$PY" -m pytest bench/ --benchmark-only -p no:cacheprovider -rs \
        --benchmark-json "$OUT/bench-$stage.json" --benchmark-columns=min,median,max,rounds "$@"
    local rc=$?
    [[ $rc -eq 5 ]] && return 0
    return "$rc"
}

env_info() {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    # FASTBISENET_GIT_COMMIT when given (as fastbisenet.benchmark.workloads.git_commit does), else git; a
    # device copy has no .git, so pass the commit there
    echo "commit: ${FASTBISENET_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git; set FASTBISENET_GIT_COMMIT)")}"
    git status --short 2>/dev/null | head -50
    nvidia-smi || true
    "$PY" - <<'PY'
import platform
from importlib import metadata

import torch

print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for dist in ("triton", "pytest", "pytest-benchmark", "hypothesis", "matplotlib", "numpy"):
    try:
        print(dist, metadata.version(dist))
    except metadata.PackageNotFoundError:
        print(dist, "MISSING")
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties()
    print("L2 cache bytes", getattr(props, "L2_cache_size", "unknown"))
PY
}

step env env_info
if [[ -z "${FASTBISENET_GIT_COMMIT:-}" ]] && ! git rev-parse HEAD > /dev/null 2>&1; then
    note "[env] commit unknown: pass FASTBISENET_GIT_COMMIT=\$(git rev-parse HEAD) (+dirty with local changes)"
fi
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    step install "$PY" -m pip install --no-deps --no-build-isolation --disable-pip-version-check -e .
fi
# the package and its kernels must come from this checkout (another install would be benchmarked silently)
if ! step import "$PY" -c "
import pathlib, sys
import fastbisenet, fastbisenet.kernels
root = pathlib.Path.cwd().resolve()
pkg, kernels = (pathlib.Path(m.__file__).resolve().parent for m in (fastbisenet, fastbisenet.kernels))
print('fastbisenet imports from', pkg, 'kernels from', kernels)
sys.exit(0 if (pkg, kernels) == (root / 'fastbisenet', root / 'kernels') else f'not this checkout ({root})')
"; then
    note "stopping: fastbisenet does not import from this checkout (see import.log); tests and benchmarks would only fail"
    finish
fi

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    # each file's own timeout fires first (and kills what ignores SIGINT); the step's is the backstop
    export TEST_FILE_TIMEOUT_S=$(( ${TESTS_TIMEOUT_S:-200} - 15 ))
    step tests timeout -s INT -k 15 "${TESTS_TIMEOUT_S:-200}" \
        bash "$HERE/run_tests.sh" "$OUT" "${SUITE_TESTS_DIR:-tests}"
fi

USER_BENCH_BUDGET=${FASTBISENET_BENCH_BUDGET_S:-}
JSONS=()  # this run's stage JSONs, for the report
STAGES=${SUITE_BENCH_STAGES:-headline ab sizes ops}
[[ "$STAGES" == none ]] && STAGES=""
for STAGE in ${STAGES//,/ }; do
    LEFT=$(( BUDGET - $(elapsed) - 20 ))  # 20 s for the report
    if [[ $LEFT -lt 30 ]]; then
        note "[bench-$STAGE] skipped: only $LEFT s left of SUITE_BUDGET_S=$BUDGET"
        FAILED+=("bench-$STAGE(no time left)")
        continue
    fi
    # in-process budget stops starting new rows in time; the hard timeout (SIGINT: pytest still
    # writes the JSON) is the backstop for a row that runs long.
    export FASTBISENET_BENCH_BUDGET_S=${USER_BENCH_BUDGET:-$(( LEFT - 30 ))}
    rm -f "$OUT/bench-$STAGE.json"  # a JSON left by an earlier run into OUTDIR is not this run's
    step "bench-$STAGE" bench_stage "$STAGE" "$LEFT" "$@"
    [[ -s "$OUT/bench-$STAGE.json" ]] && JSONS+=("$OUT/bench-$STAGE.json")
done

if [[ ${#JSONS[@]} -gt 0 ]]; then
    # report.py exits 1 when there are end-to-end inference rows but no PNG (matplotlib missing)
    step report "$PY" bench/report.py "${JSONS[@]}" "$OUT"
elif [[ -n "$STAGES" ]]; then
    note "[report] skipped: no OUTDIR/bench-<stage>.json with content (no benchmark row ran)"
    FAILED+=("report(no json)")
fi

finish
