#!/usr/bin/env bash
# GPU checks and benchmarks, planned as device calls of at most 8 minutes (timeout_s=480):
#
#   bash benchmarks/gpu_wheels.sh && git rev-parse HEAD >COMMIT   # here: peers as wheels, the commit
#   OUT=/path/to/out bash benchmarks/gpu_run.sh                     # there, call 1 (timeout_s 480)
#   OUT=/path/to/out bash benchmarks/gpu_run.sh step train          # there, call 2: what call 1 could not
#   GPU_RUN_DRY=1 OUT=/tmp/o bash benchmarks/gpu_run.sh [STAGE...]  # here, on the CPU: every stage's
#                                                                   # command line, --quick-sized (~2 min)
#
# Call 1, no STAGE given: tests ops-7b generate-128 step train, in that order. Each stage has a budget in
# seconds (the env var beside it); its commands get --time-budget <budget> where they take one (no new row
# starts past it) and are cut hard with `timeout` at budget + GRACE (10 s), so one stage never eats the
# next one's time. Defaults (they sum to 7 minutes with the ~20 s install; of the 60 s left of the 480,
# 50 are the graces and 10 the last pack: nothing runs past CALL_BUDGET, 470 s):
#
#   stage         budget                what it runs
#   tests         TESTS_BUDGET    60 s  the fast subset first (TESTS_FAST: test_gpu.py, test_gpu_sampling.py),
#                                       then the kernel suites natively (TESTS_KERNELS: every path, awkward
#                                       shapes, all dtypes) in what is left; pytest gets SIGINT at the
#                                       cut, so its summary of what ran still prints (KILL 10 s later)
#   ops-7b        OPS_BUDGET     110 s  fastgrpo bench ops at the Qwen2.5-7B head, N = 4K, 16K, then 64K if
#                                       time is left (N is the outer loop), trainable and frozen head,
#                                       fwd+bwd: every fastgrpo path and peer (naive, compiled, Liger, TRL)
#                                       and both GEMM floors (4-GEMM, 3-GEMM)
#   generate-128  GENERATE_BUDGET 80 s  bench generate, 16 prompts x G=8 = 128 sequences all in flight,
#                                       caps 1K then 4K: graph (the candidate CUDA default), continuous
#                                       (auto's choice on CUDA today) and hf (the ratios' baseline;
#                                       skipped when predicted past the budget); GENERATE_BACKENDS overrides
#   step          STEP_BUDGET     90 s  bench step at the qwen2.5-1.5b shape, caps 1K and 4K, 16 prompts x G=8:
#                                       fastgrpo against stock TRL and TRL + the fastgrpo drop-in (STEP_ARGS
#                                       adds flags, e.g. "--caps 4096")
#   train         TRAIN_BUDGET    60 s  bench train fit search (--find-max): TRAIN_BENCHES, default
#                                       "1.5b 7b_lora" here; the budget is shared out among them
#
# Call 2 (`gpu_run.sh step train`, ~6 minutes at most): with STAGEs named, the defaults are those of a call
# of their own: STEP_BUDGET 120, TRAIN_BUDGET 200 and TRAIN_BENCHES "1.5b 1.5b_offload 7b_lora
# 7b_lora_offload" (TESTS 180, OPS 200, GENERATE 360, TRL 240). Whatever is named, no stage is started
# (exit_codes.txt says "skipped") or runs past CALL_BUDGET (470 s) after the script started.
#
# TRAIN_BENCHES entries (bench train, packing on, --find-max):
#   1.5b / 1.5b_offload   qwen2.5-1.5b full fine-tuning, G=8, --rows 1, from L=8K up to 128K by 4K;
#                         1.5b also runs stock TRL's update at the same lengths (--trl-contrast)
#   7b_lora / 7b_lora_offload  qwen2.5-7b LoRA r=16, beta 0.04, G=8, from L=16K up to 256K by 8K;
#                         7b_lora with --trl-contrast
#   1.5b_padded           1.5b with packing off (1.5b_packed: another name of 1.5b)
#
# Other stages, by name (own calls): ops-1.5b / ops-8b (bench ops at the Qwen2.5-1.5B / Llama-3-8B head),
# ops-quick (the CPU smoke run of bench ops), generate (bench generate with GENERATE_ARGS, e.g. "--caps 16384
# --backends continuous hf"), generate-256 (32 prompts x G=8, 256 in flight, caps 4K then 16K),
# trl (bench trl-dropin, stock TRL vs the drop-in at the qwen2.5-0.5b shape, G=8, L=2048, at the default
# workspace and at 256 MiB; TRL_BUDGET).
#
# Output. The first lines say the device and its free memory (before the install), then the versions.
# Every stage writes to $RESULTS (default /tmp/fastgrpo-results: rows appended to bench_*.jsonl/.csv as
# they land, tables and plots under <gpu>/, one log per stage), packed into $OUT/results.tgz every 30 s
# and after each stage, so a call cut off at its limit still returns what it measured; $OUT holds only
# that, env.txt (device, versions, commit) and exit_codes.txt ("stage=rc seconds" per stage; 124 is a
# hard cut). The image has torch and no network: fastgrpo is installed editable with --no-deps, and the
# peers (Liger-Kernel, TRL) come from .whl/ when it was carried. Exits non-zero if any stage failed or was
# skipped; later stages still run. An unknown STAGE is refused before anything runs.
#
# GPU_RUN_PLAN=1: print the plan line ("plan: tests(60s) ops-7b(110s) ... grace=10s call=470s") and exit.
# GPU_RUN_DRY=1: the same plan on the CPU without touching the GPU: no wheels, no pip install when
# fastgrpo already imports, the tests stage as `pytest --collect-only` of the same files, every bench
# with --quick and tiny sizes (--model tiny, caps/lengths of tens of tokens) and otherwise the same flags,
# budgets of 30-60 s and a 60 s grace; so a typo in any stage's command line fails here, not on the GPU.
set -uo pipefail
printf -v T0 '%(%s)T' -1
DRY=${GPU_RUN_DRY:-0}
[ "$DRY" = 0 ] && DRY=
ALL_STAGES="tests ops-7b ops-1.5b ops-8b ops-quick generate generate-128 generate-256 step train trl"
DEFAULT_PLAN="tests ops-7b generate-128 step train"

