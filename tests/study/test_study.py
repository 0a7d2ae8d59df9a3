"""The evidence study: its statistics, and a smoke configuration end to end on the tiny backbone."""
import json
import shutil

import numpy as np
import pytest
import torch

from domino.study import stats as S

from ..conftest import ROOT


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
    from domino.core.prompts import init_tokens
    emb = torch.randn(100, 64) * 0.05
    x = init_tokens(4000, emb, "normal", torch.Generator().manual_seed(0))
    assert x.shape == (4000, 64) and x.std().item() == pytest.approx(1.0, abs=0.02)


# ------------------------------------------------------------------ the smoke study
def _study_cfg(tmp_path, extra=()):
    from domino.core.config import compose
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
    # the ceiling beside every set at one size: the smallest of the final sets and the ceiling (half
    # the held-out split); in the smoke study the sample sets are the smaller ones
    cm = report["ceiling_size_matched"]
    assert cm["n"] == min(r["n"] for r in report["sets"]["final"].values())
    assert set(cm["summary"]) == set(report["summary"]) and all(len(v) == len(heads) for v in cm["summary"].values())
    assert cm["summary"]["heldout (ceiling)"] != pytest.approx(
        {m: report["summary"]["heldout (ceiling)"][m]["mean"] for m in heads})  # rescored on fewer texts
    sweep = json.loads((out / "sweep.json").read_text())
    assert set(sweep["picked"]) == {"soft_prompt", "domino_l1"} and sweep["picked"]["soft_prompt"] in (0.05, 0.1)
    md = (out / "report.md").read_text()
    for section in ("## Decision rule", "## Final epoch", "## Comparisons", "## The paper's claims",
                    "## Over training", "## Wall time", "At the ceiling's size",
                    "fitted on the training references only"):
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

    # a new machine (no work dir, no checkpoints): every training run is done, and a missing sample
    # set is made again from the committed copy of D (<dir>/prompts/), the same tensor the run exported
    elsewhere = _study_cfg(tmp_path, [f"study.dir={copy}", f"study.work_dir={tmp_path / 'new_machine'}"])
    assert all(t.done() for t in Study(elsewhere).tasks() if t.kind == "train")
    _check_committed_prompts(Study(cfg), Study(elsewhere), "soft_prompt", 0, epoch=1)
    (copy / "samples" / "soft_prompt_s0_e1.jsonl").unlink()
    st = Study(elsewhere)
    tasks = {t.name: t for t in st.tasks()}
    winner = f"train soft_prompt seed 0 {st.lr_tag(st.lr_of('soft_prompt'))}"
    assert winner in tasks["sample soft_prompt_s0_e1"].needs() and tasks[winner].done()
    again = st.run(progress=False)
    assert again["executed"] == ["sample soft_prompt_s0_e1"]
    remade, first_made = (d / "samples" / "soft_prompt_s0_e1.jsonl" for d in (copy, out))
    assert remade.read_text() == first_made.read_text()
    # a study committed before the copy existed: with a sample set missing, the run that made it is
    # trained again first (here the seed-0 sweep winner, which this design reuses as the seed-0 result)
    shutil.rmtree(copy / "prompts")
    (copy / "samples" / "soft_prompt_s0_e1.jsonl").unlink()
    tasks = {t.name: t for t in Study(elsewhere).tasks()}
    assert not tasks[winner].done()


def _check_committed_prompts(here, elsewhere, config: str, seed: int, epoch: int) -> None:
    """The committed copy of D is the tensor the run exported, with its metadata, and is what a
    sample set on another machine reads."""
    from domino.core.domain_prompt import load_domain_prompt
    lr = here.lr_of(config)
    ran, kept = here.prompt_path(config, seed, lr, epoch), here.prompt_path(config, seed, lr, epoch, committed=True)
    assert ran.exists() and kept.exists() and kept.stat().st_size < 2 ** 20
    a, b = load_domain_prompt(ran), load_domain_prompt(kept)
    assert torch.equal(a.tokens, b.tokens) and a.meta == b.meta
    kept_there = elsewhere.prompt_path(config, seed, lr, epoch, committed=True)
    assert elsewhere.sampling_prompt(config, seed, lr, epoch) == kept_there


