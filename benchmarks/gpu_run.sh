#!/usr/bin/env bash
# GPU checks and benchmarks. The default plan fits ONE device call of at most 8 minutes
# (timeout_s=480: ~20 s install, tests <= 180 s, ops-7b <= ~240 s), so a 15-minute device
# window leaves room for start-up and one rerun:
#
#   bash benchmarks/gpu_wheels.sh && git rev-parse HEAD >COMMIT   # here: peers as wheels, the commit
#   OUT=/path/to/out bash benchmarks/gpu_run.sh [STAGE...]           # there, carrying .whl and COMMIT
#
# Stages (default: tests ops-7b):
#   tests        the @gpu tests and the kernel suites natively (every path, awkward shapes, all
#                dtypes), cut off at TESTS_BUDGET (180 s)
#   ops-7b       fastgrpo bench ops at the Qwen2.5-7B head, N = 4K/16K/64K, trainable and frozen head,
#                fwd+bwd: every fastgrpo path against naive, Liger, TRL and the GEMM floors (4-GEMM
#                and 3-GEMM); no new row starts after STAGE_BUDGET (200 s)
#   ops-1.5b     the same for Qwen2.5-1.5B          ops-8b   the same for Llama-3-8B   (second call)
#   train        fastgrpo bench train (TRAIN_BENCHES: "1.5b_packed 1.5b_padded 7b_lora") (own call)
#   trl          fastgrpo bench trl-dropin, stock TRL vs the drop-in at the qwen2.5-0.5b shape, G=8,
#                L=2048, at the default workspace and at 256 MiB (own call: HF generation dominates,
#                ~2 x 2 x 2 steps of 2,048 tokens)
#   generate     fastgrpo bench generate: the sampling backends (hf, continuous, graph; vllm when installed, else
#                a "missing:" row) on the qwen2.5-1.5b shape, 4 prompts x G=8, B=16 rows per hf call / requests
#                in flight, log-normal lengths up to caps 1K/4K/16K; no (backend, cap) starts past
#                GENERATE_BUDGET (360 s) nor when predicted to end past it (hf at 16K will say so) (own call,
#                timeout_s=480); GENERATE_ARGS adds flags, e.g. "--caps 16384 --backends continuous hf"
#   generate-128 the GRPO batch of issue 22: 16 prompts x G=8 = 128 sequences (all in flight), caps 1K then
#                4K, graph first, then continuous and hf (hf is the ratio's baseline; at 4K the budget skips it
#                when predicted past GENERATE_BUDGET) (own call, timeout_s=480)
#   generate-256 256 sequences (32 prompts x G=8, all in flight), caps 4K then 16K, graph then continuous; hf
#                only where predicted to fit GENERATE_BUDGET (own call, timeout_s=480)
#   ops-quick    the CPU smoke run of bench ops (checks this script anywhere)
#
# Every stage writes to $RESULTS (default /tmp/fastgrpo-results: rows appended to bench_*.jsonl/.csv,
# tables and plots under <gpu>/, one log per stage), packed into $OUT/results.tgz every 30 s and after
# each stage, so a call cut off at its limit still returns what it measured; $OUT holds only that,
# env.txt (GPU, versions, commit) and exit_codes.txt (the device tool returns at most 8 files). The image has
# torch and no network: fastgrpo is installed editable with --no-deps, and the peers (Liger-Kernel,
# TRL) come from .whl/ when it was carried. Exits non-zero if any stage failed; later stages still run.
set -uo pipefail
: "${OUT:?set OUT to an output folder}"
RESULTS=${RESULTS:-/tmp/fastgrpo-results}
mkdir -p "$OUT" "$RESULTS"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
STAGE_BUDGET=${STAGE_BUDGET:-200} # seconds per ops stage after which no new row starts
TESTS_BUDGET=${TESTS_BUDGET:-180} # seconds for the whole tests stage

