"""The evidence study: its statistics, and a smoke configuration end to end on the tiny backbone."""
import json
import shutil

import numpy as np
import pytest
import torch

from domino.study import stats as S

from .conftest import ROOT


# ------------------------------------------------------------------ statistics
def test_half_sampling_interval_of_a_mean_matches_its_standard_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    emb = rng.normal(size=(400, 3))
    reps = S.bootstrap_set(emb, emb[:50], 1.0, 5, {"ngram_overlap": x, "nn_cosine": x, "near_copy": x > 0},
                           [["a"]] * 400, n=2000, seed=1, keys=("mem_ngram_mean",))["mem_ngram_mean"]
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert reps.std(ddof=1) == pytest.approx(se, rel=0.1)
    lo, hi = S.interval(x.mean(), reps)
    assert lo < x.mean() < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)


def _summary(values, reps_scale, seed=0):
    rng = np.random.default_rng(seed)
    per_seed = dict(enumerate(values))
    reps = {s: v + rng.normal(scale=reps_scale, size=500) for s, v in per_seed.items()}
    return S.summarise(per_seed, reps, 0.95)


def test_decision_rule_needs_both_the_noise_floor_and_the_interval():
    far = S.compare(_summary([0.50, 0.51, 0.52], 0.005), _summary([0.30, 0.31, 0.32], 0.005, 1), "↑", 0.95)
    assert far["verdict"] == "a" and far["exceeds_floor"] and far["ci_excludes_zero"]
    assert S.compare(_summary([0.50, 0.51, 0.52], 0.005), _summary([0.30, 0.31, 0.32], 0.005, 1),
                     "↓", 0.95)["verdict"] == "b"
    # precise samples, but the seeds disagree more than the methods do: no verdict
    seedy = S.compare(_summary([0.40, 0.50, 0.60], 0.001), _summary([0.45, 0.46, 0.47], 0.001, 1), "↑", 0.95)
    assert seedy["ci_excludes_zero"] and not seedy["exceeds_floor"] and seedy["verdict"] == "none"
    # seeds agree, but the sampling noise covers the difference: no verdict
    noisy = S.compare(_summary([0.50, 0.50, 0.50], 0.2), _summary([0.48, 0.48, 0.48], 0.2, 1), "↑", 0.95)
    assert noisy["exceeds_floor"] and not noisy["ci_excludes_zero"] and noisy["verdict"] == "none"


def test_claims_follow_the_verdicts():
    comps = {S.metric_id(k, s): {"verdict": "none"} for k, s, *_ in S.HEADLINE}
    c = S.claims(comps, "domino", "soft_prompt")
    assert c["alignment_at_least_as_good"]["holds"] and not c["less_memorisation"]["holds"]
    comps["mem_ngram_mean"]["verdict"] = "a"
    comps["coverage@tfidf"]["verdict"] = "b"
    c = S.claims(comps, "domino", "soft_prompt")
    assert c["less_memorisation"]["holds"]
    assert not c["alignment_at_least_as_good"]["holds"] and not c["more_coverage_or_diversity"]["holds"]


def test_normal_init_is_the_released_codes_unit_gaussian():
    from domino.training.prompts import init_tokens
    emb = torch.randn(100, 64) * 0.05
    x = init_tokens(4000, emb, "normal", torch.Generator().manual_seed(0))
    assert x.shape == (4000, 64) and x.std().item() == pytest.approx(1.0, abs=0.02)


# ------------------------------------------------------------------ the smoke study
def _study_cfg(tmp_path, extra=()):
    from domino.config import compose
    return compose("study", ["experiment=study_smoke", f"study.work_dir={tmp_path / 'work'}",
                             f"study.dir={tmp_path / 'results'}", f"paths.root_dir={ROOT}",
                             "paths.output_dir=" + str(tmp_path / "hydra"), "progress=false", *extra])


@pytest.mark.slow
def test_smoke_study_produces_every_field_and_plot_and_resumes(tmp_path):
    from domino.study.run import Study, run
    cfg = _study_cfg(tmp_path)
    first = Study(cfg).run(progress=False)
    out = tmp_path / "results"
    n_train = 2 * 2 + 2  # sweep: 2 configs x 2 rates; then seed 1 of each
    assert sum(t.startswith("train") for t in first["executed"]) == n_train
    assert {p.name for p in out.glob("*.png")} == {"memorisation_vs_epoch.png", "alignment_vs_epoch.png",
                                                   "diagnostics.png", "final_bars.png", "tsne.png"}
    report = json.loads((out / "study.json").read_text())
    heads = [h["id"] for h in report["headline"]]
    assert set(report["summary"]) == {"soft_prompt", "domino_l1", "few_shot", "zero_shot", "magpie",
                                      "heldout (ceiling)"}
    for config in ("soft_prompt", "domino_l1"):
        for mid in heads:
            d = report["summary"][config][mid]
            assert d["n_seeds"] == 2 and len(d["ci"]) == 2 and d["ci"][0] <= d["mean"] <= d["ci"][1], (config, mid)
        # a curve point per export epoch, each with both seeds
        assert set(report["curves"][config]["mem_ngram_mean"]) == {"1", "2"}
        assert len(report["curves"][config]["mmd2@tfidf"]["2"]["per_seed"]) == 2
        diag = report["diagnostics"][config]
        assert set(diag["d_drift"]) == {"0", "1", "2"} and diag["d_drift"]["2"]["mean"] > 0
    assert report["diagnostics"]["domino_l1"]["contrast_gap"]["2"]["mean"] is not None
    assert "contrast_gap" not in report["diagnostics"]["soft_prompt"]
    assert set(report["comparisons"]) == {"domino_l1 vs soft_prompt", "domino_l1 vs few_shot"}
    assert set(report["claims"]["domino_l1"]) == {"alignment_at_least_as_good", "less_memorisation",
                                                  "more_coverage_or_diversity"}
    sweep = json.loads((out / "sweep.json").read_text())
    assert set(sweep["picked"]) == {"soft_prompt", "domino_l1"} and sweep["picked"]["soft_prompt"] in (0.05, 0.1)
    md = (out / "report.md").read_text()
    for section in ("## Decision rule", "## Final epoch", "## Comparisons", "## The paper's claims",
                    "## Over training", "## Wall time"):
        assert section in md
    n_sets = len(list((out / "samples").glob("*.jsonl")))
    assert n_sets == 2 * 2 + 3 + 2 * 2  # finals, baselines, curve points at epoch 1

    # a rerun skips every finished task
    again = Study(_study_cfg(tmp_path)).run(progress=False)
    assert again["executed"] == [] and again["skipped"] == len(Study(cfg).tasks())

    # the results directory alone recomputes every number (what results/study_* commits)
    copy = tmp_path / "committed"
    shutil.copytree(out, copy)
    recomputed = run(_study_cfg(tmp_path, ["stage=report", f"study.dir={copy}"]))["report"]
    for key in ("summary", "comparisons", "claims", "curves", "diagnostics", "sets"):
        assert recomputed[key] == report[key], key
