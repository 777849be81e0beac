#!/usr/bin/env bash
# Full GPU check of fastbisenet in one go (fits one 10-minute device call by default):
#   env info -> editable install (no network) -> test suite with compiled Triton (no interpreter)
#   -> pytest bench/ --benchmark-only --benchmark-json OUTDIR/bench.json -> OUTDIR/report.md + PNG.
# Every step's log is tee'd into OUTDIR; later steps run even when earlier ones fail; the exit
# status is non-zero when any step failed (OUTDIR/summary.txt says which).
#
# Usage: bench/gpu_suite.sh OUTDIR [extra pytest args for the benchmark step, e.g. -k end_to_end]
#        bench/gpu_suite.sh --results [...]   writes to bench/results/<device>_<date>/
# Environment:
#   SUITE_BUDGET_S    total wall-clock budget in seconds (default 530)
#   TESTS_TIMEOUT_S   limit of the test-suite step (default 200)
#   SKIP_TESTS=1      skip the test-suite step (benchmarks only); SKIP_INSTALL=1 skips the install
#   FASTBISENET_BENCH_MODE=quick|full and the other FASTBISENET_BENCH_* knobs (bench/common.py);
#   this script defaults FASTBISENET_BENCH_MODE to quick. FASTBISENET_BENCH_BUDGET_S is derived
#   from what is left of SUITE_BUDGET_S unless set.
set -u -o pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTDIR|--results [pytest args...]" >&2
    exit 2
fi
OUT=$1
shift
if [[ "$OUT" == --results ]]; then  # bench/results/<device>_<date>/ (see bench/results/README.md)
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    SLUG=$(echo "${GPU:-unknown-device}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
    OUT="$(dirname "$0")/results/${SLUG}_$(date -u +%Y-%m-%d)"
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-530}
export FASTBISENET_BENCH_MODE=${FASTBISENET_BENCH_MODE:-quick}
unset TRITON_INTERPRET
FAILED=()
: > "$OUT/summary.txt"

elapsed() { echo $(( $(date +%s) - START )); }

step() {  # step NAME COMMAND... : run, tee into OUTDIR/NAME.log, record the status
    local name=$1
    shift
    local t0
    t0=$(date +%s)
    echo "=== [$name] $* ($(elapsed) s elapsed)" | tee -a "$OUT/summary.txt"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== [$name] rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
    if [[ $rc -ne 0 ]]; then
        FAILED+=("$name(rc=$rc)")
    fi
    return 0
}

env_info() {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${FASTBISENET_GIT_COMMIT:-unknown}")"
    git status --short 2>/dev/null | head -50
    nvidia-smi || true
    python - <<'PY'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
}

step env env_info
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    step install python -m pip install --no-deps --no-build-isolation -e .
fi

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    step tests timeout -s INT -k 15 "${TESTS_TIMEOUT_S:-200}" \
        python -m pytest tests -q -p no:cacheprovider --junitxml "$OUT/tests.xml"
fi

LEFT=$(( BUDGET - $(elapsed) - 20 ))  # 20 s for the report
if [[ $LEFT -lt 30 ]]; then
    echo "=== [bench] skipped: only $LEFT s left of SUITE_BUDGET_S=$BUDGET" | tee -a "$OUT/summary.txt"
    FAILED+=("bench(no time left)")
else
    # in-process budget stops starting new rows in time; the hard timeout (SIGINT: pytest still
    # writes the JSON) is the backstop for a row that runs long.
    export FASTBISENET_BENCH_BUDGET_S=${FASTBISENET_BENCH_BUDGET_S:-$(( LEFT - 30 ))}
    step bench timeout -s INT -k 20 "$LEFT" \
        python -m pytest bench/ --benchmark-only -p no:cacheprovider -rs \
        --benchmark-json "$OUT/bench.json" --benchmark-columns=min,median,max,rounds "$@"
fi

if [[ -s "$OUT/bench.json" ]]; then
    step report python bench/report.py "$OUT/bench.json" "$OUT"
else
    echo "=== [report] skipped: no $OUT/bench.json" | tee -a "$OUT/summary.txt"
    FAILED+=("report(no json)")
fi

echo "=== total $(elapsed) s; failed steps: ${FAILED[*]:-none}" | tee -a "$OUT/summary.txt"
[[ ${#FAILED[@]} -eq 0 ]]