# ------------------------------------------------------------------ the Qwen study's structure (Part A + B)
@pytest.mark.slow
def test_qwen_smoke_study_runs_both_parts_and_resumes(tmp_path):
    """study_qwen's task kinds on the tiny backbone: pilot and its verdict, the base model's Pass@1,
    a separate-seed sweep, a fixed-rate config, a borrower, baselines at two seeds, curation, LoRA
    SFT and Pass@1 per arm and replicate, both reports; the first replicate of every arm runs before
    the rest of Part A; a rerun skips everything; the committed files recompute the loop report."""
    from domino.core.config import compose
    from domino.study.loop_report import write_loop_report
    from domino.study.run import Study
    cfg = compose("study", ["experiment=study_qwen_smoke", f"study.work_dir={tmp_path / 'work'}",
                            f"study.dir={tmp_path / 'results'}", f"paths.root_dir={ROOT}",
                            "paths.output_dir=" + str(tmp_path / "hydra"), "progress=false"])
    first = Study(cfg).run(progress=False)
    out = tmp_path / "results"
    from domino.stages import STAGES
    res = STAGES["study"].result(first, cfg)  # the table's shape: the study's committed directory and reports
    assert res["output_dir"] == str(out) and res["metrics"]["n_executed"] == len(first["executed"])
    assert set(res["artifacts"]) == {"report_md", "report_json", "loop_report_md", "loop_report_json"}
    ex = first["executed"]
    assert ex[:4] == ["pilot released", "pilot tuned", "pilot verdict", "evaluate base"]
    assert not any(t.startswith("train") and t.endswith("seed 100") for t in ex)  # sweeps are named sweep
    assert sum(t.startswith("sweep ") for t in ex) == 2 + 2  # soft prompt x 2 rates, DOMINO x 2 rates
    # every arm's replicate 0 is evaluated before any replicate-1 work and before the tuned configs train
    last_r0 = max(ex.index(f"evaluate {a}_r0") for a in ("domino", "soft_prompt", "few_shot", "zero_shot"))
    assert last_r0 < ex.index("curate domino_r1") and last_r0 < ex.index("train tuned_bounded seed 0")
    # then replicate 1 of every arm (the headline's spread), still before the rest of Part A
    last_r1 = max(ex.index(f"evaluate {a}_r1") for a in ("domino", "soft_prompt", "few_shot", "zero_shot"))
    assert last_r1 < ex.index("train tuned_bounded seed 0")
    # and Part B's report is written (committed) at once, not only at the study's end
    last_eval = max(i for i, t in enumerate(ex) if t.startswith("evaluate "))
    assert ex[last_eval + 1] == "loop report" and last_eval + 1 < ex.index("train tuned_bounded seed 0")

    # a one-rate config (the released recipe) waits for no sweep; a swept one waits for the pick
    needs = {t.name: t.needs() for t in Study(cfg).tasks()}
    assert needs["train released_domino seed 0"] == [] and needs["train tuned_domino seed 0"] == ["pick learning rates"]

    pilot = json.loads((out / "pilot.json").read_text())
    assert set(pilot["regimes"]) == {"released", "tuned"} and pilot["chosen"] in ("released", "tuned")
    for d in pilot["regimes"].values():
        assert {"s_drift", "s_move_max_std", "nll_pos", "nll_dom_train", "works"} <= set(d)
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["picked"]["released_domino"] == 1e-3 and sweep["values"]["released_domino"] == {"0.001": None}
    assert len(sweep["values"]["tuned_domino"]) == 2 and sweep["epochs"] == 1
    assert "tuned_bounded" not in sweep["picked"] and sweep["borrow"] == {"tuned_bounded": "tuned_domino"}

    loop = json.loads((out / "loop_report.json").read_text())
    assert loop["test_problems"] == 10 and loop["val_problems_excluded"] == 4
    split = json.loads((out / "loop" / "split.json").read_text())
    assert not set(split["test"]) & set(split["val"]) and not set(split["test"]) & set(split["references"])
    for arm in ("domino", "soft_prompt", "few_shot", "zero_shot"):
        a = loop["arms"][arm]
        assert set(a["replicates"]) == {"0", "1"} and a["spread"] is not None
        assert {"diff", "ci", "detectable", "floor", "verdict"} <= set(a["vs_base"])
        assert a["self_check"]["fires"] in (True, False)
        assert all(v["n_records"] == 4 for v in a["sft"].values())
        assert (out / "loop" / "adapters" / f"{arm}_r0" / "adapter_config.json").exists()
        assert (out / "loop" / "eval" / f"{arm}_r1" / "completions.jsonl").exists()
    assert loop["missing_arms"] == {"references": "no SFT records"}  # the tiny model's answers never pass
    assert {(c["a"], c["b"]) for c in loop["comparisons"]} == {("domino", "base"), ("domino", "zero_shot"),
                                                               ("domino", "soft_prompt"), ("domino_tuned", "domino")}
    # an arm added after the design was fixed: the same rule, marked, never silently one of the questions
    assert loop["extension"]["arms"] == ["domino_tuned"] and loop["arms"]["domino_tuned"]["vs_base"]
    assert [c["extension"] for c in loop["comparisons"]] == [False, False, False, True]
    md = (out / "loop_report.md").read_text()
    assert "| domino_tuned † |" in md and "† An extension, not part of the design fixed before the run" in md
    assert "| domino |" in md and "| domino † |" not in md
    for section in ("## Pilot", "## Pass@1", "## Between arms", "## SFT data", "## Decision rule"):
        assert section in md
    assert (out / "report.md").exists() and (out / "final_bars.png").exists() and (out / "loop_pass1.png").exists()
    part_a = (out / "report.md").read_text()
    wall = part_a[part_a.index("## Wall time"):]
    for kind in ("pilot", "learning-rate sweep", "training", "sampling", "curation", "SFT", "Pass@1 evaluation"):
        assert f"\n| {kind} | " in wall, kind  # every kind of task is in the study's wall time, not only training
    assert "s_drift" in part_a and "d_drift" in part_a  # the sample tokens' drift beside D's

    again = Study(cfg).run(progress=False)
    assert again["executed"] == []
    # a report written before a run was scored (an arm added later) is stale: the report task runs again
    stale = json.loads((out / "loop_report.json").read_text())
    del stale["arms"]["domino_tuned"]
    (out / "loop_report.json").write_text(json.dumps(stale))
    assert Study(cfg).run(progress=False)["executed"] == ["loop report"]
    assert json.loads((out / "loop_report.json").read_text()) == loop
    copy = tmp_path / "committed"
    shutil.copytree(out, copy)
    assert write_loop_report(copy, cfg.study) == loop
    from domino.study.run import run as run_study
    (copy / "loop_report.json").unlink()
    (copy / "loop_pass1.png").unlink()
    recomputed = run_study(compose("study", ["experiment=study_qwen_smoke", "stage=report", f"study.dir={copy}",
                                             f"study.work_dir={tmp_path / 'work'}", f"paths.root_dir={ROOT}",
                                             "paths.output_dir=" + str(tmp_path / "hydra_report"),
                                             "progress=false"]))["report"]["loop"]
    assert recomputed == loop and (copy / "loop_pass1.png").exists()
    moved = compose("study", ["experiment=study_qwen_smoke", f"study.work_dir={tmp_path / 'work'}",
                              "study.dir=" + str(copy), f"paths.root_dir={ROOT}",
                              "paths.output_dir=" + str(tmp_path / "hydra"), "progress=false"])
    # adapter weights stay out of git: a scored adapter without them is done, an unscored one is not
    for f in (copy / "loop" / "adapters" / "domino_r0").glob("adapter_model.*"):
        f.unlink()
    assert next(t for t in Study(moved).tasks() if t.name == "finetune domino_r0").done()
    shutil.rmtree(copy / "loop" / "eval" / "domino_r0")
    assert not next(t for t in Study(moved).tasks() if t.name == "finetune domino_r0").done()

    # a new machine: the committed results without the work dir (no checkpoints). A finished run
    # whose sample sets all exist is not trained again; one with a sample set missing is.
    elsewhere = compose("study", ["experiment=study_qwen_smoke", f"study.work_dir={tmp_path / 'new_machine'}",
                                  "study.dir=" + str(copy), f"paths.root_dir={ROOT}",
                                  "paths.output_dir=" + str(tmp_path / "hydra"), "progress=false"])
    trains = {t.name: t for t in Study(elsewhere).tasks() if t.kind == "train"}
    assert trains and all(t.done() for t in trains.values()), [n for n, t in trains.items() if not t.done()]
    (copy / "samples" / "released_domino_s0_e2.jsonl").unlink()
    trains = {t.name: t for t in Study(elsewhere).tasks() if t.kind == "train"}
    assert trains["train released_domino seed 0"].done()  # its sample set reads the committed D
    st = Study(elsewhere)
    shutil.rmtree(copy / "prompts" / f"released_domino_s0_{st.lr_tag(st.lr_of('released_domino'))}")
    trains = {t.name: t for t in Study(elsewhere).tasks() if t.kind == "train"}
    assert not trains["train released_domino seed 0"].done()
    assert trains["train released_soft_prompt seed 0"].done() and trains["sweep tuned_domino seed 100 lr1e-1"].done()


