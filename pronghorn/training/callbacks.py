"""Training callbacks: a loss log (JSON lines) and a loss-curve picture under the output directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class LossLogCallback(TrainerCallback):
    """Appends every logged metric dict to ``<output_dir>/loss_log.jsonl`` and draws ``loss_curve.png`` at the end."""

    def __init__(self, output_dir: str | None = None):
        self.output_dir = output_dir
        self.history: list[dict] = []

    def _dir(self, args) -> Path:
        path = Path(self.output_dir or args.output_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        self.history.append(entry)
        with open(self._dir(args) / "loss_log.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = plot_loss_curve(state.log_history, self._dir(args) / "loss_curve.png")
            if path:
                logger.info("Loss curve written to %s", path)


def plot_loss_curve(log_history: list[dict], path: Path) -> Path | None:
    """Draw training (and evaluation, if any) loss against step; returns the PNG path or None if no loss."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("pronghorn training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
