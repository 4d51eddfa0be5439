#!/usr/bin/env bash
# The one thing to run when a CUDA GPU is at hand: the test suite on the compiled kernels (not
# Triton's interpreter), then the full benchmark report. About 8 minutes at most on an H200.
#
#   benchmarks/gpu_check.sh [OUTPUT_DIR]             default: bench-out/gpu-check-<UTC time>
#   benchmarks/gpu_check.sh --rehearse [OUTPUT_DIR]  every step on the CPU with tiny settings,
#                                                    to check the script itself without a GPU
#
# Needs no network and installs nothing: the package is staged in a temporary folder and put on
# PYTHONPATH (in the source tree, the kernels live outside the package folder). Uses python3, or
# $PYTHON. Exit status: 0 all steps passed, 1 a step failed, 2 no GPU (nothing was run).

set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
rehearse=0
if [[ "${1:-}" == "--rehearse" ]]; then
    rehearse=1
    shift
fi
out="${1:-$repo/bench-out/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"

# Time limits per step, in seconds; together under 8 minutes.
check_limit=20
gate_limit=60
tests_limit=190
report_limit=200
# The report stops starting new cases after this long, so that it always writes its files.
report_budget=150

say() { printf '\n== %s\n' "$*"; }

# --- 1. refuse at once without a GPU -------------------------------------------------------------
if (( ! rehearse )); then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu_check: no CUDA GPU here (nvidia-smi not found); nothing was run." >&2
        exit 2
    fi
    if ! timeout "$check_limit" "$python" -c \
        'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: PyTorch sees no CUDA GPU (torch.cuda.is_available() is false);" \
            "nothing was run." >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

mkdir -p "$out"
out="$(cd "$out" && pwd)"
status=0

# --- 2. stage the package ----------------------------------------------------------------------
# The source tree keeps the kernels in kernels/, installed as gmp_triton.kernels: copy both into
# one package folder. Every step runs from inside the stage, so that the source tree's own
# gmp_triton/ (without its kernels) is never the one imported.
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp -R "$repo/gmp_triton" "$stage/gmp_triton"
rm -rf "$stage/gmp_triton/kernels"
cp -R "$repo/kernels" "$stage/gmp_triton/kernels"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
# The kernels must be compiled for the GPU, never interpreted.
unset TRITON_INTERPRET
cd "$stage" || exit 1

say "package"
if ! imported="$("$python" -c 'import gmp_triton; print(gmp_triton.__file__)')" \
    || [[ "$imported" != "$stage/"* ]]; then
    echo "gpu_check: the staged package is not the one Python imports (got: ${imported:-nothing})" >&2
    exit 1
fi
"$python" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")'

# --- 3. the GPU-code gate, which also fills Triton's cache ----------------------------------------
# It compiles every variant of the benchmark maps on all cores, with the JIT's own cache keys,
# so the tests and the report below find most kernels compiled.
say "GPU code (limit ${gate_limit}s)"
gate_args=()
if (( rehearse )); then
    gate_args=(--arch 90 --dtypes fp32 --shapes "ResNet-50 head")
fi
timeout "$gate_limit" "$python" -m gmp_triton gpu-code ${gate_args[@]+"${gate_args[@]}"} --markdown "$out/gpu_code.md" \
    --json "$out/gpu_code.json" 2>&1 | tee "$out/gpu_code.log"
gate_status=${PIPESTATUS[0]}
if (( gate_status != 0 )); then
    echo "gpu_check: the GPU-code gate failed (status $gate_status; 124 means the time limit); see $out/gpu_code.md"
    status=1
fi

# --- 4. the test suite on the compiled kernels ---------------------------------------------------
tests=("$repo/tests")
if (( rehearse )); then
    # The CUDA tests skip on the CPU; the full suite would run this script's own test again.
    tests=("$repo/tests/test_cuda.py")
fi
say "tests (limit ${tests_limit}s)"
timeout "$tests_limit" "$python" -m pytest "${tests[@]}" --rootdir "$repo" -q -p no:cacheprovider \
    --junitxml "$out/tests.xml" 2>&1 | tee "$out/tests.log"
tests_status=${PIPESTATUS[0]}
if (( tests_status != 0 )); then
    echo "gpu_check: the tests failed (status $tests_status; 124 means the time limit); see $out/tests.log"
    status=1
fi

# --- 5. the full benchmark report ----------------------------------------------------------------
report_args=(--device cuda --compile dynamic --time-budget "$report_budget" --warmup-ms 5 --rep-ms 25)
if (( rehearse )); then
    report_args=(--device cpu --quick --providers eager_adaptive --cpu-min-time 0.01 --no-gpu-code)
fi
say "benchmark report (limit ${report_limit}s)"
timeout "$report_limit" "$python" -m gmp_triton bench "${report_args[@]}" --out "$out" 2>&1 \
    | tee "$out/bench.log"
report_status=${PIPESTATUS[0]}
if (( report_status != 0 )); then
    echo "gpu_check: the report failed (status $report_status; 124 means the time limit); see $out/bench.log"
    status=1
fi

say "summary"
echo "gate:   status $gate_status; $(tail -n 1 "$out/gpu_code.log")"
echo "tests:  status $tests_status ($(grep -Eo '[0-9]+ (passed|failed|skipped|error)[a-z]*' "$out/tests.log" | tr '\n' ' '))"
echo "report: status $report_status; files in $out:"
ls "$out"
exit "$status"
