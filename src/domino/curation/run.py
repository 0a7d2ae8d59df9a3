"""The curation stage: samples.jsonl -> curated.jsonl -> sft.jsonl, plus curation_report.{md,json}.

    from domino.curation.run import run_curation
    run_curation(cfg.curation, "<run>/samples.jsonl", "<run>")

Stages run in the order of STAGES, each switchable (`<stage>.enabled`), each writing its own
files under <out_dir>/curation (see stages.py) and skipped when its output for the same input
and config exists; the model stages append record by record and resume where they stopped.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from domino.core import lineage
from domino.core.config import plain
from domino.core.generation.chat import stage_engine
from domino.core.locking import output_lock
from domino.core.records import RecordError, iter_jsonl, write_jsonl
from domino.curation import sources as S
from domino.curation.stages import StageFiles, stage_fingerprint

log = logging.getLogger(__name__)
STAGES = ("normalise", "exact_dedup", "near_dup", "memorisation", "decontaminate", "judge", "responses",
          "code_checks")
LLM_STAGES = ("judge", "responses", "code_checks")
SFT_INDEX = len(STAGES) + 1
MATCHES = "decontamination_matches.jsonl"


def _read_input(path: Path) -> list[dict]:
    recs, seen = [], {}
    for lineno, rec in iter_jsonl(path, required=("id", "text")):
        if not isinstance(rec["text"], str):
            raise RecordError(path, lineno, f"`text` must be a string, got {type(rec['text']).__name__}")
        if rec["id"] in seen:
            raise RecordError(path, lineno, f"duplicate id {rec['id']!r} (first at line {seen[rec['id']]})")
        seen[rec["id"]] = lineno
        recs.append(rec)
    return recs


def _backbone_key(b: dict | None) -> dict | None:
    # where a model is cached says nothing about what it computes
    return {k: v for k, v in b.items() if k != "cache_dir"} if b else None


class Curation:
    def __init__(self, cfg: Any, samples_path: str | Path, out_dir: str | Path, references=None,
                 eval_sets: list | None = None, backbone: dict | None = None,
                 generators: Callable | dict[str, Callable] | None = None, progress: bool = True):
        self.cfg = dict(plain(cfg) or {})
        self.samples_path, self.out_dir = Path(samples_path), Path(out_dir)
        if not self.samples_path.exists():
            raise FileNotFoundError(f"samples={self.samples_path}: no such file")
        self.root = self.out_dir / self.cfg.get("dir", "curation")
        self.found = S.run_sources(self.samples_path)
        self.references = references if references is not None else (
            self.cfg.get("memorisation", {}).get("references") or self.found["references"])
        self.eval_sets = list(eval_sets or [])
        self.backbone = dict(plain(backbone)) if backbone else self.found["backbone"]
        self.generators = generators
        self.progress = progress
        self.metas: dict[str, dict] = {}

    # ------------------------------------------------------------------ helpers
    def stage_cfg(self, name: str) -> dict:
        return dict(self.cfg.get(name) or {})

    def _injected(self, role: str) -> Callable | None:
        """The generator the caller passed for `role` (`generators=`), or None: build the model's."""
        g = self.generators
        return g.get(role) or g.get("default") if isinstance(g, dict) else g

    def generator(self, role: str, model_key: str = "model", gen_key: str = "generation") -> Callable:
        g = self._injected(role)
        if g is not None:
            return g
        from domino.core.generation.chat import build_generator
        stage = role if role != "tests" else "code_checks"
        c = self.stage_cfg(stage)
        return build_generator(c.get(model_key), self.run_backbone(c.get(model_key)), c.get(gen_key) or {},
                               f"curation.{stage}.{gen_key}",
                               logprob=role == "judge" and c.get("mode") == "logprob",
                               shared_engine=self.cfg.get("engine"))

    def run_backbone(self, model_cfg: Any) -> dict | None:
        """The backbone a model stage without its own `model.path` defaults to: backbone=, else the
        one the samples' lineage.json names. A lineage written before it named one is refused rather
        than silently replaced by the default model."""
        own = model_cfg.get("path") if isinstance(model_cfg, dict) else model_cfg
        if self.backbone is None and not own and self.found.get("backbone_unknown"):
            raise ValueError(f"{lineage.lineage_path(self.samples_path)} does not name the backbone the samples "
                             "were drawn from (written by an older version): rerun the synthesize command that "
                             "made them (every sample is kept; lineage.json is rewritten), or name the model with "
                             "backbone=<group> or curation.<stage>.model.path=")
        return self.backbone

    def injected(self, role: str) -> bool:
        g = self.generators
        return (g.get(role) or g.get("default")) is not None if isinstance(g, dict) else g is not None

    def check_engines(self) -> None:
        """Before any stage runs: each model stage's engine exists and can run here (vLLM installed,
        not with the judge's logprob mode), so a bad choice fails now, not after the filters."""
        from domino.core.generation.chat import check_engine
        for role, stage, gen_key in (("judge", "judge", "generation"), ("responses", "responses", "generation"),
                                     ("tests", "code_checks", "tests_generation")):
            c = self.stage_cfg(stage)
            if not c.get("enabled", True) or (stage == "code_checks" and not c.get("run_tests")) \
                    or self.injected(role):
                continue
            check_engine(c.get(gen_key) or {}, f"curation.{stage}.{gen_key}",
                         logprob=stage == "judge" and c.get("mode") == "logprob", shared=self.cfg.get("engine"))
            self.run_backbone(c.get("tests_model" if role == "tests" else "model"))

    def model_identity(self, role: str, model_key: str = "model") -> Any:
        g = self.generators
        if isinstance(g, dict):
            g = g.get(role) or g.get("default")
        if g is not None:
            from domino.core.generation.chat import fingerprint_of
            return {"injected": fingerprint_of(g)}
        from domino.core.generation.chat import teacher_config
        c = self.stage_cfg(role if role != "tests" else "code_checks")
        return _backbone_key(teacher_config(c.get(model_key), self.run_backbone(c.get(model_key))))

    def decontam_specs(self) -> list[dict]:
        c = self.stage_cfg("decontaminate")
        specs = [S.eval_set_spec(s) for s in list(c.get("eval_sets") or []) + self.eval_sets]
        heldout = c.get("heldout", "auto")
        held = self.found["heldout"]
        if heldout not in ("auto", True, False):
            raise ValueError(f"decontaminate.heldout={heldout!r}: expected auto, true or false")
        if heldout and held is not None:
            specs.insert(0, S.eval_set_spec({"name": "heldout", "format": "jsonl",
                                             "path": str(held) if not isinstance(held, list) else None,
                                             "records": held if isinstance(held, list) else None}))
        elif heldout is True:
            raise FileNotFoundError("decontaminate.heldout=true but the samples' run names no heldout.jsonl "
                                    "(its lineage.json -> heldout); add it to decontaminate.eval_sets")
        elif heldout == "auto":
            log.warning("curation: the run of %s records no held-out split; decontaminating against the "
                        "configured eval sets only: %s", self.samples_path, [s["name"] for s in specs] or "none")
        names = [s["name"] for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"decontaminate.eval_sets: duplicate names {names}; give each a `name`")
        return specs

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        # one writer per directory: two curations would each append every model-stage verdict
        with output_lock(self.out_dir, "curate"):
            return self._run()

    def check_same_samples(self) -> None:
        """Refuse a directory that holds the curation of another sample set (its stage files would be
        replaced and its model-stage verdicts mixed with this set's). The set is named by its
        synthesis fingerprint (lineage.json: the same set extended to a larger n keeps it), else
        by the file's sha256; `<curation dir>/samples_source.json` records it."""
        import json

        from domino.core.provenance import file_sha256
        fp = self.found.get("fingerprint") or f"sha256:{file_sha256(self.samples_path)}"
        rec = self.root / "samples_source.json"
        if rec.exists():
            old = json.loads(rec.read_text())
            if old.get("fingerprint") != fp:
                raise FileExistsError(
                    f"{self.root} holds the curation of samples {old.get('path')} (set {old.get('fingerprint')}); "
                    f"samples={self.samples_path} is set {fp}: curate into another output_dir, or delete "
                    f"{self.root} to start over")
        else:
            from domino.core.records import write_text_atomic
            write_text_atomic(rec, json.dumps({"path": str(self.samples_path.resolve()), "fingerprint": fp}))

    def _run(self) -> dict[str, Any]:
        from domino.curation.report import write_report
        _read_input(self.samples_path)  # validate up front: file:line for a bad record
        self.check_engines()
        self.check_same_samples()
        from domino.core import attempt
        attempt.accept(self.out_dir)  # the run owns out_dir from here: its record and log are written there
        current = self.samples_path
        funnel = []
        for i, name in enumerate(STAGES, start=1):
            c = self.stage_cfg(name)
            if not c.get("enabled", True):
                funnel.append({"stage": name, "enabled": False})
                continue
            if name == "code_checks" and not self._responses_on() and not _any_response(current):
                note = "no responses to check (responses.enabled=false)"
                log.info("curation code_checks: skipped, %s", note)
                funnel.append({"stage": name, "enabled": False, "note": note})
                continue
            files = StageFiles(self.root, i, name)
            meta = getattr(self, "_" + name)(files, current, c)
            self.metas[name] = meta
            keys = ("n_in", "n_out", "n_dropped", "reasons", "skipped")
            funnel.append({"stage": name, "enabled": True, **{k: meta[k] for k in keys}})
            current = files.kept
        result = self._sft(current)
        lineage.write(self.out_dir, lineage.read(self.samples_path),
                      curation_input=str(Path(self.samples_path).resolve()),
                      curated=str(Path(result["curated"]).resolve()),
                      sft=str(Path(result["sft"]).resolve()) if result["sft"] else None)
        report = write_report(self.out_dir, self.root, funnel, self.metas, result, self.cfg.get("report") or {})
        result.update(report)
        result["output_dir"] = str(self.out_dir)
        return result

    def _fp(self, current: Path, c: dict, *extra: Any) -> str:
        return stage_fingerprint(S.file_hash(current), c, *extra)

    def _pure(self, files: StageFiles, current: Path, c: dict, fn: Callable, *extra: Any) -> dict:
        fp = self._fp(current, c, *extra)
        info = {"input": str(current), "n_in": sum(1 for _ in iter_jsonl(current))}
        if files.status(fp) == "done":
            log.info("curation %s: up to date, skipped", files.name)
            return {**files.meta(), "skipped": True}
        files.begin(fp, info)
        recs = [r for _, r in iter_jsonl(current)]
        kept, dropped, *more = fn(recs)
        files.write_all(kept, dropped)
        meta = files.finish(fp, info, more[0] if more else None)
        log.info("curation %s: %d -> %d (%s)", files.name, info["n_in"], meta["n_out"], meta["reasons"])
        return {**meta, "skipped": False}

    def _incremental(self, files: StageFiles, current: Path, c: dict, fn: Callable, batch_size: int,
                     extra: Any, summarise: Callable | None = None, gen_key: str = "generation") -> dict:
        """A model stage: records are appended as they are decided, so a rerun after a crash does
        only the records without a verdict. When only the input changed (an upstream stage was
        re-tuned) verdicts of records whose text (and response) are unchanged are reused."""
        from domino.core.progress import Bar
        from domino.core.records import JsonlStore
        files.recover()  # a crash mid-write left a torn last line: cut it (logged), redo that record
        cfp = stage_fingerprint(_model_stage_config(c, self.cfg.get("engine")), extra)
        fp = stage_fingerprint(S.file_hash(current), cfp)
        recs = [r for _, r in iter_jsonl(current)]
        info = {"input": str(current), "n_in": len(recs), "model": extra, "config_fingerprint": cfp,
                "engine": (stage_engine(c.get(gen_key) or {}, self.cfg.get("engine"))["name"]
                           if extra is not None else None)}
        old = files.meta() or {}
        reuse = _load_reusable(files) if old.get("fingerprint") != fp and old.get("config_fingerprint") == cfp else {}
        status = files.status(fp)
        if status == "done":
            log.info("curation %s: up to date, skipped", files.name)
            return {**files.meta(), "skipped": True}
        done = files.done_ids() if status == "partial" else set()
        if status == "new":
            files.begin(fp, info)
        todo = [r for r in recs if r["id"] not in done]
        n_reused = 0
        log.info("curation %s: %d records to do (%d already done, %d reusable)", files.name, len(todo),
                 len(done), len(reuse))
        with JsonlStore(files.kept) as ka, JsonlStore(files.dropped) as da, \
                Bar(f"curation:{files.name}", len(recs), "records", self.progress, completed=len(done)) as bar:
            for s in range(0, len(todo), max(1, batch_size)):
                batch = todo[s:s + batch_size]
                fresh = [r for r in batch if _reuse_key(r, files.name) not in reuse]
                made = iter(fn(fresh) if fresh else [])
                for r in batch:
                    prev = reuse.get(_reuse_key(r, files.name))
                    out = _merge(r, prev, files.name) if prev is not None else next(made)
                    n_reused += prev is not None
                    (da if "dropped" in out else ka).add(out)
                bar.advance(len(batch))
        meta = files.finish(fp, info, {**(summarise(files) if summarise else {}), "n_reused": n_reused})
        log.info("curation %s: %d -> %d (%s)", files.name, len(recs), meta["n_out"], meta["reasons"])
        return {**meta, "skipped": False}

    # ------------------------------------------------------------------ stages
    def _normalise(self, files, current, c):
        from domino.curation.text import normalise
        kw = {k: c[k] for k in ("min_chars", "max_chars", "min_words", "max_words", "drop_truncated") if k in c}
        return self._pure(files, current, c, lambda rs: normalise(rs, **kw))

    def _exact_dedup(self, files, current, c):
        from domino.curation.text import exact_dedup
        return self._pure(files, current, c, lambda rs: exact_dedup(rs, bool(c.get("lowercase", True))))

    def _near_dup(self, files, current, c):
        from domino.curation.neardup import near_dedup
        keys = ("threshold", "shingle", "shingle_size", "num_perm", "recall_margin", "fn_weight", "seed")
        kw = {k: c[k] for k in keys if k in c}
        return self._pure(files, current, c, lambda rs: near_dedup(rs, **kw))

    def _memorisation(self, files, current, c):
        from domino.curation.overlap import memorisation_filter
        if self.references is None:
            raise FileNotFoundError(
                f"curation.memorisation needs the references the domain tokens were trained on and "
                f"the lineage.json of {self.samples_path} names none: set references=<train run>/references.jsonl, "
                "curation.memorisation.references=<train run>/references.jsonl or curation.memorisation.enabled=false")
        refs = S.load_texts(self.references, "memorisation.references")
        kw = {k: c[k] for k in ("n", "max_ngram_overlap", "max_lcs_ratio", "lcs_candidates") if k in c}
        return self._pure(files, current, {**c, "references": None}, lambda rs: memorisation_filter(rs, refs, **kw),
                          S.describe(self.references))

    def _decontaminate(self, files, current, c):
        from domino.curation.overlap import EvalIndex, decontaminate
        specs = self.decontam_specs()
        ident = [S.describe({k: v for k, v in s.items()}) for s in specs]
        matches_path = self.root / MATCHES

        def fn(rs):
            index = EvalIndex(int(c.get("n", 13)), int(c.get("min_words", 6)))
            for s in specs:
                for item_id, field, text in S.load_eval_items(s):
                    index.add(s["name"], item_id, field, text)
            kept, dropped, matches = decontaminate(rs, index)
            write_jsonl(matches_path, matches)
            return kept, dropped, {"eval_sets": {s["name"]: index.items.get(s["name"], 0) for s in specs},
                                   "n_matches": len(matches), "matches_file": str(matches_path)}
        meta = self._pure(files, current, {**c, "eval_sets": None}, fn, ident)
        if not matches_path.exists():  # deleted by hand after a complete run: redo
            files.reset()
            meta = self._pure(files, current, {**c, "eval_sets": None}, fn, ident)
        return meta

    def _judge(self, files, current, c):
        from domino.curation.judge import LABELS, UNKNOWN
        from domino.curation.llm_stages import judge_batch
        gen_holder: dict = {}

        def fn(batch):
            if "g" not in gen_holder:  # built once, on the first batch that needs the model
                gen_holder["g"] = self.generator("judge")
            return judge_batch(batch, gen_holder["g"], c)

        def summarise(files):
            dist = {g: 0 for g in LABELS + (UNKNOWN,)}
            for p in (files.kept, files.dropped):
                for _, r in iter_jsonl(p):
                    dist[r["checks"]["judge"].split(":")[-1]] += 1
            return {"grades": dist}
        return self._incremental(files, current, c, fn, self._chunk(c, "judge"), self.model_identity("judge"),
                                 summarise)

    def _responses(self, files, current, c):
        from domino.curation.llm_stages import responses_batch
        gen_holder: dict = {}

        def fn(batch):
            if "g" not in gen_holder:
                gen_holder["g"] = self.generator("responses")
            return responses_batch(batch, gen_holder["g"], c)
        return self._incremental(files, current, c, fn, self._chunk(c, "responses"), self.model_identity("responses"))

    def _code_checks(self, files, current, c):
        from domino.curation.code_checks import make_sandbox
        from domino.curation.llm_stages import code_batch
        held: dict = {}
        run_tests = bool(c.get("run_tests"))

        def fn(batch):
            if run_tests and "g" not in held:
                held["g"] = self.generator("tests", "tests_model", "tests_generation")
                held["sandbox"] = make_sandbox(c.get("sandbox") or {})
            return code_batch(batch, c, held.get("g"), held.get("sandbox"))
        ident = self.model_identity("tests", "tests_model") if run_tests else None
        bs = self._chunk(c, "tests", "tests_generation") if run_tests else 256
        return self._incremental(files, current, c, fn, bs, ident, gen_key="tests_generation")

    def _chunk(self, c: dict, role: str, gen_key: str = "generation") -> int:
        """Records per model call and per append to the stage file: `chunk`, else `batch_size`, or 4x
        that where the HF engine decodes with refill (rows refilled within a call need records to
        refill with; not for an injected generator or the logprob judge, which decode nothing)."""
        g = c.get(gen_key) or {}
        if g.get("chunk"):
            return int(g["chunk"])
        bs = int(g.get("batch_size", 8))
        if self._injected(role) is not None or (role == "judge" and c.get("mode") == "logprob"):
            return bs
        ecfg = stage_engine(g, self.cfg.get("engine"))
        return 4 * bs if ecfg["name"] == "hf" and ecfg.get("refill") else bs

    def _responses_on(self) -> bool:
        return bool(self.stage_cfg("responses").get("enabled", True))

    def _sft(self, current: Path) -> dict[str, Any]:
        """curated.jsonl always; sft.jsonl (+ the dataset) only when every curated record has a
        response. Without responses (responses.enabled=false: the user brings a teacher) the SFT
        export is skipped with a note, and the SFT files an earlier run wrote here are removed so
        that none is taken for this run's."""
        from domino.curation.sft import save_dataset, to_sft
        c = self.stage_cfg("sft")
        files = StageFiles(self.root, SFT_INDEX, "sft")
        curated, sft_path = self.out_dir / "curated.jsonl", self.out_dir / "sft.jsonl"
        ds_path = self.out_dir / c.get("dataset_dir", "sft_dataset")
        recs = [r for _, r in iter_jsonl(current)]
        missing = [r["id"] for r in recs if not r.get("response")]
        export = not missing and (bool(recs) or self._responses_on())
        note = None if export else _no_sft_note(len(missing), len(recs), self._responses_on(), curated)
        save_ds = export and bool(c.get("save_dataset", True))
        outputs = [curated] + ([sft_path] if export else []) + ([ds_path] if save_ds else [])
        fp = self._fp(current, c, export)
        result = {"curated": str(curated), "n_curated": len(recs), "sft": str(sft_path) if export else None,
                  "sft_dataset": str(ds_path) if save_ds else None, "sft_note": note}
        meta = files.meta() or {}
        if not export:
            _remove_stale_sft(meta, curated, sft_path)
            log.info("curation: %s", note)
        if meta.get("fingerprint") == fp and meta.get("complete") and all(p.exists() for p in outputs):
            return {**result, "n_sft": meta["n_sft"]}
        files.reset()
        files.begin(fp, {"input": str(current), "n_in": len(recs)})
        write_jsonl(curated, recs)
        sft = []
        if export:
            sft = [to_sft(r, c.get("format", "chat"), c.get("user_template", "{text}"), c.get("system"))
                   for r in recs]
            write_jsonl(sft_path, sft)
            if save_ds:
                save_dataset(sft, ds_path)
        files.write_meta({"stage": "sft", "fingerprint": fp, "complete": True, "input": str(current),
                          "n_in": len(recs), "n_sft": len(sft), "note": note, "outputs": [str(p) for p in outputs]})
        log.info("curation: %d curated records -> %s%s", len(recs), curated, f", {sft_path}" if export else "")
        return {**result, "n_sft": len(sft)}