def test_loop_report_names_runs_trained_on_fewer_records_than_the_rest():
    from domino.study.loop_report import render
    funnel = {"set": "s", "n_samples": 200, "n_sft": 90}
    rep = {"test_problems": 3, "val_problems_excluded": 1, "n_records": 64, "arms": {}, "comparisons": [],
           "rule": "r", "curation": {"a_r0": {**funnel, "n_trained": 64}, "b_r0": {**funnel, "n_trained": 64}}}
    assert "every SFT run trains on 64 records." in render(rep)
    rep["curation"]["references_r0"] = {"set": "references", "answers": 120, "n_sft": 49, "n_trained": 49}
    md = render(rep)
    assert "except where curation kept fewer: references_r0 on 49" in md
    assert "| references_r0 | references | 120 answers | 49 | 49 |" in md
    assert "## How the answers fail" not in md
    rep["outcomes"] = {"base": {"passed": 63, "failed": 50, "error": 14, "timeout": 0, "other": 1, "truncated": 12,
                                "tokens": 38483}}
    assert "| base | 63 | 50 | 14 | 0 | 1 | 12 | 38483 |" in render(rep)


def test_study_commits_its_results_dir_only(tmp_path):
    import subprocess

    from domino.core.config import compose
    from domino.study.run import Study
    repo = tmp_path / "repo"
    (repo / "results" / "s").mkdir(parents=True)
    run = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    run("init", "-q")
    run("config", "user.email", "t@t")
    run("config", "user.name", "t")
    (repo / "other.txt").write_text("not the study's")
    (repo / "results" / "s" / "a.json").write_text("{}")
    cfg = compose("study", ["experiment=study_smoke", "study.commit=true", f"study.dir={repo / 'results' / 's'}",
                            f"paths.root_dir={repo}", f"paths.output_dir={tmp_path / 'h'}"])
    Study(cfg).commit("pilot released")
    assert run("log", "--format=%s").stdout.strip() == "results/study_smoke: pilot released"
    assert run("show", "--name-only", "--format=").stdout.split() == ["results/s/a.json"]
    Study(cfg).commit("nothing new")  # nothing to commit: logged, not raised