# ------------------------------------------------------------------ plan and budgets
plan="$*"
named=$plan
plan=${plan:-$DEFAULT_PLAN}
for s in $plan; do
    case " $ALL_STAGES " in
    *" $s "*) ;;
    *)
        echo "gpu_run.sh: unknown stage: $s (stages: $ALL_STAGES)" >&2
        exit 2 ;;
    esac
done
if [ -n "$DRY" ]; then # seconds; the CLI's own budgets, small; the hard cuts generous (a slow 2-core CPU)
    d_tests=60 d_ops=30 d_generate=30 d_step=60 d_train=40 d_trl=120 d_grace=60 d_call=900
    d_train_benches="1.5b 7b_lora"
elif [ -z "$named" ]; then # call 1: 20 (install) + 60 + 110 + 80 + 90 + 60 = 420 s
    d_tests=60 d_ops=110 d_generate=80 d_step=90 d_train=60 d_trl=240 d_grace=10 d_call=470
    d_train_benches="1.5b 7b_lora"
else # stages named: each as in a call of its own (CALL_BUDGET still caps the whole call)
    d_tests=180 d_ops=200 d_generate=360 d_step=120 d_train=200 d_trl=240 d_grace=10 d_call=470
    d_train_benches="1.5b 1.5b_offload 7b_lora 7b_lora_offload"
fi
TESTS_BUDGET=${TESTS_BUDGET:-$d_tests}
OPS_BUDGET=${OPS_BUDGET:-${STAGE_BUDGET:-$d_ops}} # STAGE_BUDGET: its former name
GENERATE_BUDGET=${GENERATE_BUDGET:-$d_generate}
STEP_BUDGET=${STEP_BUDGET:-$d_step}
TRAIN_BUDGET=${TRAIN_BUDGET:-$d_train}
TRL_BUDGET=${TRL_BUDGET:-$d_trl}
GRACE=${GRACE:-$d_grace}             # seconds past a stage's budget before `timeout` cuts it
CALL_BUDGET=${CALL_BUDGET:-$d_call} # seconds from the start after which nothing runs
TRAIN_BENCHES=${TRAIN_BENCHES:-$d_train_benches}
TRAIN_ENTRIES="1.5b 1.5b_packed 1.5b_offload 1.5b_padded 7b_lora 7b_lora_offload"
case " $plan " in
*" train "*)
    for b in $TRAIN_BENCHES; do
        case " $TRAIN_ENTRIES " in
        *" $b "*) ;;
        *)
            echo "gpu_run.sh: unknown TRAIN_BENCHES entry: $b (entries: $TRAIN_ENTRIES)" >&2
            exit 2 ;;
        esac
    done ;;
