"""Training curves as a PNG: losses and validation MAP@5 per epoch, one set of lines per ensemble member."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from whalefast.core.files import atomic_path


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    """train/valid loss and MAP@5 per epoch, as a PNG; one set of lines per member where `history` has a member column (ensembles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    groups = history.groupby("member") if "member" in history else [(None, history)]
    for i, (member, rows) in enumerate(groups):
        tag, style = ("", "o-") if member is None else (f" (member {member})", ["o-", "s--", "^:", "d-."][i % 4])
        ax1.plot(rows.epoch, rows.train_loss, style, color="tab:blue", label="train loss" + tag)
        ax1.plot(rows.epoch, rows.valid_loss, style, color="tab:orange", label="valid loss" + tag)
        scored = rows.dropna(subset=["map5"])  # epochs without a MAP@5 (fit --map-every)
        ax2.plot(scored.epoch, scored.map5, style, color="tab:green", label="valid MAP@5" + tag)
        ax2.plot(scored.epoch, scored.top1, style, color="tab:olive", label="valid top-1" + tag)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize="small")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