def test_pilot_verdict_needs_the_sample_tokens_to_move_and_to_beat_their_init():
    from domino.study.pilot import verdict
    rule = {"margin": 0.01, "min_s_drift": 1e-3}
    init = {"epoch": 0, "nll_dom_train": 1.57, "nll_pos": 1.555, "s_drift": 0.0}
    learnt = {"epoch": 3, "nll_dom_train": 1.50, "nll_pos": 1.40, "s_drift": 0.05}
    assert verdict([init, learnt], rule)["works"]
    # a gain no larger than at init (random extra prefix tokens) is not the sample tokens working
    same = {"epoch": 3, "nll_dom_train": 1.50, "nll_pos": 1.485, "s_drift": 0.05}
    v = verdict([init, same], rule)
    assert v["pos_gain_over_dom"] > 0.01 and not v["own_text_more_likely"] and not v["works"]
    assert not verdict([init, {**learnt, "s_drift": 1e-4}], rule)["works"]  # S did not move
    assert not verdict([init, {**learnt, "nll_pos": 1.6}], rule)["works"]  # own text less likely


def _loop_dir(tmp_path, runs: dict[str, list[int]], test=("t0", "t1", "t2", "t3")):
    """study.dir/loop with split.json and, per run, a summary and per-problem verdicts (c of n=1)."""
    loop = tmp_path / "loop"
    loop.mkdir(parents=True, exist_ok=True)
    (loop / "split.json").write_text(json.dumps({"references": ["r"], "val": ["v"], "test": list(test)}))
    for name, cs in runs.items():
        d = loop / "eval" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text("{}")
        (d / "results.jsonl").write_text("".join(json.dumps({"task_id": t, "c": c, "n": 1}) + "\n"
                                                 for t, c in zip(test, cs)))
    return loop


