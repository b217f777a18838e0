"""Side-by-side benchmark: Lightning + HF PEFT against Lightning + lightning_peft, in one run.

Both contenders train the same randomly initialised Llama (hidden 512, 8 layers, vocab 32k: about 58M
parameters) on the same data for the same steps, with LoRA r=16 on q, k, v, o (dropout 0), the same AdamW and
the same Trainer settings, each in a fresh process. The contenders alternate and the rounds repeat, so a noisy
machine hurts both alike; medians are reported as ours/theirs ratios in ``benchmarks/RESULTS.md``.

Each side computes the loss as its users do: theirs ``model(input_ids=ids, labels=ids).loss``, ours
``lightning_peft.causal_lm_loss`` (the head a chunk of positions at a time, no logits for the whole batch; every
position is labelled here, so it saves memory, not head arithmetic).

Our process also measures the floor: the same step in the same loop with the frozen base and no adapter at all,
gradients still flowing back through the activations. Our step over the floor is what the adapter costs.

Run from the repository root::

    python benchmarks/compare.py            # full measurement, writes benchmarks/RESULTS.md
    python benchmarks/compare.py --quick    # one short round, for development
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=256, pad_token_id=0)
SEQ_LEN, BATCH_SIZE, LEARNING_RATE = 128, 4, 2e-4
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)  # compute dtype: fp32
CONTENDERS = ("theirs", "ours")


# --------------------------------------------------------------------------------------------------- child side


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident set size now: the baseline (a transient peak during the imports must not hide what follows)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**MODEL)).train()


def data_loader(steps: int):
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, MODEL["vocab_size"], (steps * BATCH_SIZE, SEQ_LEN), generator=generator)
    return DataLoader(TensorDataset(ids), batch_size=BATCH_SIZE)


def make_module(model=None, pretrained_dir: str | None = None, lean_loss: bool = False):
    """The LightningModule every contender trains: causal LM loss (``causal_lm_loss`` with ``lean_loss``, else the
    model's own), AdamW over what requires grad.

    Without ``model``, the model is created on the meta device from ``pretrained_dir``'s config in
    ``configure_model``, and ``PeftStrategy`` fills it from that directory.
    """
    import lightning as L

    class CausalLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def configure_model(self) -> None:
            if self.model is None:
                from transformers import AutoConfig, AutoModelForCausalLM

                with torch.device("meta"):
                    self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained_dir))

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            if lean_loss:
                from lightning_peft import causal_lm_loss

                return causal_lm_loss(self.model, {"input_ids": ids, "labels": ids})
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=LEARNING_RATE) if params else None

    return CausalLM()


def step_timer(accelerator: str):
    """A callback recording the wall time of every training-loop iteration (batch end to batch end), and the
    process's peak RSS when training starts (what loading and preparing the model took). On CUDA it waits for the
    GPU's queued work before reading the clock: kernels run asynchronously, so the clock alone would time the
    launches, not the step."""
    from lightning.pytorch.callbacks import Callback

    def now() -> float:
        if accelerator == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.ready_peak_mb = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self.ready_peak_mb = peak_rss_mb()
            self.ends.append(now())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(now())

    return StepTimer()


def fit(module, callbacks: list, steps: int, accelerator: str, checkpoint: bool, strategy="auto",
        precision: str = "32-true") -> dict:
    """Train ``steps`` steps with Lightning's defaults, ModelCheckpoint included when ``checkpoint``.

    Returns the step times, the peak RSS when training started (what loading the model took) and at the end,
    the size of the checkpoint ModelCheckpoint wrote and of a weights-only one written after training.
    """
    import lightning as L

    timer = step_timer(accelerator)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpoint,
                            default_root_dir=root, callbacks=[*callbacks, timer], strategy=strategy)
        trainer.fit(module, data_loader(steps))
        out = {"step_times": [b - a for a, b in zip(timer.ends, timer.ends[1:])], "ready_peak_mb": timer.ready_peak_mb,
               "end_peak_mb": peak_rss_mb()}
        if accelerator == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if checkpoint:
            (written,) = Path(root, "checkpoints").glob("*.ckpt")
            out["checkpoint_bytes"] = written.stat().st_size
            trainer.save_checkpoint(Path(root, "weights.ckpt"), weights_only=True)
            out["weights_checkpoint_bytes"] = Path(root, "weights.ckpt").stat().st_size
    return out


def contender_setup(contender: str, pretrained_dir: str | None, accelerator: str, compute: str = "float32") -> dict:
    """What one contender hands to ``fit``: HF PEFT wraps the model, we add a callback (and, for a 4-bit base,
    our strategy, which quantizes while it streams the weights in). ``pretrained_dir`` given: QLoRA, its 4-bit
    layers computing in ``compute``."""
    if contender == "theirs":
        import peft

        if pretrained_dir is None:
            model = build_model()
        else:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            quant = BitsAndBytesConfig(**NF4, bnb_4bit_compute_dtype=getattr(torch, compute))
            model = AutoModelForCausalLM.from_pretrained(pretrained_dir, quantization_config=quant,
                                                         dtype=torch.float32, device_map=accelerator)
            model.train()
        return dict(module=make_module(peft.get_peft_model(model, peft.LoraConfig(**LORA))), callbacks=[])
    from lightning_peft import LoraConfig, PeftCallback

    callbacks = [PeftCallback(LoraConfig(**LORA))]
    if pretrained_dir is None:
        return dict(module=make_module(build_model(), lean_loss=True), callbacks=callbacks)
    from lightning_peft import PeftStrategy, QuantizationConfig

    strategy = PeftStrategy(quantization=QuantizationConfig(**NF4, bnb_4bit_compute_dtype=compute))
    return dict(module=make_module(pretrained_dir=pretrained_dir, lean_loss=True), callbacks=callbacks,
                strategy=strategy)


def run_child(contender: str, config: str, steps: int, warmup: int, pretrained_dir: str | None,
              accelerator: str) -> dict:
    warnings.filterwarnings("ignore")
    import lightning  # noqa: F401  (imported before the baseline so that import memory is not counted)
    import transformers

    transformers.logging.set_verbosity_error()
    if contender == "theirs":
        import peft  # noqa: F401
    else:
        import lightning_peft  # noqa: F401
    if config.startswith("qlora"):
        import bitsandbytes  # noqa: F401
    baseline = rss_mb()
    out: dict = {"contender": contender, "config": config, "import_rss_mb": baseline}
    bf16 = config.endswith("_bf16")  # bf16-mixed, and a 4-bit base computing in bfloat16: the usual GPU set-up
    setup = contender_setup(contender, pretrained_dir, accelerator, "bfloat16" if bf16 else "float32")
    run = fit(**setup, steps=steps, accelerator=accelerator, checkpoint=True,
              precision="bf16-mixed" if bf16 else "32-true")
    out.update(run, step_s=statistics.median(run["step_times"][warmup:]), peak_rss_mb=run["end_peak_mb"] - baseline)
    if pretrained_dir is not None:
        out["load_peak_mb"] = run["ready_peak_mb"] - baseline
    if contender == "ours" and config == "lora":
        gc.collect()  # the trainer and the module reference each other: free our run before the floor's
        out.update(run_floor(steps, warmup, accelerator))
    return out


def run_floor(steps: int, warmup: int, accelerator: str) -> dict:
    """The same step without any adapter: frozen base, activations requiring grad so backward still runs."""
    model = build_model()
    model.requires_grad_(False)
    model.enable_input_require_grads()  # the embeddings' output requires grad: backward flows through every layer
    times = fit(make_module(model, lean_loss=True), [], steps, accelerator, checkpoint=False)["step_times"]
    return {"floor_step_s": statistics.median(times[warmup:]), "floor_step_times": times}


# -------------------------------------------------------------------------------------------------- parent side


def spawn(contender: str, config: str, steps: int, warmup: int, pretrained_dir: str | None,
          accelerator: str) -> dict:
    """Run one contender in a fresh Python process and return what it measured."""
    cmd = [sys.executable, __file__, "--child", contender, "--config", config, "--steps", str(steps),
           "--warmup", str(warmup), "--accelerator", accelerator]
    if pretrained_dir:
        cmd += ["--pretrained-dir", pretrained_dir]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def save_base(directory: str) -> None:
    """Write the benchmark model as a pretrained directory, for the contenders that load a quantized base."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    build_model().save_pretrained(directory)


def machine(accelerator: str) -> str:
    import lightning
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f"{torch.cuda.get_device_name()}, " if accelerator == "cuda" else ""
    versions = f"torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}"
    for name in ("peft", "bitsandbytes"):
        versions += f", {name} {__import__(name).__version__}"
    return (f"{gpu}{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}; "
            f"{versions}")


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def median_ratio(runs: dict[str, list[dict]], key: str) -> float | None:
    """Median over rounds of ours/theirs, each round pairing two neighbouring runs (robust to drifting load)."""
    pairs = [(o.get(key), t.get(key)) for o, t in zip(runs["ours"], runs["theirs"])]
    ratios = [o / t for o, t in pairs if o is not None and t]
    return statistics.median(ratios) if ratios else None


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def measure(configs: list[str], rounds: int, steps: int, warmup: int, accelerator: str, log, after_round) -> dict:
    """Every contender of every config, ``rounds`` times, alternating which contender goes first.

    ``after_round(results, rounds_done)`` runs after each round, so a long run leaves a table behind early.
    """
    results = {c: {name: [] for name in CONTENDERS} for c in configs}
    with tempfile.TemporaryDirectory() as base_dir:
        if any(c.startswith("qlora") for c in configs):
            save_base(base_dir)
        for i in range(rounds):
            for config in configs:
                order = CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]
                for contender in order:
                    started = time.perf_counter()
                    try:
                        run = spawn(contender, config, steps, warmup,
                                    base_dir if config.startswith("qlora") else None, accelerator)
                    except RuntimeError as err:
                        run = {"error": str(err).strip().splitlines()[-1]}
                    results[config][contender].append(run)
                    log(f"round {i + 1}/{rounds} {config:5s} {contender:6s} {time.perf_counter() - started:5.0f} s  "
                        f"{run.get('error') or _summary(run)}")
            after_round(results, i + 1)
    return results


