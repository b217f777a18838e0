#!/usr/bin/env bash
# `make demo`: the default fine-tune from examples/smollm2_lora.yaml, end to end, on whatever device is there.
# 1. the base model's validation perplexity and answers to held-out questions (`lightning-peft validate`);
# 2. the LoRA fine-tune (`lightning-peft fit`), which validates again at the end, saves the adapter and the
#    merged model;
# 3. the curves as a PNG (`lightning-peft report`), then a before/after summary.
set -euo pipefail
VENV="${1:-.venv}"
CONFIG=examples/smollm2_lora.yaml
RUN=runs/smollm2-lora
start=$(date +%s)
rm -rf "$RUN/base" "$RUN/finetune"
"$VENV/bin/lightning-peft" validate --config "$CONFIG" --trainer.logger.init_args.version=base
"$VENV/bin/lightning-peft" fit --config "$CONFIG" --trainer.logger.init_args.version=finetune
"$VENV/bin/lightning-peft" report "$RUN/finetune" --baseline "$RUN/base" --output "$RUN/report.png"
"$VENV/bin/python" scripts/demo_summary.py "$RUN" --seconds $(( $(date +%s) - start ))
