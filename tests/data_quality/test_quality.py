"""Data-quality metrics: known answers on hand-made strings and synthetic embeddings, and the
report end to end on the tiny backbone."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from domino.data_quality import metrics as Q
from domino.data_quality.compute import compute_report, options, sample_paths
from domino.data_quality.run import run_data_quality

from ..conftest import CONF, TINY


def _ws(texts):
    return [t.split() for t in texts]


# ------------------------------------------------------------------ text metrics
def test_tokenize_regex():
    assert Q.tokenize("x=foo(1, y_2)  # ok") == ["x", "=", "foo", "(", "1", ",", "y_2", ")", "#", "ok"]
    assert Q.tokenize("Def A", lowercase=True) == ["def", "a"]


def test_distinct_n_hand_computed():
    toks = _ws(["a b a b", "a c"])
    # unigrams a b a b a c: 3 unique of 6; bigrams ab ba ab ac: 3 of 4; trigrams aba bab: 2 of 2
    assert Q.distinct_n(toks, 1) == pytest.approx(3 / 6)
    assert Q.distinct_n(toks, 2) == pytest.approx(3 / 4)
    assert Q.distinct_n(toks, 3) == pytest.approx(1.0)
    assert Q.distinct_n(_ws(["a", "b"]), 2) == 0.0  # no bigrams at all


def test_bleu_known_values():
    ref = "a b c d e f g h".split()
    assert Q.bleu(ref, [ref]) == pytest.approx(1.0)
    # all n-gram precisions are 1, brevity penalty exp(1 - 8/4)
    assert Q.bleu("a b c d".split(), [ref]) == pytest.approx(math.exp(-1))
    assert Q.bleu("x y z w".split(), [ref]) < 1e-2


def test_self_bleu_extremes():
    same = _ws(["the cat sat on the mat"] * 5)
    assert Q.self_bleu(same) == pytest.approx(1.0)
    disjoint = [[f"w{i}_{j}" for j in range(10)] for i in range(6)]
    assert Q.self_bleu(disjoint) < 1e-2
    assert math.isnan(Q.self_bleu(same[:1]))


def test_self_bleu_matches_pairwise_oracle():
    rng = np.random.default_rng(0)
    vocab = list("abcdefg")
    toks = [list(rng.choice(vocab, rng.integers(3, 15))) for _ in range(12)]
    oracle = np.mean([Q.bleu(t, toks[:i] + toks[i + 1:]) for i, t in enumerate(toks)])
    assert Q.self_bleu(toks, subsample=None) == pytest.approx(oracle, rel=1e-9)
    # subsampling is seeded: same seed, same value; smaller than corpus
    assert Q.self_bleu(toks, subsample=6, seed=1) == Q.self_bleu(toks, subsample=6, seed=1)


# ------------------------------------------------------------------ embedding metrics
def test_vendi_identical_and_orthogonal():
    k = 7
    assert Q.vendi_score(np.tile(np.random.default_rng(0).normal(size=(1, 16)), (k, 1))) == pytest.approx(1.0)
    assert Q.vendi_score(np.eye(k) * 3.0) == pytest.approx(k)
    x = np.random.default_rng(1).normal(size=(30, 8))
    assert Q.vendi_score(x, dual=True) == pytest.approx(Q.vendi_score(x, dual=False), rel=1e-8)
    assert 1.0 < Q.vendi_score(x) < 8.0 + 1e-9  # rank ≤ d


def test_frechet_identical_shifted_and_forms_agree():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    assert Q.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    wide = rng.normal(size=(20, 50))  # n < d: the dual (nuclear-norm) form
    assert Q.frechet_distance(wide, wide) == pytest.approx(0.0, abs=1e-8)
    y = rng.normal(size=(300, 6)) * 2.0
    assert Q.frechet_distance(x, y, "dual") == pytest.approx(Q.frechet_distance(x, y, "primal"), rel=1e-6)
    # N(0, I) vs N(0, 4I): d·(1 + 4 − 2·2) = d
    big_x, big_y = rng.normal(size=(20000, 6)), rng.normal(size=(20000, 6)) * 2.0
    assert Q.frechet_distance(big_x, big_y) == pytest.approx(6.0, rel=0.05)
    shift = np.zeros(6)
    shift[0] = 10.0
    assert Q.frechet_distance(x, x + shift) == pytest.approx(100.0, rel=1e-6)


def test_mmd_identical_same_distribution_and_disjoint():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    n = len(x)
    sigma = Q.median_bandwidth(x)
    k = np.exp(-Q.sq_dists(x, x) / (2 * sigma ** 2))
    off = (k.sum() - n) / (n * (n - 1))
    ident = Q.mmd2(x, x, bandwidth=sigma)
    assert ident == pytest.approx(-(2 / n) * (1 - off), rel=1e-9)  # the U-statistic's known value
    assert -2 / n <= ident <= 0
    assert Q.mmd2(x, x, bandwidth=sigma, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    same = Q.mmd2(x, rng.normal(size=(300, 5)), bandwidth=sigma)
    far = Q.mmd2(x, rng.normal(size=(300, 5)) + 50.0, bandwidth=sigma)
    assert abs(same) < 0.01
    assert far > 0.3 and far > 30 * abs(same)


def test_prdc_identical_disjoint_and_half():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(100, 4))
    same = Q.prdc(real, real.copy(), k=5)
    assert same["precision"] == 1.0 and same["coverage"] == 1.0 and same["recall"] == 1.0
    assert same["density"] == pytest.approx(1.0, rel=0.01) or same["density"] >= 1.0
    far = Q.prdc(real, rng.normal(size=(80, 4)) + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # reals in two far clusters, fakes near the points of one: half the reals are covered
    two = np.concatenate([rng.normal(size=(50, 4)), rng.normal(size=(50, 4)) + 100.0])
    half = Q.prdc(two, two[:50] + 1e-6, k=5)
    assert half["coverage"] == 0.5 and half["precision"] == 1.0


# ------------------------------------------------------------------ memorisation
def test_ngram_overlap_known_values():
    refs = _ws(["a b c d e f", "p q"])
    samples = _ws(["a b c d e f", "a b c d x y", "u v w z", "p q", ""])
    ov, arg = Q.ngram_overlap(samples, refs, n=3)
    # abc bcd cde def ⊂ ref 0; abc bcd of {abc, bcd, cdx, dxy}; nothing; short exact copy; empty
    np.testing.assert_allclose(ov, [1.0, 0.5, 0.0, 1.0, 0.0])
    assert list(arg) == [0, 0, -1, 1, -1]


def test_full_memorisation_row():
    rng = np.random.default_rng(0)
    train_t = [" ".join(f"t{i}_{j}" for j in range(12)) for i in range(10)]
    held_t = [" ".join(f"h{i}_{j}" for j in range(12)) for i in range(12)]
    train_e, held_e = rng.normal(size=(10, 8)), rng.normal(size=(12, 8))
    res = compute_report({"copy": (train_t, train_e.copy()), "far": (held_t[:6], held_e[:6] + 30),
                          "empty": ([], np.zeros((0, 8)))},
                         (train_t, train_e), (held_t, held_e), {"knn_k": 2})
    empty = res["rows"].pop("empty")  # an empty file: its row is n/a, the others are unaffected
    assert empty["n"] == 0 and math.isnan(empty["vendi"]) and "near_copy_share" not in empty
    copy = res["rows"]["copy"]
    assert copy["mem_ngram_mean"] == 1.0 and copy["mem_cos_mean"] == pytest.approx(1.0)
    assert copy["near_copy_share"] == 1.0
    far = res["rows"]["far"]
    assert far["mem_ngram_mean"] == 0.0 and far["coverage"] == 0.0 and far["precision"] == 0.0
    assert far["frechet"] > copy["frechet"]
    # size matching: every row evaluated on the smallest set (ceiling = 6 of 12 held-out)
    assert {r["n"] for r in res["rows"].values()} == {6}
    assert res["rows"]["copy"]["n_total"] == 10


# ------------------------------------------------------------------ config / inputs
def test_options_and_config_fragment():
    from omegaconf import OmegaConf
    frag = OmegaConf.merge(OmegaConf.load(CONF / "quality" / "default.yaml"), {"paths": {"log_dir": "/tmp/x"}})
    opt = options(frag.data_quality)
    assert opt["memorisation"]["ngram_n"] == 8 and opt["cache_dir"] == "/tmp/x/data_quality/embed_cache"
    assert options({"memorisation": {"ngram_n": 5}})["memorisation"]["ngram_threshold"] == 0.8
    with pytest.raises(ValueError, match="unknown option"):
        options({"knn": 3})


def test_sample_paths_forms():
    assert sample_paths({"a": "x/a.jsonl"}) == {"a": "x/a.jsonl"}
    assert sample_paths(["x/a.jsonl", "y/b.jsonl"]) == {"a": "x/a.jsonl", "b": "y/b.jsonl"}
    assert sample_paths("x/a.jsonl") == {"a": "x/a.jsonl"}
    with pytest.raises(ValueError, match="collide"):
        sample_paths(["x/a.jsonl", "y/a.jsonl"])
    with pytest.raises(ValueError, match="reserved"):
        sample_paths({"heldout": "h.jsonl"})
    with pytest.raises(ValueError):
        sample_paths(None)


# ------------------------------------------------------------------ end to end on the tiny backbone
def _write(path, texts):
    path.write_text("".join(json.dumps({"id": f"{path.stem}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return str(path)


@pytest.mark.slow
def test_run_data_quality_end_to_end(tmp_path):
    from omegaconf import OmegaConf
    refs = [f"def add_{i}(a, b):\n    return a + b * {i}" for i in range(8)]
    held = [f"def mul_{i}(x, y):\n    return x * y - {i}" for i in range(10)]
    noise = [" ".join(f"zz{i}q{j}" for j in range(6)) for i in range(9)]
    run = tmp_path / "run"
    run.mkdir()
    refs_path = _write(run / "references.jsonl", refs)
    _write(run / "heldout.jsonl", held)  # found next to references by default
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "quality" / "default.yaml"), {
        "references": refs_path,
        "samples": {"copy": _write(tmp_path / "copy.jsonl", refs), "noise": _write(tmp_path / "noise.jsonl", noise)},
        "backbone": dict(TINY), "paths": {"output_dir": str(tmp_path / "out"), "log_dir": str(tmp_path / "logs")},
        "data_quality": {"embed": {"batch_size": 4}, "knn_k": 3, "tsne": {"perplexity": 5}}})
    report = run_data_quality(cfg)
    out = tmp_path / "out"
    from domino.stages import STAGES
    arts = STAGES["data_quality"].result(report, cfg)["artifacts"]  # the stage table names every file it wrote
    assert arts == {"report": str(out / "data_quality.json"), "report_md": str(out / "data_quality.md"),
                    "per_sample": str(out / "data_quality_samples.jsonl")}
    for f in ("data_quality.json", "data_quality.md", "data_quality_samples.jsonl", "tsne.png", "metrics.png"):
        assert (out / f).stat().st_size > 0, f
    for f in ("tsne.png", "metrics.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "data_quality.json").read_text())
    assert on_disk == report
    rows = report["rows"]
    assert set(rows) == {"copy", "noise", "heldout"}
    assert rows["copy"]["mem_ngram_mean"] == 1.0 and rows["copy"]["near_copy_share"] == 1.0
    assert rows["copy"]["mem_cos_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows["noise"]["mem_ngram_mean"] == 0.0
    assert rows["heldout"]["n"] == 5 and rows["copy"]["n"] == 5  # size-matched to the ceiling half
    assert report["protocol"]["n_target"] == 5 and report["inputs"]["heldout"]["n"] == 10
    md = (out / "data_quality.md").read_text()
    assert "| copy |" in md and "![tsne.png](tsne.png)" in md
    per_sample = [json.loads(line) for line in (out / "data_quality_samples.jsonl").read_text().splitlines()]
    assert len(per_sample) == 8 + 9 and all(r["near_copy"] for r in per_sample if r["set"] == "copy")
    assert [r["overlap_ref_id"] for r in per_sample if r["set"] == "copy"] == [f"references{i}" for i in range(8)]
    assert all(r["overlap_ref_id"] is None for r in per_sample if r["set"] == "noise")
    # embeddings cached by content: a second run reads them back and reproduces the numbers
    cached = sorted((tmp_path / "logs" / "data_quality" / "embed_cache").glob("*.npy"))
    assert len(cached) == 3  # references, heldout, noise: `copy` has the references' texts, one entry
    cfg.paths.output_dir = str(tmp_path / "out2")
    cfg.data_quality.plots = False
    again = run_data_quality(cfg)
    assert again["rows"] == report["rows"]
    assert sorted((tmp_path / "logs" / "data_quality" / "embed_cache").glob("*.npy")) == cached


def test_embedder_masks_padding(tiny_backbone):
    from domino.data_quality.embed import Embedder
    e = Embedder(tiny_backbone.model, tiny_backbone.tokenizer, "tiny", batch_size=2)
    alone = e.encode(["def f(x): return x"])
    batched = e.encode(["def f(x): return x", "a much longer text " * 10, ""])
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)  # padding must not leak into the mean
    assert batched.shape == (3, 64) and np.isfinite(batched).all()


@pytest.mark.parametrize("config,extra", [("data_quality", []), ("evaluate", ["task=data_quality"])])
def test_data_quality_options_compose_in_its_own_config_and_the_older_spelling(tmp_path, config, extra):
    """The data_quality stage's top config, and evaluate.yaml for the older `task=data_quality`,
    both carry the options (conf/quality/default.yaml) at the root, with the CLI form of samples=."""
    from domino.core.config import compose
    cfg = compose(config, [*extra, "references=run/references.jsonl", "samples={domino: a.jsonl, few_shot: b.jsonl}",
                           "data_quality.knn_k=3", "paths.output_dir=/tmp/x", f"paths.root_dir={tmp_path}"])
    assert sample_paths(cfg.samples) == {"domino": "a.jsonl", "few_shot": "b.jsonl"}
    opt = options(cfg.data_quality)
    assert opt["knn_k"] == 3 and opt["cache_dir"] == f"{tmp_path}/lightning_logs/data_quality/embed_cache"
    assert cfg.heldout is None and cfg.references == "run/references.jsonl"


def test_missing_references_file_is_named_by_evaluate(tmp_path):
    """evaluate task=data_quality dispatches here, and a missing references= file is the error
    (not the held-out file derived from it)."""
    from omegaconf import OmegaConf

    from domino.stages import evaluate
    cfg = OmegaConf.create({"task": "data_quality", "references": str(tmp_path / "nope" / "references.jsonl"),
                            "samples": {"a": str(tmp_path / "a.jsonl")}, "heldout": None, "data_quality": {},
                            "paths": {"output_dir": str(tmp_path / "out")}, "backbone": None})
    with pytest.raises(FileNotFoundError, match=r"references=.*nope/references.jsonl: no such file"):
        evaluate(cfg)


@pytest.mark.slow
def test_data_quality_py_runs_as_a_process(tmp_path):
    """The data_quality stage's own entry script, on the tiny backbone."""
    import subprocess
    import sys

    from ..conftest import ROOT
    refs = _write(tmp_path / "references.jsonl", [f"def f{i}(a):\n    return a + {i}" for i in range(6)])
    _write(tmp_path / "heldout.jsonl", [f"def g{i}(b):\n    return b * {i}" for i in range(6)])
    sset = _write(tmp_path / "s.jsonl", [f"def h{i}(c):\n    return c - {i}" for i in range(6)])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "data_quality.py", "backbone=tiny", f"references={refs}",
                           f"samples={{mine: {sset}}}", "data_quality.knn_k=2", "data_quality.tsne.perplexity=2",
                           "data_quality.plots=false", f"hydra.run.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(json.loads((out / "data_quality.json").read_text())["rows"]) == {"mine", "heldout"}