def _any_response(path: Path) -> bool:
    return any(r.get("response") for _, r in iter_jsonl(path))


def _no_sft_note(n_missing: int, n: int, responses_on: bool, curated: Path) -> str:
    why = ("the responses stage is disabled (curation.responses.enabled=false)" if not responses_on
           else f"{n_missing} of {n} curated records have no `response`")
    return (f"SFT export skipped: {why}. {curated.name} holds the {n} filtered problems with their checks; "
            "for SFT data bring your own teacher (each record's `text` field is the problem) or run the "
            "responses stage (curation.responses.enabled=true, curation.responses.model=...).")


def _remove_stale_sft(meta: dict, curated: Path, sft_path: Path) -> None:
    """Remove the SFT files an earlier curation into this directory recorded as its outputs: they
    belong to other curated records. A file of that name this curation did not write is left alone."""
    import shutil
    ours = {Path(p) for p in meta.get("outputs") or []} - {curated}
    for p in sorted(ours):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        log.warning("curation: removed %s, the SFT output of an earlier curation here (this one has none)", p)
    if sft_path.exists() and sft_path not in ours:
        log.warning("curation: %s was not written by this curation and is not its SFT output", sft_path)


def _model_stage_config(c: dict, shared_engine: dict | None = None) -> dict:
    """The part of a model stage's config its fingerprint hashes: the model settings are replaced
    by the identity of the model they resolve to (hashed beside it), and the engine by what changes
    outputs. On the HF engine that is nothing (device and threads change only the speed): the block
    fingerprints as it did before engines were a choice, with its runtime keys at their old defaults
    (device auto, num_threads null), so upgrading never redoes a finished stage. On vLLM it is the
    resolved engine settings."""
    from domino.core.generation.factory import RUNTIME_KEYS, SCHEDULE_KEYS
    out = {**c, **{k: None for k in ("model", "tests_model") if k in c}}
    for k in ("generation", "tests_generation"):
        if k not in out:
            continue
        g = dict(out.get(k) or {})
        ecfg = stage_engine(g, shared_engine)
        # chunk (records per call) and refill (SCHEDULE_KEYS) change rounding at most
        g = {x: v for x, v in g.items() if x not in ("engine", "vllm", "chunk", *RUNTIME_KEYS)}
        if ecfg["name"] == "hf":
            out[k] = {**g, "device": "auto", "num_threads": None}
        else:
            out[k] = {**g, "engine": {x: v for x, v in ecfg.items() if x not in (*RUNTIME_KEYS, *SCHEDULE_KEYS)}}
    return out