esac
TESTS_FAST=${TESTS_FAST:-tests/test_gpu.py tests/test_gpu_sampling.py}
TESTS_KERNELS=${TESTS_KERNELS:-tests/test_chunked.py tests/test_grpo_loss.py tests/test_linear_logprobs.py \
tests/test_grad_filter.py tests/test_op_views.py}
GENERATE_BACKENDS=${GENERATE_BACKENDS:-graph continuous hf}
CALL_DEADLINE=$((T0 + CALL_BUDGET))
MIN_STAGE_S=15 # a stage with less left than this is not started

budget_of() { # budget_of <stage>: its budget in seconds
    case "$1" in
    tests) echo "$TESTS_BUDGET" ;;
    ops-*) echo "$OPS_BUDGET" ;;
    generate*) echo "$GENERATE_BUDGET" ;;
    step) echo "$STEP_BUDGET" ;;
    train) echo "$TRAIN_BUDGET" ;;
    trl) echo "$TRL_BUDGET" ;;
    esac
}

plan_line="plan:"
for s in $plan; do plan_line+=" $s($(budget_of "$s")s)"; done
plan_line+=" grace=${GRACE}s call=${CALL_BUDGET}s${DRY:+ dry}"
if [ -n "${GPU_RUN_PLAN:-}" ]; then # GPU_RUN_PLAN=1: say the plan and its budgets, run nothing
    echo "$plan_line"
    exit 0
fi

# ------------------------------------------------------------------ first lines: device and free memory
: "${OUT:?set OUT to an output folder}"
RESULTS=${RESULTS:-/tmp/fastgrpo-results}
mkdir -p "$OUT" "$RESULTS"
OUT="$(cd "$OUT" && pwd)"
RESULTS="$(cd "$RESULTS" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
: >"$OUT/exit_codes.txt"
{
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if [ -n "$DRY" ]; then
        echo "device: cpu (GPU_RUN_DRY=1: a dry run, the GPU is not touched)"
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.free,memory.total,driver_version --format=csv,noheader |
            sed 's/^/device (name, free, total, driver): /'
    else
        echo "device: no nvidia-smi"
    fi
    free -g | awk '/^Mem:/ {print "host memory: " $7 " GiB available of " $2 " GiB"}'
    echo "$plan_line"
} 2>&1 | tee "$OUT/env.txt"

record() { # record <stage> <rc> <seconds>
    echo "$1=$2 $3s" | tee -a "$OUT/exit_codes.txt"
}
now() { printf '%(%s)T' -1; }
pack() {
    local part="$OUT/results.tgz.part$BASHPID" rc
    tar --warning=no-file-changed -czf "$part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
    rc=$? # 1: a file changed while it was read (a row landing); the archive is still whole
    if [ "$rc" -le 1 ]; then mv -f "$part" "$OUT/results.tgz"; else rm -f "$part"; fi
}
(
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
        sleep 30 >/dev/null 2>&1 &
        nap=$!
        wait "$nap"
        pack
    done
) &
packer=$!
trap 'kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null; pack' EXIT

# ------------------------------------------------------------------ peers and package
t=$(now)
if [ -z "$DRY" ] && compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$RESULTS/wheels.txt" 2>&1
    record wheels $? $(($(now) - t))
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
imports() { python -c "import fastgrpo.kernels, fastgrpo.benchmarks.bench_ops" >>"$RESULTS/pip_install.txt" 2>&1; }
if [ -n "$DRY" ] && imports; then
    pip_rc=skipped # the dry run leaves the environment as it is
else
    python -m pip install --no-deps --no-build-isolation --no-index -e . >"$RESULTS/pip_install.txt" 2>&1
    pip_rc=$?
