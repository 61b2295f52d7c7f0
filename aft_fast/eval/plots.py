"""The pictures of assessment misalignment: how a model scores the right (positive) and wrong (negative)
chains of the same questions. After VFT the two score distributions overlap (the model cannot tell its
right chains from its wrong ones); AFT should pull them apart. One panel per model, shared x axis. On a task
with several solution strategies, `plot_scores_by_form` splits the same scores by the chains' form."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from aft_fast.eval.metrics import mean_or_none


def _pyplot():
    """matplotlib's pyplot on the Agg backend: these plots only ever go to files, never to a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bins(values: Sequence[float]) -> list[float]:
    """40 equal bins over the values' range, shared by every panel so that their histograms line up (a unit
    range around a single value, [-1, 0] when there are none)."""
    lo, hi = (min(values), max(values)) if values else (-1.0, 0.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * i / 40 for i in range(41)]


def _mark_mean(ax, vals: Sequence[float], color: str) -> None:
    """A dashed line at the series' mean (none for an empty series), in the colour of its histogram."""
    m = mean_or_none(vals)
    if m is not None:
        ax.axvline(m, color=color, linestyle="--", linewidth=1)


def _label_panel(ax, name: str) -> None:
    """One panel's title, y label, tick size and legend, alike on every panel of both plots."""
    ax.set_title(name, fontsize=9, loc="left")
    ax.set_ylabel("chains", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="upper left")


def _save(plt, fig, path: Path, title: str) -> Path:
    """Title the figure and write it as a PNG via a temp file, so that a reader never sees half an image."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_score_distributions(
    panels: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "score: length-normalized log-likelihood (nats per token)",
) -> Path:
    """panels: (name, positive scores, negative scores) per model. Writes a PNG (via a temp file, so a
    reader never sees half an image) and returns its path."""
    plt = _pyplot()
    bins = _bins([v for _, p, n in panels for v in (*p, *n)])
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels) + 0.8), sharex=True, squeeze=False)
    for ax, (name, pos, neg) in zip(axes[:, 0], panels, strict=True):
        ax.hist(neg, bins=bins, alpha=0.55, color="tab:red", label=f"negative (n={len(neg)})")
        ax.hist(pos, bins=bins, alpha=0.55, color="tab:blue", label=f"positive (n={len(pos)})")
        for vals, color in ((pos, "tab:blue"), (neg, "tab:red")):
            _mark_mean(ax, vals, color)
        _label_panel(ax, name)
    axes[-1, 0].set_xlabel(xlabel, fontsize=8)
    return _save(plt, fig, Path(path), title)


def plot_scores_by_form(
    items: Sequence[tuple[float, bool, str | None, bool]],
    forms: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "score: length-normalized log-likelihood (nats per token)",
) -> Path:
    """Score histograms by chain form, one PNG: a panel per form (right vs wrong chains of that form,
    unrecognised chains last) and a last panel with the pilot study's split: right chains in the
    reference's form, right chains in another form, wrong chains. items: (score, answer right, form, same
    form as the question's reference) per candidate (`aft_fast.eval.evaluate.form_scores`)."""
    plt = _pyplot()
    names = [*forms, *(["unrecognised"] if any(f is None for _, _, f, _ in items) else [])]
    bins = _bins([s for s, _, _, _ in items])
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(7, 1.7 * (len(names) + 1) + 0.8), sharex=True)
    for ax, name in zip(axes[:-1], names, strict=True):
        mine = [(s, r) for s, r, f, _ in items if (f or "unrecognised") == name]
        _form_panel(
            ax,
            bins,
            [
                ("wrong", [s for s, r in mine if not r], "tab:red"),
                ("right", [s for s, r in mine if r], "tab:blue"),
            ],
            f"form: {name}",
        )
    _form_panel(
        axes[-1],
        bins,
        [
            ("wrong", [s for s, r, _, _ in items if not r], "tab:red"),
            ("right, the reference's form", [s for s, r, _, same in items if r and same], "tab:blue"),
            ("right, another form", [s for s, r, _, same in items if r and not same], "tab:green"),
        ],
        "all forms: right chains by whether they follow the reference's form",
    )
    axes[-1].set_xlabel(xlabel, fontsize=8)
    return _save(plt, fig, Path(path), title)


def _form_panel(ax, bins: list[float], series: list[tuple[str, list[float], str]], name: str) -> None:
    """One panel of the by-form plot: overlaid histograms, each (label, scores, colour) with its mean."""
    for label, vals, color in series:
        ax.hist(vals, bins=bins, alpha=0.5, color=color, label=f"{label} (n={len(vals)})")
        _mark_mean(ax, vals, color)
    _label_panel(ax, name)
