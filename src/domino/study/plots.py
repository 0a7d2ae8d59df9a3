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
        ("d_drift", "||D - D0|| / ||D0||"), ("val/nll_dom", "val/nll_dom (every epoch)")]


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
