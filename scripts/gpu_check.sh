#!/usr/bin/env bash
# `make gpu-check`: the checks only a CUDA GPU can run, in one command, ending with one table.
#   1. the CUDA-marked tests (pytest -m cuda): QLoRA on the chosen GPU with paged AdamW, a resumed run whose
#      optimizer state stays paged and whose checkpoint loads on the CPU, merges of 4-bit and 8-bit bases on
#      the GPU;
#   2. setup memory through the CLI: a random-weight ~1.1B Llama (TinyLlama's shape) quantized to NF4 by
#      PeftStrategy under bf16-true, LoRA on every linear layer; the peak GPU memory of setup must stay within
#      the 4-bit footprint + 10% + 1 GiB (scripts/gpu_probe.py); it trains 2 steps and writes a checkpoint;
#   3. a resume of that run on the GPU (2 more steps), then its last checkpoint loaded on the CPU
#      (CUDA_VISIBLE_DEVICES= hides the GPU);
#   4. the benchmarks, short: benchmarks/compare.py and benchmarks/merge_memory.py with --accelerator cuda
#      --quick, and benchmarks/optimizer_step.py --quick.
# Every step runs even if one before failed; the exit status is that of the first failure. Logs and results go
# to $GPU_CHECK_DIR (default: a new temporary directory), which is printed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
case "$VENV" in
    /*) ;;
    *) VENV="$PWD/$VENV" ;;  # relative to where the command was started, before the cd below
esac
PY="$VENV/bin/python"
CLI="$VENV/bin/lightning-peft"
cd "$ROOT" || exit 1

fail() {
    echo "gpu_check: $*" >&2
    exit 1
}

[ -x "$PY" ] || fail "no Python at $PY; run 'make env' (or pass the virtual environment as the first argument)."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    fail "no NVIDIA GPU here (nvidia-smi is missing or lists none). These checks need a CUDA GPU; on a CPU run 'make test'."
fi
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "torch in $VENV cannot use the GPU (torch.cuda.is_available() is False): it is a CPU build or the driver is too old. Reinstall it with CUDA (scripts/setup_env.sh installs the CUDA build where nvidia-smi works)."

OUT="${GPU_CHECK_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT:$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1); logs in $OUT"

NAMES=()
RESULTS=()
DETAILS=()
STATUS=0
record() {  # record NAME RC DETAIL
    local result="ok"
    if [ "$2" -ne 0 ]; then
        result="FAILED (exit $2)"
        [ "$STATUS" -ne 0 ] || STATUS="$2"
    fi
    NAMES+=("$1")
    RESULTS+=("$result")
    DETAILS+=("$3")
}

# 1. CUDA-marked tests
"$PY" -m pytest -m cuda -q -p no:cacheprovider tests >"$OUT/pytest.log" 2>&1
rc=$?
record "pytest -m cuda" "$rc" "$(tail -n 1 "$OUT/pytest.log")"

# 2. setup memory through the CLI, 2 steps, a checkpoint
MODEL="$OUT/llama-1b"
"$PY" scripts/gpu_probe.py build "$MODEL" >"$OUT/build.log" 2>&1
rc=$?
record "random ~1.1B Llama" "$rc" "$(tail -n 1 "$OUT/build.log")"
cat >"$OUT/qlora.yaml" <<YAML
seed_everything: 0
trainer:
  accelerator: cuda
  devices: 1
  precision: bf16-true
  max_steps: 2
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  logger: false
  default_root_dir: $OUT/run
  strategy:
    class_path: lightning_peft.PeftStrategy
    init_args:
      gradient_checkpointing: true
      quantization:
        class_path: lightning_peft.QuantizationConfig
        init_args: {load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true, bnb_4bit_compute_dtype: bfloat16}
  callbacks:
    - class_path: lightning_peft.PeftCallback
      init_args:
        adapter: {class_path: lightning_peft.LoraConfig, init_args: {r: 16, lora_alpha: 32, target_modules: all-linear}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: $OUT/checkpoints, every_n_train_steps: 2, save_top_k: -1}
    - class_path: gpu_probe.SetupMemoryProbe
      init_args: {out: $OUT/setup_memory.json}
model:
  class_path: lightning_peft.CausalLMModule
  init_args: {model_name_or_path: $MODEL, dtype: bfloat16, learning_rate: 1.0e-4}
data:
  class_path: lightning_peft.ChatDataModule
  init_args: {train_file: examples/data/chatterbot_english.jsonl, max_length: 256, batch_size: 2}
YAML
"$CLI" fit --config "$OUT/qlora.yaml" >"$OUT/fit.log" 2>&1
rc=$?
memory="no measurement (see fit.log)"
if [ -s "$OUT/setup_memory.json" ]; then
    memory="$("$PY" - "$OUT/setup_memory.json" <<'PYTHON'
import json, sys
r = json.load(open(sys.argv[1]))
gib = 2**30
print(f"setup peak {r['setup_peak_bytes'] / gib:.2f} GiB, 4-bit footprint {r['footprint_bytes'] / gib:.2f} GiB, "
      f"target <= {r['target_bytes'] / gib:.2f} GiB: {'within' if r['ok'] else 'OVER'}")
sys.exit(0 if r["ok"] else 3)
PYTHON
)"
    probe=$?
    [ "$rc" -ne 0 ] || rc=$probe
fi
record "QLoRA setup memory (CLI, bf16-true)" "$rc" "$memory"

# 3. resume on the GPU, then the checkpoint on the CPU
FIRST="$OUT/checkpoints/epoch=0-step=2.ckpt"
"$CLI" fit --config "$OUT/qlora.yaml" --trainer.max_steps=4 --ckpt_path "$FIRST" >"$OUT/resume.log" 2>&1
rc=$?
record "resume on the GPU (steps 3-4)" "$rc" "$(grep -m 1 -o 'Resumed optimizer state.*' "$OUT/resume.log" || echo "from $FIRST")"
LAST="$OUT/checkpoints/epoch=0-step=4.ckpt"
CUDA_VISIBLE_DEVICES="" "$PY" scripts/gpu_probe.py cpu-load "$MODEL" "$LAST" >"$OUT/cpu_load.log" 2>&1
rc=$?
record "GPU checkpoint loaded on the CPU" "$rc" "$(tail -n 1 "$OUT/cpu_load.log")"

# 4. benchmarks, short
"$PY" benchmarks/compare.py --accelerator cuda --quick --output "$OUT/RESULTS-cuda.md" >"$OUT/compare.log" 2>&1
rc=$?
record "benchmarks/compare.py --accelerator cuda --quick" "$rc" "$OUT/RESULTS-cuda.md"
"$PY" benchmarks/merge_memory.py --accelerator cuda --quick --out "$OUT/MERGE-cuda.md" >"$OUT/merge_memory.log" 2>&1
rc=$?
record "benchmarks/merge_memory.py --accelerator cuda --quick" "$rc" "$OUT/MERGE-cuda.md"
"$PY" benchmarks/optimizer_step.py --quick --out "$OUT/OPTIMIZER-cuda.md" >"$OUT/optimizer_step.log" 2>&1
rc=$?
record "benchmarks/optimizer_step.py --quick" "$rc" "$OUT/OPTIMIZER-cuda.md"

echo
printf '| %s | %s | %s |\n' "check" "result" "detail"
printf '|---|---|---|\n'
for i in "${!NAMES[@]}"; do
    printf '| %s | %s | %s |\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${DETAILS[$i]}"
done
echo
echo "Logs and reports: $OUT"
exit "$STATUS"
