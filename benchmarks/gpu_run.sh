#!/usr/bin/env bash
# GPU checks in one go, run from anywhere in the repo on a CUDA machine with $OUT set:
#
#   OUT=/path/to/results bash benchmarks/gpu_run.sh [extra bench_fused_vs_naive.py args...]
#
# Writes to $OUT: env.txt (GPU, versions, commit), pip_install.txt, gpu_tests.txt (pytest -m gpu),
# bench.txt + fused_vs_naive.{json,md} (loss benchmark), train_*.txt + bench_train_*.{json,md} (update-step
# benchmark: Qwen2.5-1.5B full-parameter and Qwen2.5-7B LoRA shapes, packing on/off, longest length
# that fits; skip with SKIP_TRAIN_BENCH=1) and exit_codes.txt. A failing test run does not
# stop the benchmark; the script exits non-zero if either failed. The image has torch preinstalled
# and no network: the package is installed editable with --no-deps --no-build-isolation --no-index
# (`kernels/` only exists as `fastgrpo.kernels` through that install, so it must succeed).
set -uo pipefail
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

commit() {
    git rev-parse HEAD 2>/dev/null && return
    if [ -s COMMIT ]; then head -n1 COMMIT; else echo unknown; fi
}

record() { echo "$1=$2" | tee -a "$OUT/exit_codes.txt"; }
: >"$OUT/exit_codes.txt"

# ------------------------------------------------------------------ environment
{
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(commit)"
    echo "repo: $(pwd)"
    python - <<'EOF'
import importlib.metadata as md
import sys

print("python:", sys.version.split()[0], sys.executable)
for pkg in ("torch", "triton", "transformers", "pytest"):
    try:
        print(f"{pkg}: {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: not installed")
import torch

print("torch.version.cuda:", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
    echo
    nvidia-smi || echo "nvidia-smi failed (rc=$?)"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
        --format=csv || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ------------------------------------------------------------------ install (must work)
python -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/pip_install.txt" 2>&1
pip_rc=$?
record pip_install "$pip_rc"
python -c "import fastgrpo, fastgrpo.kernels; print('fastgrpo from', fastgrpo.__file__)" 2>&1 |
    tee -a "$OUT/pip_install.txt"
import_rc=${PIPESTATUS[0]}
record import "$import_rc"
if [ "$pip_rc" -ne 0 ] || [ "$import_rc" -ne 0 ]; then
    tail -n 30 "$OUT/pip_install.txt"
    echo "install failed: see $OUT/pip_install.txt" >&2
    exit 1
fi

# ------------------------------------------------------------------ GPU tests (keep going on failure)
python -m pytest -m gpu -q tests 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
record gpu_tests "$tests_rc"

# ------------------------------------------------------------------ benchmark
python benchmarks/bench_fused_vs_naive.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
record bench "$bench_rc"

# ------------------------------------------------------------------ update-step benchmark (issue 4)
# Rows land in $OUT/bench_train.{jsonl,csv} as each is measured; tables and plots go to
# $OUT/<gpu>/bench_train_<model>[_lora]_<packed|padded>.{md,png}. Each invocation starts no step
# after TRAIN_BUDGET s (default 420; a step predicted to end past it is skipped too), so each one
# stays under ~500 s and fits one 600 s device call: pick them with TRAIN_BENCHES (a space-separated
# subset of "1.5b_packed 1.5b_padded 7b_lora", the default being all three).
train_rc=0
if [ "${SKIP_TRAIN_BENCH:-0}" != 1 ]; then
    for b in ${TRAIN_BENCHES:-1.5b_packed 1.5b_padded 7b_lora}; do
        case "$b" in
        1.5b_packed | 1.5b_padded)
            packing=on; [ "$b" = 1.5b_padded ] && packing=off
            args=(--model qwen2.5-1.5b --packing "$packing" --lengths 1024 4096 16384 32768
                --find-max --max-length 131072 --granularity 4096) ;;
        7b_lora)
            args=(--model qwen2.5-7b --use-peft --beta 0.04 --packing on --lengths 16384 65536
                --find-max --max-length 262144 --granularity 8192) ;;
        *)
            echo "unknown TRAIN_BENCHES entry: $b" >&2; record "bench_train_$b" 2; train_rc=2; continue ;;
        esac
        python benchmarks/bench_train.py "${args[@]}" --time-budget "${TRAIN_BUDGET:-420}" --out "$OUT" 2>&1 |
            tee "$OUT/train_$b.txt"
        rc=${PIPESTATUS[0]}; record "bench_train_$b" "$rc"; [ "$rc" -eq 0 ] || train_rc=$rc
    done
fi

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
