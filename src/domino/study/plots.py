"""The study's figures (headless): curves over epochs with seed bands, diagnostics, final bars with
intervals, t-SNE. Every figure reads the report dict only (plus the t-SNE's embeddings)."""
from __future__ import annotations

import math
import re
from pathlib import Path

from domino.data_quality.plots import _pyplot, panel_grid, plot_tsne

MEM = [("mem_ngram_mean", "8-gram overlap with a training ref ↓"),
       ("mem_cos_mean@backbone", "NN cosine to train, backbone ↓"),
       ("mem_cos_mean@tfidf", "NN cosine to train, TF-IDF ↓")]
ALIGN = [("mmd2@backbone", "MMD², backbone ↓"), ("mmd2@tfidf", "MMD², TF-IDF ↓"),
         ("coverage@backbone", "coverage, backbone ↑"), ("coverage@tfidf", "coverage, TF-IDF ↑")]
DIAG = [("nll_dom_train", "l(x|D), training texts"), ("nll_dom_heldout", "l(x|D), held-out texts"),
        ("nll_pos", "l(x_i|D,S_i): own sample tokens"), ("nll_neg", "l(x_j|D,S_i), j != i"),
        ("contrast_gap", "contrast gap l(x_j|D,S_i) - l(x_i|D,S_i)"),
        ("d_drift", "||D - D0|| / ||D0||"), ("s_drift", "||S - S0|| / ||S0||"),
        ("val/nll_dom", "val/nll_dom (every epoch)")]


def _lines(path: Path, data: dict, panels: list[tuple[str, str]], title: str, xlabel: str = "epoch") -> Path | None:
    present = [(k, lab) for k, lab in panels if any(k in d for d in data.values())]
    if not present:
        return None
    plt = _pyplot()
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, lab) in zip(axes.flat, present):
        for i, (config, metrics) in enumerate(sorted(data.items())):
            if key not in metrics:
                continue
            pts = sorted((int(e), v) for e, v in metrics[key].items())
            xs = [e for e, _ in pts]
            color = plt.cm.tab10(i % 10)
            ax.plot(xs, [v["mean"] for _, v in pts], marker="o", ms=3, color=color, label=config)
            ax.fill_between(xs, [v["min"] for _, v in pts], [v["max"] for _, v in pts], color=color, alpha=0.2)
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title + " (line: mean over seeds; band: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def final_bars(path: Path, report: dict) -> Path | None:
    heads = report["headline"]
    summary = report["summary"]
    configs = list(summary)
    if not configs:
        return None
    plt, fig, axes = panel_grid(len(heads), (3.8, 3.0))
    for ax, h in zip(axes.flat, heads):
        xs, means, errs, colors = [], [], [[], []], []
        for i, c in enumerate(configs):
            d = summary[c].get(h["id"])
            if d is None or d["mean"] is None:
                continue
            xs.append(c)
            means.append(d["mean"])
            lo, hi = d["ci"]
            errs[0].append(max(0.0, d["mean"] - lo) if lo is not None else 0.0)
            errs[1].append(max(0.0, hi - d["mean"]) if hi is not None else 0.0)
            colors.append(plt.cm.tab10((i + 2) % 10))
        ax.bar(range(len(xs)), means, yerr=errs, color=colors, capsize=3)
        for j, c in enumerate(xs):  # the seeds themselves, so the spread is visible beside the interval
            per = summary[c][h["id"]].get("per_seed") or {}
            if len(per) > 1:
                ax.scatter([j] * len(per), list(per.values()), color="black", s=6, zorder=3)
        ax.set_title(f"{h['label']} ({h['better']} better)", fontsize=8)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=35, ha="right", fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    fig.suptitle("final epoch: mean over seeds, 95% half-sampling interval (bars), each seed (dots)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loop_pass1(path: Path, loop: dict) -> Path | None:
    """Part B: Pass@1 per arm (bar: mean over replicates, dots: each replicate, line: the base
    model), and each arm's paired difference from the base model with its 95% interval beside the
    effect the design can detect (shaded: +-detectable)."""
    arms = {n: a for n, a in loop.get("arms", {}).items() if a.get("pass@1") is not None}
    if not arms:
        return None
    plt, fig, axes = panel_grid(2, (5.0, 3.4), cols=2)
    ax = axes[0, 0]
    names = list(arms)
    ax.bar(range(len(names)), [100 * arms[n]["pass@1"] for n in names],
           color=[plt.cm.tab10(i % 10) for i in range(len(names))], alpha=0.8)
    for j, n in enumerate(names):
        reps = list(arms[n]["replicates"].values())
        ax.scatter([j] * len(reps), [100 * v for v in reps], color="black", s=10, zorder=3)
    if "base" in arms:
        ax.axhline(100 * arms["base"]["pass@1"], color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("greedy Pass@1 (%)", fontsize=8)
    ax.set_title(f"Pass@1 on {loop.get('test_problems')} held-out problems", fontsize=9)
    ax = axes[0, 1]
    vs = [(n, a["vs_base"]) for n, a in arms.items() if a.get("vs_base")]
    for j, (n, v) in enumerate(vs):
        d, (lo, hi) = 100 * v["diff"], v["ci"]
        ax.errorbar([j], [d], yerr=[[d - 100 * lo], [100 * hi - d]], fmt="o", capsize=4,
                    color="black" if v["verdict"] in ("A better", "B better") else "gray")
        ax.fill_between([j - 0.3, j + 0.3], -100 * v["detectable"], 100 * v["detectable"], color="tab:blue", alpha=0.12)
    ax.axhline(0, color="gray", lw=1)
    ax.set_xticks(range(len(vs)))
    ax.set_xticklabels([n for n, _ in vs], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("paired difference vs base (points)", fontsize=8)
    ax.set_title("vs base: 95% bootstrap interval; shaded: detectable effect", fontsize=9)
    for a in axes.flat:
        a.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(out_dir: Path, report: dict, tsne_res: dict | None, opt: dict) -> list[Path]:
    figs = [_lines(out_dir / "memorisation_vs_epoch.png", report["curves"], MEM, "Memorisation vs epoch"),
            _lines(out_dir / "alignment_vs_epoch.png", report["curves"], ALIGN, "Alignment and coverage vs epoch"),
            _lines(out_dir / "diagnostics.png", report["diagnostics"], DIAG, "Diagnostics of the mechanism"),
            final_bars(out_dir / "final_bars.png", report)]
    if tsne_res is not None:
        # one seed per trained config keeps the picture readable; every set is in the numbers
        keep = {k: v for k, v in tsne_res["eval_embeddings"].items()
                if not re.search(r"_s\d+(_e\d+)?$", k) or re.search(r"_s0(_e\d+)?$", k)}
        figs.append(plot_tsne({**tsne_res, "eval_embeddings": keep}, out_dir / "tsne.png", opt))
    return [f for f in figs if f is not None]
