"""Run logging: TensorBoard, Weights & Biases (when installed and asked for), the loss plot, console lines."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, List, Optional


def format_seconds(s: float) -> str:
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunLogger:
    """Scalars to TensorBoard / W&B from the main process; warnings when a backend is missing."""

    def __init__(self, out_dir: Path, backends: List[str], config: dict, run_name: str, enabled: bool, log=print):
        self.tb = None
        self.wandb = None
        self.log = log
        if not enabled:
            return
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(out_dir / "logs"))
            except ImportError:
                log("note: TensorBoard logging is off (pip install tensorboard)")
        if "wandb" in backends:
            try:
                import wandb
                self.wandb = wandb.init(project="rwkv-peft", name=run_name, config=config, dir=str(out_dir),
                                        resume="allow")
            except ImportError:
                log("note: W&B logging was asked for but wandb is not installed (pip install wandb)")
            except Exception as e:  # noqa: BLE001 - a tracker must not stop training
                log(f"note: W&B logging is off ({type(e).__name__}: {e})")

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
        if self.wandb is not None:
            self.wandb.log({tag: text}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(path: Path, losses: List[float], evals: List[dict], title: str = "") -> Optional[Path]:
    """Train loss per step (and a running mean) and eval loss, as a PNG written atomically."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..convert import atomic_path
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = list(range(1, len(losses) + 1))
    if losses:
        ax.plot(steps, losses, color="#9bb8d3", lw=0.8, label="train loss")
        w = max(1, len(losses) // 20)
        if w > 1:
            mean = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1])
                    for i in range(len(losses))]
            ax.plot(steps, mean, color="#1f5f99", lw=1.5, label=f"train loss (mean of {w})")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="#c0392b", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if losses or evals:  # a run stopped before its first step has nothing to label (matplotlib would warn)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


class Throughput:
    """Tokens per second over the steps since the run (or resume) started."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, n: int) -> None:
        self.tokens += n

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else 0.0