fi
imports
import_rc=$?
record install "$pip_rc/$import_rc" $(($(now) - t))
if [ "$pip_rc" != 0 ] && [ "$pip_rc" != skipped ] || [ "$import_rc" -ne 0 ]; then
    tail -n 30 "$RESULTS/pip_install.txt"
    exit 1
fi

{
    echo "commit: $(python -c 'from fastgrpo.benchmarks._common import git_commit; print(git_commit())')"
    python - <<'EOF'
import importlib.metadata as md, sys
import torch
print("python:", sys.version.split()[0])
for pkg in ("torch", "triton", "transformers", "liger-kernel", "trl", "peft", "vllm", "pytest-benchmark"):
    try:
        print(f"{pkg}: {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: not installed")
print("cuda:", torch.version.cuda, "| device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF
    [ -n "$DRY" ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv ||
        true
} 2>&1 | tee -a "$OUT/env.txt"
cp "$OUT/env.txt" "$RESULTS/env.txt"

# ------------------------------------------------------------------ helpers for the stages
# A stage runs with STAGE_START and STAGE_DEADLINE (epoch seconds: its start and hard cut) and SOFT
# (seconds: the --time-budget its benches get, shared out among the train stage's benches). bounded runs a command cut at DEADLINE (default STAGE_DEADLINE).
bounded() { # bounded [-s SIGNAL] CMD...
    local sig=TERM left
    if [ "$1" = -s ]; then sig=$2 && shift 2; fi
    left=$((${DEADLINE:-$STAGE_DEADLINE} - $(now)))
    if [ "$left" -lt 1 ]; then
        echo "gpu_run.sh: no time left for: $*" >&2
        return 124
    fi
    timeout -s "$sig" -k 10 "$left" "$@"
}
bench() { bounded python -m fastgrpo.cli bench "$@"; }

stage_tests() { # the fast @gpu subset first, then the kernel suites natively, in what is left
    local rc=0 files
    for files in "$TESTS_FAST" "$TESTS_KERNELS"; do
        # shellcheck disable=SC2086 # lists of test files
        if [ -n "$DRY" ]; then
            bounded python -m pytest --collect-only -qq -p no:cacheprovider $files || rc=$?
        else
            FASTGRPO_JIT_REPORT="$RESULTS/jit_kernels.txt" bounded -s INT \
                python -m pytest -q -p no:cacheprovider --durations=10 $files || rc=$?
        fi
    done
    return "$rc"
}

stage_ops() { # stage_ops <model>
    local size=(--models "$1" --tokens 4096 16384 65536)
    [ -n "$DRY" ] && size=(--quick --models tiny --tokens 256)
    bench ops "${size[@]}" --modes fwd+bwd --time-budget "$SOFT" --out "$RESULTS"
}

stage_generate() { # stage_generate <prompts> <in-flight> <cap>...: G=8, GENERATE_BACKENDS
    local size=(--prompts "$1" --G 8 --in-flight "$2" --caps "${@:3}")
    [ -n "$DRY" ] && size=(--quick --model tiny --prompts 2 --G 8 --in-flight 16 --caps 64)
    # shellcheck disable=SC2086 # a list of backend names
    bench generate "${size[@]}" --backends $GENERATE_BACKENDS --time-budget "$SOFT" --out "$RESULTS"
}

stage_generate_args() { # bench generate with GENERATE_ARGS
    local dry=()
    [ -n "$DRY" ] && dry=(--quick --model tiny --prompts 2 --G 8 --in-flight 8 --caps 64)
    # shellcheck disable=SC2086 # GENERATE_ARGS is a list of flags
    bench generate --time-budget "$SOFT" ${GENERATE_ARGS:-} ${dry[@]+"${dry[@]}"} --out "$RESULTS"
}

stage_step() {
    local size=(--model qwen2.5-1.5b --caps 1024 4096 --prompts 16 --G 8)
    [ -n "$DRY" ] && size=(--quick --model tiny --caps 48 --prompts 2 --G 4)
    # shellcheck disable=SC2086 # STEP_ARGS is a list of flags
    bench step "${size[@]}" --trainers fastgrpo trl trl+fastgrpo --time-budget "$SOFT" ${STEP_ARGS:-} \
        --out "$RESULTS"
}

stage_train() { # the TRAIN_BENCHES fit searches, the stage's budget shared out among those not yet run
    local rc=0 b args size left share n deadline benches soft_deadline=$((STAGE_START + SOFT))
    read -ra benches <<<"$TRAIN_BENCHES"
    n=${#benches[@]}
    for b in "${benches[@]}"; do
        case "$b" in
        1.5b | 1.5b_packed | 1.5b_offload | 1.5b_padded)
            size=(--model qwen2.5-1.5b --lengths 8192 --max-length 131072 --granularity 4096)
            args=(--G 8 --rows 1)
            case "$b" in
            1.5b_offload) args+=(--packing on --offload) ;;
            1.5b_padded) args+=(--packing off) ;;
            *) args+=(--packing on --trl-contrast) ;;
            esac ;;
        7b_lora | 7b_lora_offload)
            size=(--model qwen2.5-7b --lengths 16384 --max-length 262144 --granularity 8192)
            args=(--use-peft --lora-r 16 --beta 0.04 --G 8 --packing on)
            if [ "$b" = 7b_lora ]; then args+=(--trl-contrast); else args+=(--offload); fi ;;
        *) # refused before the install; kept for a function called on its own
            echo "unknown TRAIN_BENCHES entry: $b" >&2
            rc=2
            n=$((n - 1))
            continue ;;
        esac
        [ -n "$DRY" ] && size=(--quick --model tiny --lengths 64 --max-length 256 --granularity 64)
        left=$((soft_deadline - $(now)))
        share=$((left / n))
        n=$((n - 1))
        if [ "$share" -lt 5 ]; then
            echo "train $b: skipped: time budget (${left}s of TRAIN_BUDGET left)"
            continue
        fi
        echo "train $b: --time-budget ${share}s"
        deadline=$(($(now) + share + GRACE))
        [ "$deadline" -gt "$STAGE_DEADLINE" ] && deadline=$STAGE_DEADLINE
        DEADLINE=$deadline bench train "${size[@]}" "${args[@]}" --find-max --time-budget "$share" \
            --out "$RESULTS" || rc=$?
    done
    return "$rc"
}

