"""The picture of assessment misalignment: how a model scores the right (positive) and wrong (negative)
chains of the same questions. After VFT the two score distributions overlap (the model cannot tell its
right chains from its wrong ones); AFT should pull them apart. One panel per model, shared x axis."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from aft_fast.eval.metrics import mean_or_none


def plot_score_distributions(
    panels: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "score: length-normalized log-likelihood (nats per token)",
) -> Path:
    """panels: (name, positive scores, negative scores) per model. Writes a PNG (via a temp file, so a
    reader never sees half an image) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(path)
    values = [v for _, p, n in panels for v in (*p, *n)]
    lo, hi = (min(values), max(values)) if values else (-1.0, 0.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * i / 40 for i in range(41)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels) + 0.8), sharex=True, squeeze=False)
    for ax, (name, pos, neg) in zip(axes[:, 0], panels, strict=True):
        ax.hist(neg, bins=bins, alpha=0.55, color="tab:red", label=f"negative (n={len(neg)})")
        ax.hist(pos, bins=bins, alpha=0.55, color="tab:blue", label=f"positive (n={len(pos)})")
        for vals, color in ((pos, "tab:blue"), (neg, "tab:red")):
            m = mean_or_none(vals)
            if m is not None:
                ax.axvline(m, color=color, linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_ylabel("chains", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel(xlabel, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