record() { echo "$1=$2" | tee -a "$OUT/exit_codes.txt"; }
pack() { tar -czf "$OUT/results.tgz.part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" &&
    mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"; }
(while sleep 30; do pack; done) &
packer=$!
trap 'kill $packer 2>/dev/null; pack' EXIT

# ------------------------------------------------------------------ peers and package
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$RESULTS/wheels.txt" 2>&1
    record wheels $?
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python -m pip install --no-deps --no-build-isolation --no-index -e . >"$RESULTS/pip_install.txt" 2>&1
pip_rc=$?
python -c "import fastgrpo.kernels, fastgrpo.benchmarks.bench_ops" >>"$RESULTS/pip_install.txt" 2>&1
import_rc=$?
record install "$pip_rc/$import_rc"
if [ "$pip_rc" -ne 0 ] || [ "$import_rc" -ne 0 ]; then
    tail -n 30 "$RESULTS/pip_install.txt"
    exit 1
fi

{
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(python -c 'from fastgrpo.benchmarks._common import git_commit; print(git_commit())')"
    python - <<'EOF'
import importlib.metadata as md, sys
import torch
print("python:", sys.version.split()[0])
for pkg in ("torch", "triton", "transformers", "liger-kernel", "trl", "peft", "pytest-benchmark"):
    try:
        print(f"{pkg}: {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: not installed")
print("cuda:", torch.version.cuda, "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
} >"$OUT/env.txt" 2>&1
cp "$OUT/env.txt" "$RESULTS/env.txt"
cat "$OUT/env.txt"

# ------------------------------------------------------------------ stages
ops() { # ops <model>
    python -m fastgrpo.cli bench ops --models "$1" --modes fwd+bwd --time-budget "$STAGE_BUDGET" --out "$RESULTS"
}

gpu_tests() { # the @gpu tests first, then the kernel suites natively (they run on CUDA when it is there)
    FASTGRPO_JIT_REPORT="$RESULTS/jit_kernels.txt" timeout "$TESTS_BUDGET" python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_sampling.py tests/test_chunked.py \
        tests/test_grpo_loss.py tests/test_linear_logprobs.py tests/test_grad_filter.py
}

train() {
    local rc=0 b args
    for b in ${TRAIN_BENCHES:-1.5b_packed 1.5b_padded 7b_lora}; do
        case "$b" in
        1.5b_packed | 1.5b_padded)
            local packing=on
            [ "$b" = 1.5b_padded ] && packing=off
            args=(--model qwen2.5-1.5b --packing "$packing" --lengths 1024 4096 16384 32768
                --find-max --max-length 131072 --granularity 4096) ;;
        7b_lora)
            args=(--model qwen2.5-7b --use-peft --beta 0.04 --packing on --lengths 16384 65536
                --find-max --max-length 262144 --granularity 8192) ;;
        *)
            echo "unknown TRAIN_BENCHES entry: $b" >&2
            rc=2
            continue ;;
        esac
        python -m fastgrpo.cli bench train "${args[@]}" --time-budget "${TRAIN_BUDGET:-420}" \
            --out "$RESULTS" || rc=$?
    done
    return "$rc"
}

status=0
for stage in "${@:-tests ops-7b}"; do
    for s in $stage; do
        case "$s" in
        tests) gpu_tests ;;
        generate-256)
            python -m fastgrpo.cli bench generate --time-budget "${GENERATE_BUDGET:-360}" --prompts 32 --G 8 \
                --in-flight 256 --caps 4096 16384 --backends graph continuous hf --out "$RESULTS" ;;
        ops-quick) python -m fastgrpo.cli bench ops --quick --tokens 256 --out "$RESULTS" ;;
        ops-7b) ops qwen2.5-7b ;;
        ops-1.5b) ops qwen2.5-1.5b ;;
        ops-8b) ops llama3-8b ;;
        train) train ;;
        trl) python -m fastgrpo.cli bench trl-dropin --out "$RESULTS" &&
            python -m fastgrpo.cli bench trl-dropin --workspace-bytes 268435456 --out "$RESULTS" ;;
        generate) # shellcheck disable=SC2086 # GENERATE_ARGS is a list of flags
            python -m fastgrpo.cli bench generate --time-budget "${GENERATE_BUDGET:-360}" ${GENERATE_ARGS:-} \
                --out "$RESULTS" ;;
        generate-128)
            python -m fastgrpo.cli bench generate --time-budget "${GENERATE_BUDGET:-360}" --prompts 16 --G 8 \
                --in-flight 128 --caps 1024 4096 --backends graph continuous hf --out "$RESULTS" ;;
        *) echo "unknown stage: $s" >&2; false ;;
        esac 2>&1 | tee "$RESULTS/$s.txt"
        rc=${PIPESTATUS[0]}
        record "$s" "$rc"
        [ "$rc" -eq 0 ] || status=1
        pack
    done
done
exit "$status"
