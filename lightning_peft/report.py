"""A run's curves as one PNG, drawn from the ``metrics.csv`` that Lightning's ``CSVLogger`` writes.

Three panels: loss (training per step, validation per evaluation), the task metric (perplexity for causal LM,
accuracy and F1 for classification), and the learning rate. matplotlib is imported only here, when drawing.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning_peft.errors import ConfigError

_METRIC_PANELS = (("val_perplexity",), ("val_accuracy", "val_f1"), ("val_token_accuracy",))


def find_metrics(run_dir: str | os.PathLike) -> Path:
    """The newest ``metrics.csv`` at or below ``run_dir`` from a training run (``validate``/``test`` runs log
    into the same folder and are passed over), or the newest of any run when none trained."""
    run_dir = Path(run_dir)
    found = [run_dir] if run_dir.is_file() else sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"No metrics.csv under {run_dir}; log the run with CSVLogger (the example configs do).")
    trained = [p for p in found if "train_loss" in p.open().readline().strip().split(",")]
    return (trained or found)[-1]


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Each logged column as (step, value) pairs, skipping the rows where it is empty."""
    series: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def draw_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None,
                baseline: str | os.PathLike | None = None) -> Path:
    """Draw loss, task metric and learning rate against step; returns the PNG's path.

    ``baseline`` is the log of a ``validate`` run of the untrained model: its validation values are drawn at
    step 0, so the panels show where training started from.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = find_metrics(run_dir)
    series = read_series(metrics)
    before = read_series(find_metrics(baseline)) if baseline is not None else {}
    metric_keys = next((keys for keys in _METRIC_PANELS if any(k in series for k in keys)), ())
    panels = [("loss", [k for k in ("train_loss", "val_loss") if k in series])]
    panels += [("validation " + ", ".join(metric_keys).replace("val_", ""), [k for k in metric_keys if k in series])]
    panels += [("learning rate", [k for k in series if k == "lr" or k.startswith("lr-")])]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        raise ConfigError(f"{metrics} holds no training or validation curve to draw (columns: {sorted(series)}).")

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*series[key])
            line = ax.plot(steps, values, marker="o" if len(values) < 30 else None, label=key)[0]
            if key.startswith("val_") and key in before:
                ax.plot(0, before[key][-1][1], marker="s", color=line.get_color(), linestyle="none",
                        label=f"{key} (baseline)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(metrics.parent))
    fig.tight_layout()
    target = Path(output) if output is not None else metrics.parent / "report.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