def _summary(run: dict) -> str:
    text = (f"step {run['step_s']:.3f} s, peak RSS {run['peak_rss_mb']:.0f} MB, "
            f"checkpoint {run['checkpoint_bytes']:,} B (weights only {run['weights_checkpoint_bytes']:,} B)")
    if "load_peak_mb" in run:
        text += f", load peak {run['load_peak_mb']:.0f} MB"
    if "floor_step_s" in run:
        text += f", floor step {run['floor_step_s']:.3f} s"
    return text


TARGETS = {"step_s": 0.95, "peak_rss_mb": 0.9, "checkpoint_bytes": 0.02, "floor_overhead": 0.10}
COLUMNS = (("step_s", "median step (s)", "{:.3f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
           ("checkpoint_bytes", "ModelCheckpoint file (MB)", "{:.2f}"),
           ("weights_checkpoint_bytes", "weights-only checkpoint (MB)", "{:.2f}"),
           ("load_peak_mb", "streaming-load peak (MB)", "{:.0f}"))
GPU_COLUMN = ("peak_gpu_mb", "peak GPU memory (MB)", "{:.0f}")
NAMES = {"lora": "LoRA r=16 (fp32 base)", "qlora": "QLoRA r=16 (NF4 base)",
         "lora_bf16": "LoRA r=16 (fp32 base, bf16-mixed)",
         "qlora_bf16": "QLoRA r=16 (NF4 base, bf16 compute, bf16-mixed)"}


def _cell(runs: dict[str, list[dict]], key: str, fmt: str, config: str) -> str:
    theirs, ours = median_of(runs["theirs"], key), median_of(runs["ours"], key)
    if theirs is None or ours is None:
        return "n/a (built in process)" if key == "load_peak_mb" and config.startswith("lora") else "pending"
    scale = 1e6 if key.endswith("bytes") else 1
    ratio = median_ratio(runs, key)
    mark = "" if key not in TARGETS else (" ✓" if ratio <= TARGETS[key] else " ✗")
    return f"{fmt.format(ours / scale)} / {fmt.format(theirs / scale)} = **{ratio:.3f}**{mark}"


def report(results: dict, rounds_done: int, rounds: int, steps: int, warmup: int, accelerator: str,
           load_before: str, seconds: float) -> str:
    columns = COLUMNS + ((GPU_COLUMN,) if accelerator == "cuda" else ())
    progress = "" if rounds_done == rounds else f" (partial: {rounds_done} of {rounds} rounds done so far)"
    lines = [
        f"# Benchmark: lightning_peft against Lightning + HF PEFT ({accelerator.upper()})",
        "",
        f"Written by `python benchmarks/compare.py{' --accelerator cuda' if accelerator == 'cuda' else ''}`: "
        f"{rounds_done} round{'s' if rounds_done != 1 else ''}{progress}, {steps} steps per run of which the first "
        f"{warmup} are warm-up, "
        f"{seconds / 60:.0f} min. Each cell is ours / theirs = ratio: the values are medians over rounds, the "
        "ratio is the median of the per-round ratios. Lower is better; ✓ / ✗ against the CPU target. "
        "docs/performance.md explains each figure.",
        "",
        f"Machine: {machine(accelerator)}.",
        f"Load average (1, 5, 15 min) before: {load_before}; after: {load()}.{_busy(load_before)}",
        "",
        "| configuration | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for config, runs in results.items():
        lines.append(f"| {NAMES[config]} | " + " | ".join(_cell(runs, k, f, config) for k, _, f in columns) + " |")
    lines += ["", "Targets (2-core CPU): step time ≤ 0.95, peak RSS ≤ 0.9, checkpoint ≤ 0.02, adapter overhead "
              "over the floor ≤ 10%.", ""]
    ours = results.get("lora", {}).get("ours", [])
    overheads = [r["step_s"] / r["floor_step_s"] - 1 for r in ours if r.get("floor_step_s")]
    if overheads:
        overhead = statistics.median(overheads)
        mark = "✓" if overhead <= TARGETS["floor_overhead"] else "✗"
        lines += [
            "## Floor: the same step without an adapter",
            "",
            "| | median step (s) |",
            "|---|---|",
            f"| frozen base, no adapter (same process, same loop) | {median_of(ours, 'floor_step_s'):.3f} |",
            f"| ours, LoRA r=16 on q, k, v, o | {median_of(ours, 'step_s'):.3f} |",
            f"| adapter overhead over the floor (median per round) | **{100 * overhead:.1f}%** {mark} |",
            "",
        ]
    lines += ["## Every run", "", "| round | configuration | contender | result |", "|---|---|---|---|"]
    for config, runs in results.items():
        for name in CONTENDERS:
            for i, run in enumerate(runs[name]):
                lines.append(f"| {i + 1} | {config} | {name} | {run.get('error') or _summary(run)} |")
    lines.append("")
    if accelerator == "cpu":
        lines += ["## GPU", "", "The GPU figures have not been measured yet. On a machine with one CUDA GPU, run",
                  "", "    python benchmarks/compare.py --accelerator cuda", "",
                  f"which writes the same table, plus peak GPU memory, to benchmarks/{CUDA_RESULTS.name}.", ""]
    return "\n".join(lines)


CUDA_RESULTS = RESULTS.with_name("RESULTS-cuda.md")


def _busy(load_before: str) -> str:
    """A warning when other work shared the CPU: then step times carry that work's noise."""
    highest = max(float(load_before.split(",")[0]), os.getloadavg()[0])
    if highest <= (os.cpu_count() or 1):
        return ""
    return (f" The machine was busy with other work during this run (load up to {highest:.1f} on "
            f"{os.cpu_count()} cores): step times are slower and noisier than on an idle machine; the ratios pair "
            "neighbouring runs to cancel part of it.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of few steps, for development")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run, warm-up included; default 10 (5)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the step time; default 3 (2)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated: lora, qlora, lora_bf16, qlora_bf16 (bf16-mixed); default lora,qlora "
                             "on the CPU, all four on CUDA")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"markdown file for the table; default {RESULTS.name} ({CUDA_RESULTS.name} on CUDA)")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--pretrained-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (5 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if args.child:
        print(json.dumps(run_child(args.child, args.config, steps, warmup, args.pretrained_dir, args.accelerator)))
        return
    default = "lora,qlora,lora_bf16,qlora_bf16" if args.accelerator == "cuda" else "lora,qlora"
    configs = [c for c in (args.configs or default).split(",") if c]
    unknown = set(configs) - set(NAMES)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {sorted(NAMES)}")
    if steps <= warmup:
        parser.error(f"--steps ({steps}) must be larger than --warmup ({warmup})")
    output = args.output or (CUDA_RESULTS if args.accelerator == "cuda" else RESULTS)
    load_before, started = load(), time.perf_counter()

    def write(results: dict, rounds_done: int) -> None:
        text = report(results, rounds_done, rounds, steps, warmup, args.accelerator, load_before,
                      time.perf_counter() - started)
        output.write_text(text)
        if rounds_done == rounds:
            print(text)

    measure(configs, rounds, steps, warmup, args.accelerator, log=lambda text: print(text, flush=True),
            after_round=write)


if __name__ == "__main__":
    main()
