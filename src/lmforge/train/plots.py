"""The plot every training verb leaves in its run folder (loss.png): chosen metrics against the step.

Keys that differ only by a prefix share one panel ("loss" and "val/loss"; "reward" and "oracle/reward"), so a
validation curve lies on its training curve; other keys get panels of their own.
"""

from __future__ import annotations

from pathlib import Path


def plot_metrics(records: list[dict], keys: tuple[str, ...], path: Path, title: str) -> Path | None:
    """Plot `keys` of metrics.jsonl `records` (each against its step) into `path`; None if none of them occurs."""
    panels: dict[str, list[str]] = {}
    for key in keys:
        if any(key in r and "event" not in r for r in records):
            panels.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 + 1.8 * len(panels)), squeeze=False, sharex=True)
    for ax, (name, members) in zip(axes[:, 0], panels.items()):
        for key in members:
            points = [(r["step"], r[key]) for r in records if key in r and "event" not in r]
            style = "o-" if len(points) < 30 else "-"
            ax.plot([s for s, _ in points], [v for _, v in points], style, lw=1, ms=3, label=key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