stage_trl() {
    local dry=()
    [ -n "$DRY" ] && dry=(--quick)
    bench trl-dropin ${dry[@]+"${dry[@]}"} --out "$RESULTS" &&
        bench trl-dropin ${dry[@]+"${dry[@]}"} --workspace-bytes 268435456 --out "$RESULTS"
}

run_stage() {
    case "$1" in
    tests) stage_tests ;;
    ops-7b) stage_ops qwen2.5-7b ;;
    ops-1.5b) stage_ops qwen2.5-1.5b ;;
    ops-8b) stage_ops llama3-8b ;;
    ops-quick) bench ops --quick --tokens 256 --time-budget "$SOFT" --out "$RESULTS" ;;
    generate) stage_generate_args ;;
    generate-128) stage_generate 16 128 1024 4096 ;;
    generate-256) stage_generate 32 256 4096 16384 ;;
    step) stage_step ;;
    train) stage_train ;;
    trl) stage_trl ;;
    esac
}

# ------------------------------------------------------------------ stages
status=0
for s in $plan; do
    t=$(now)
    budget=$(budget_of "$s")
    left=$((CALL_DEADLINE - t))
    hard=$((budget + GRACE))
    [ "$hard" -gt "$left" ] && hard=$left
    if [ "$left" -lt "$MIN_STAGE_S" ]; then
        echo "gpu_run.sh: $s not started: ${left}s left of CALL_BUDGET=${CALL_BUDGET}s" | tee "$RESULTS/$s.txt"
        record "$s" skipped 0
        status=1
        continue
    fi
    SOFT=$((hard - GRACE))
    [ "$SOFT" -gt "$budget" ] && SOFT=$budget
    [ "$SOFT" -lt 5 ] && SOFT=5
    STAGE_START=$t
    STAGE_DEADLINE=$((t + hard))
    echo "=== $s: budget ${SOFT}s, cut at $((hard))s ($(date -u +%H:%M:%S) UTC, $((t - T0))s into the call)"
    run_stage "$s" 2>&1 | tee "$RESULTS/$s.txt"
    rc=${PIPESTATUS[0]}
    record "$s" "$rc" $(($(now) - t))
    [ "$rc" -eq 0 ] || status=1
    pack
done
exit "$status"
