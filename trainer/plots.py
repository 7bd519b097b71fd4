"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from .utils import read_jsonl


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, out: Path, dpi: int = 100) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out


def loss_curves(log_path: Path, out: Path) -> Path:
    """One panel per stage, one line per loss term (unweighted values) and the weighted total."""
    plt = pyplot()
    recs = read_jsonl(log_path)
    stages = [s for s in ("teacher", "baseline", "student") if any(r["stage"] == s for r in recs)]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rs = [r for r in recs if r["stage"] == stage]
        keys = [k for k in rs[-1] if k not in ("stage", "iter", "lr", "time", "run")]
        for k in keys:
            pts = [(r["iter"], r[k]) for r in rs if k in r and r[k] > 0]
            if pts:
                ax.plot(*zip(*pts), label=k, lw=2.2 if k == "total" else 1.2)
        ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    return save(fig, out)


def miou_vs_tc(metrics: dict, out: Path) -> Path:
    """Accuracy against temporal consistency per model, as in the paper's Fig. 5."""
    fig, ax = pyplot().subplots(figsize=(4.8, 3.8))
    for name, m in metrics.items():
        if isinstance(m, dict) and "miou" in m:
            ax.scatter(m["tc"], m["miou"], s=40)
            ax.annotate(name, (m["tc"], m["miou"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("TC (%)")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    return save(fig, out)
