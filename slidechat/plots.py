"""Training curves: loss and learning rate per optimizer step, from the training log CSV, as one PNG."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from wsicore.files import atomic_path

LOG_SCALE_RANGE = 20  # max/min of the loss above which its axis is logarithmic


def read_log(csv_path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of a training log CSV as float lists (header: step, loss, lr, ...)."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def loss_scale(loss: list[float]) -> str:
    """"log" for a positive loss spanning more than LOG_SCALE_RANGE, else "linear"."""
    return "log" if min(loss) > 0 and max(loss) / min(loss) > LOG_SCALE_RANGE else "linear"


def plot_training_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path:
    """Draw loss and learning rate against step; written atomically. The loss axis is linear unless the loss
    spans more than LOG_SCALE_RANGE (a nearly flat loss on a log axis gets labels like 6.58x10^0)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    log = read_log(csv_path)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    if log:
        steps, loss = log["step"], log["loss"]
        ax_loss.plot(steps, loss, lw=1, color="tab:blue", label="loss")
        if len(loss) >= 10:  # a running mean reads better than noisy per-step values
            k = max(len(loss) // 20, 2)
            smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
            ax_loss.plot(steps, smooth, lw=2, color="tab:orange", label=f"mean of {k}")
        if loss_scale(loss) == "log":
            # a loss falling over decades reads best on a log axis, labelled as plain numbers (not 10^k)
            ax_loss.set_yscale("log")
            ax_loss.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax_loss.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax_loss.legend()
        ax_lr.plot(steps, log["lr"], color="tab:green")
    ax_loss.set_ylabel("training loss")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_loss.set_title(title or Path(csv_path).parent.name)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return png_path
