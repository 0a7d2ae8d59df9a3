"""Plots of the data-quality report: a 2-D t-SNE of the embeddings, one colour per set, and one bar
chart per metric. Headless (Agg backend)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_tsne(res: dict, path: Path, opt: dict) -> Path | None:
    """t-SNE of training references, held-out target, and every set's evaluated subsample (each
    capped at tsne.max_points_per_set, seeded), all in the report's centred/normalised space."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    cap, seed = opt["tsne"]["max_points_per_set"], opt["seed"]
    rng = np.random.default_rng(seed)
    groups = [("train refs", res["train_embeddings"]), ("held-out target", res["target"])]
    groups += list(res["eval_embeddings"].items())
    names, blocks = [], []
    for name, x in groups:
        if len(x) > cap:
            x = x[np.sort(rng.choice(len(x), cap, replace=False))]
        names += [name] * len(x)
        blocks.append(x)
    z = np.concatenate(blocks)
    if len(z) < 5:
        log.warning("t-SNE skipped: only %d points", len(z))
        return None
    perplexity = float(min(opt["tsne"]["perplexity"], (len(z) - 1) / 3))
    # one OpenMP thread: on a shared, loaded CPU sklearn's Barnes-Hut threads spin-wait on each other
    # (measured: 40 points, 18 s with 2 threads vs 0.4 s with 1)
    with threadpool_limits(1, user_api="openmp"):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                  metric="cosine").fit_transform(z)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6))
    names_arr = np.array(names)
    markers = {"train refs": "*", "held-out target": "s"}
    for i, (name, _) in enumerate(groups):
        m = names_arr == name
        ax.scatter(xy[m, 0], xy[m, 1], s=40 if name in markers else 12, marker=markers.get(name, "o"),
                   color=plt.cm.tab10(i % 10), alpha=0.9 if name in markers else 0.6,
                   label=f"{name} ({int(m.sum())})", edgecolors="black" if name in markers else "none",
                   linewidths=0.4)
    ax.set_title(f"t-SNE of embeddings (cosine, perplexity {perplexity:.0f})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, markerscale=1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def panel_grid(n: int, size: tuple[float, float], cols: int = 4):
    """(pyplot, figure, axes) for `n` panels of `size` inches, `cols` to a row (axes always 2-D)."""
    plt = _pyplot()
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return plt, fig, axes


def plot_metrics(rows: dict, metrics: list[tuple[str, str, str]], path: Path) -> Path | None:
    """One bar chart per metric (a grid of panels), one bar per set; the `heldout` ceiling hatched."""
    present = [(k, lab, arrow) for k, lab, arrow in metrics if any(rows[s].get(k) is not None for s in rows)]
    if not present:
        return None
    plt, fig, axes = panel_grid(len(present), (3.6, 2.8))
    sets = list(rows)
    colors = [plt.cm.tab10((i + 2) % 10) for i in range(len(sets))]  # 0/1 are the reference groups in t-SNE
    for ax, (k, lab, arrow) in zip(axes.flat, present):
        vals = [rows[s].get(k) for s in sets]
        heights = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(range(len(sets)), heights, color=colors)
        for b, s, v in zip(bars, sets, vals):
            if s == "heldout":
                b.set_hatch("//")
                b.set_edgecolor("black")
            h = b.get_height()
            ax.annotate("n/a" if v is None else f"{v:.3g}", (b.get_x() + b.get_width() / 2, h),
                        ha="center", va="bottom" if h >= 0 else "top", fontsize=7)
        ax.set_title(f"{lab} ({arrow} better)", fontsize=9)
        ax.set_xticks(range(len(sets)))
        ax.set_xticklabels(sets, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.18)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