def _reuse_key(rec: dict, stage: str) -> str:
    # what a model stage's verdict depends on besides its config: the text and, for the code
    # checks, the response (which the responses stage itself adds, so it is not its input)
    return stage_fingerprint(rec["text"], rec.get("response") if stage == "code_checks" else None)


def _load_reusable(files: StageFiles) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in (files.kept, files.dropped):
        if p.exists():
            for _, r in iter_jsonl(p):
                out[_reuse_key(r, files.name)] = r
    return out


def _merge(new: dict, prev: dict, stage: str) -> dict:
    """The new input record with the earlier verdict of `stage` (and the fields it added)."""
    out = {**prev, **{k: v for k, v in new.items() if k != "checks"}}
    out["checks"] = {**(new.get("checks") or {}), stage: prev["checks"][stage]}
    return out


def run_curation(cfg_curation: Any, samples_path: str | Path, out_dir: str | Path | None = None,
                 references: str | Path | list[dict] | None = None, eval_sets: list | None = None,
                 backbone: dict | None = None, generators: Callable | dict[str, Callable] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Curate `samples_path` into `out_dir` (default: the samples' directory). Returns the paths
    written and the funnel. `references`/`eval_sets`/`backbone` override what the samples' run
    recorded; `generators` (a callable, or {"judge"|"responses"|"tests"|"default": callable})
    replaces the models, for tests or an external inference server."""
    out_dir = Path(out_dir) if out_dir else Path(samples_path).parent
    return Curation(cfg_curation, samples_path, out_dir, references, eval_sets, backbone, generators,
                    progress).run()


def curate(cfg: Any, samples: str | Path | None = None) -> dict[str, Any]:
    """The curate stage (`curate.py`, `domino curate`, and synthesize.py's `curate=true` /
    `stage=curate`): `cfg` is the composed curate (or synthesize) config. Samples: `samples`, else
    `cfg.samples`, else <output_dir>/samples.jsonl. Outputs go beside the samples unless `output_dir`
    is set. References (memorisation, few-shot judges): `references=`, else the samples' lineage.json.
    The judge and response models default to an explicit backbone= group, else the backbone the
    samples were drawn from."""
    from domino.core.config import plain
    from domino.core.validate import CURATE, check_config
    c = plain(cfg)
    if "curation" not in c:
        raise KeyError("the config has no `curation` group: add `- curation: default` to its defaults list")
    check_config(c, CURATE, "curate")
    out = c.get("output_dir") or (c.get("paths") or {}).get("output_dir")
    samples = Path(samples or c.get("samples") or Path(out) / "samples.jsonl")
    if not samples.exists():
        raise FileNotFoundError(f"samples={samples}: no such file (curation needs samples=<run>/samples.jsonl)")
    backbone = c.get("backbone")
    if backbone and backbone.get("cache_dir") is None:
        backbone = {**backbone, "cache_dir": (c.get("paths") or {}).get("cache_dir")}
    result = run_curation(c["curation"], samples, c.get("output_dir") or samples.parent,
                          references=c.get("references"), backbone=backbone, progress=bool(c.get("progress", True)))
    if result.get("sft"):
        log.info("curation done: %d SFT records in %s (report: %s)", result["n_sft"], result["sft"],
                 result["report_md"])
    else:  # no responses (curation.responses.enabled=false): curated.jsonl only, the note says why
        log.info("curation done: %s curated records in %s, no SFT export (report: %s)", result.get("n_curated"),
                 result["curated"], result["report_md"])
    return result
