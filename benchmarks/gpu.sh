#!/usr/bin/env bash
# What a session with a GPU runs, once, from the repository root:  bash benchmarks/gpu.sh
#
# Writes every log and result under "${OUT:-build/gpu}" (summary.txt lists each step and its exit
# status). Steps:
#   1. the environment: nvidia-smi, the versions of torch (and its CUDA), transformers, peft, accelerate;
#   2. DeepSpeed: used if importable, else installed beside the project with
#      `pip install --no-deps --target "${DS_TARGET:-build/dsenv}" deepspeed==0.19.8 hjson ninja py-cpuinfo
#      msgpack einops` (not a dependency; without network the install fails, is logged, and the
#      DeepSpeed tests skip);
#   3. the DeepSpeed tests (pytest -m slow): the Trainer on 1 and 2 GPUs and on CPU
#      (tests/core/distributed/test_deepspeed_trainer.py), `deepspeed.initialize` on 2 CPU ranks (tests/core/distributed/test_two_ranks.py);
#   4. peak CUDA memory of a training step, TraDy vs LoRA, bf16 (benchmarks/cuda_memory.py);
#   5. step_memory against torch.cuda.max_memory_allocated: a decoder and a CNN at two batch shapes
#      each, exit 1 if a step exceeds its bound (+ a stated transient margin) (benchmarks/step_memory.py).
# Without a CUDA device it says what it skipped and exits 0. GPU_SH_DRY_RUN=1 prints the commands
# instead of running them (after the CUDA check; GPU_SH_ASSUME_CUDA=1 skips that check too).
# PYTHON picks the interpreter (default: python3); it needs torch with CUDA and the project's deps.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu}
PYTHON=${PYTHON:-python3}
DS_TARGET=${DS_TARGET:-build/dsenv}
DRY=${GPU_SH_DRY_RUN:-0}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0

say() { echo "gpu.sh: $*" | tee -a "$SUMMARY"; }

# step NAME COMMAND...: run COMMAND with its output in $OUT/NAME.log, record its exit status.
step() {
    local name=$1
    shift
    if [ "$DRY" = 1 ]; then
        say "would run [$name]: $*"
        return 0
    fi
    say "running [$name]: $*"
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    say "[$name] exit $rc (log: $OUT/$name.log)"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    [ $rc -eq 0 ] || status=1
    return 0
}

if [ "${GPU_SH_ASSUME_CUDA:-0}" != 1 ]; then
    devices=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>>"$SUMMARY")
    if [ -z "$devices" ] || [ "$devices" = 0 ]; then
        say "no CUDA device (torch.cuda.is_available() is False or torch is missing): skipped the DeepSpeed" \
            "install, the GPU tests (tests/core/distributed/test_deepspeed_trainer.py -k gpu), benchmarks/cuda_memory.py" \
            "and benchmarks/step_memory.py"
        exit 0
    fi
    say "$devices CUDA device(s)"
fi

step versions "$PYTHON" -c "import torch, transformers, peft, accelerate as a; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.device_count(), 'device(s)'); \
print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', a.__version__)"
[ "$DRY" = 1 ] || nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || say "nvidia-smi failed (see $OUT/nvidia-smi.txt)"

export PYTHONPATH=".:$DS_TARGET${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" != 1 ] && ! "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
    step deepspeed_install "$PYTHON" -m pip install -q --no-deps --target "$DS_TARGET" \
        deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack einops
    "$PYTHON" -c "import deepspeed" >/dev/null 2>&1 || say "DeepSpeed is not importable: its tests will skip"
fi

step deepspeed_tests "$PYTHON" -m pytest -m slow -rs -p no:cacheprovider \
    tests/core/distributed/test_deepspeed_trainer.py "tests/core/distributed/test_two_ranks.py::test_deepspeed_zero_matches_one_process_across_periods_save_and_resume"
step cuda_memory "$PYTHON" benchmarks/cuda_memory.py --out "$OUT"
step step_memory "$PYTHON" benchmarks/step_memory.py --device cuda --out "$OUT"

say "done, exit $status; results under $OUT"
exit $status