def test_loop_report_pairs_replicates_and_names_unscored_ones(tmp_path):
    from omegaconf import OmegaConf

    from domino.study.loop_report import compute, render
    s = OmegaConf.create({"sft": {"arms": {"a": {}, "b": {}}, "replicates": 2, "n_records": 4,
                                  "compare": [["a", "b"], ["a", "base"]]}, "bootstrap": {"n": 200, "seed": 0}})
    _loop_dir(tmp_path, {"base": [1, 0, 0, 0], "a_r0": [1, 1, 1, 1], "a_r1": [1, 1, 0, 0], "b_r0": [1, 0, 0, 0]})
    rep = compute(tmp_path, s)
    assert rep["arms"]["b"]["missing_replicates"] == [1] and rep["arms"]["a"]["missing_replicates"] == []
    ab = next(c for c in rep["comparisons"] if c["b"] == "b")
    assert sorted(round(p["diff"], 2) for p in ab["pairings"]) == [0.25, 0.75]  # a_r1 - b_r0, a_r0 - b_r0
    assert ab["verdict"].startswith("not counted")  # b has one replicate: no spread
    a_base = next(c for c in rep["comparisons"] if c["b"] == "base")
    assert [p["b_rep"] for p in a_base["pairings"]] == ["-", "-"]
    md = render(rep)
    assert "| b | 25.0 | 25.0, r1 not scored |" in md and "+25.0 to +75.0 (" in md
    # a problem scored twice, one outside the test set, or a malformed count is an error naming the file
    bad = tmp_path / "loop" / "eval" / "a_r1" / "results.jsonl"
    good = bad.read_text()
    bad.write_text(good + json.dumps({"task_id": "t0", "c": 1, "n": 1}) + "\n")
    with pytest.raises(ValueError, match=r"a_r1/results.jsonl:5: t0 is scored twice"):
        compute(tmp_path, s)
    bad.write_text(good + json.dumps({"task_id": "v", "c": 1, "n": 1}) + "\n")
    with pytest.raises(ValueError, match="outside the test set"):
        compute(tmp_path, s)
    bad.write_text(good.replace('"c": 1, "n": 1', '"c": 2, "n": 1', 1))
    with pytest.raises(ValueError, match=r"results.jsonl:1: t0: expected 0 <= c <= n"):
        compute(tmp_path, s)


def test_loop_report_marks_a_replicate_check_whose_interval_touches_zero():
    from domino.study.loop_report import _fires
    assert _fires({"fires": False, "ci": [0.0, 0.094]}) == " (interval touches 0)"
    assert _fires({"fires": False, "ci": [-0.01, 0.09]}) == ""
    assert _fires({"fires": True, "ci": [0.01, 0.09]}) == " (interval alone fires)"


def test_an_extension_arm_must_be_an_arm():
    from omegaconf import OmegaConf

    from domino.study.loop_report import extension_arms
    s = OmegaConf.create({"sft": {"arms": {"domino": {"config": "x"}}, "extension": {"arms": ["domino", "dommino"]}}})
    with pytest.raises(ValueError, match=r"study.sft.extension.arms: \['dommino'\]"):
        extension_arms(s)
    assert extension_arms(OmegaConf.create({"sft": {"arms": {"domino": {"config": "x"}}}})) == []
