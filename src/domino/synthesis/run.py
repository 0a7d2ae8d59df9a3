"""The sample stage (`synthesize.py`, `stage=sample`): load the domain tokens or build a baseline
prompt, open (or resume) the output, and write samples batch by batch. Curation after sampling is
chained by `domino.stages.synthesize`, not from here."""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from domino.core import attempt, lineage
from domino.core.domain_prompt import DomainPrompt, check_backbone, load_domain_prompt
from domino.core.embedded import DEFAULT_BACKBONE
from domino.core.generation.factory import RUNTIME_KEYS, SCHEDULE_KEYS
from domino.core.generation.params import Generation, SamplingParams, sample_seed
from domino.core.locking import output_lock
from domino.core.provenance import git_commit
from domino.core.validate import SYNTHESIZE, check_config
from domino.synthesis.methods import DOMAIN_METHODS, Plan, build_plan, stop_strings
from domino.synthesis.output import SampleStore, sample_id
from domino.synthesis.progress import SynthesisProgress

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- backbone
def backbone_config(c: dict[str, Any], prompt: DomainPrompt | None) -> dict[str, Any]:
    """The backbone to load: an explicit backbone= group wins (and is checked against the
    checkpoint), else the checkpoint's own, else the code domains' default (baselines)."""
    cache_dir = c.get("paths", {}).get("cache_dir")
    if c.get("backbone"):
        return dict(c["backbone"])
    if prompt is not None and prompt.meta.get("backbone"):
        # the checkpoint's cache_dir names the training machine's cache; use this machine's
        return {**prompt.meta["backbone"], "cache_dir": cache_dir}
    return {**DEFAULT_BACKBONE, "cache_dir": cache_dir}


# ---------------------------------------------------------------------------------- the sample stage
def _build_engine(c: dict[str, Any], bcfg: dict[str, Any], params_cfg: dict, plan_fn: Callable):
    """(engine, tokenizer, backbone identity dict, plan, params), from the one engine factory
    (domino.core.generation.factory); the model is loaded once."""
    from domino.core.generation import factory
    ecfg = factory.engine_config(c["engine"])
    if ecfg["name"] == "hf":
        bb = factory.load_model(bcfg, ecfg)
        tok, ident = bb.tokenizer, factory.hf_identity(bb)
    else:
        tok, ident = factory.vllm_identity(bcfg, ecfg)
    plan: Plan = plan_fn(tok, ident)
    stops = list(params_cfg.get("stop") or []) + stop_strings(plan)
    params = SamplingParams.from_config({**params_cfg, "stop": stops}, stop_token_ids=plan.stop_token_ids)
    if ecfg["name"] == "hf":
        engine = factory.open_hf(bb.model, tok, params, ecfg)
    else:
        engine = factory.open_vllm(bcfg, ecfg, params, int(c["seed"]), prompt_embeds=True)
    return engine, tok, ident, plan, params


def sample(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg, SYNTHESIZE, "synthesize")
    c = OmegaConf.to_container(cfg, resolve=True)
    out_dir = Path(c.get("output_dir") or c["paths"]["output_dir"])
    # one writer per directory, taken before anything is loaded: a second run into out_dir would
    # write every sample again
    with output_lock(out_dir, "synthesize"):
        return _sample(c, out_dir)


def _sample(c: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    method = dict(c["method"])
    name, n, seed = method["name"], int(c["n"]), int(c["seed"])
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one sample")
    prompt = load_domain_prompt(c["ckpt"]) if c.get("ckpt") else None
    if prompt is None and name in DOMAIN_METHODS:
        raise ValueError(f"method={name} needs ckpt=<train run>/domain_prompt.safetensors "
                         "(or <run>/checkpoints/last.ckpt), or a baseline: method=few_shot|zero_shot|magpie")
    # samples from a domain prompt are named after the objective it was trained with
    label = str(prompt.meta.get("method") or "domino") if name in DOMAIN_METHODS else name
    bcfg = backbone_config(c, prompt)
    domain = dict(c.get("domain") or {})
    references = None
    if name == "few_shot":
        from domino.core.domains import load_domain
        references, _ = load_domain(**domain)  # reference split only: held-out stays unseen

    def plan_fn(tok, ident):
        if prompt is not None:
            check_backbone(prompt, ident["backbone_hash"], ident["hidden_size"], ident["backbone_id"],
                           ident["vocab_size"], len(tok))
        return build_plan(method, tok, prompt if name in DOMAIN_METHODS else None, domain, references)

    engine, tok, ident, plan, params = _build_engine(c, bcfg, dict(c["sampling"]), plan_fn)
    ecfg = dict(c["engine"])
    inputs = {"method": method, "plan": plan.describe, "backbone_hash": ident["backbone_hash"],
              "dtype": ident["dtype"], "sampling": params.to_dict(), "seed": seed,
              "engine": {k: v for k, v in ecfg.items() if k not in (*RUNTIME_KEYS, *SCHEDULE_KEYS)},
              "domain": ({k: domain.get(k) for k in ("name", "path", "n_references", "split_seed", "description")}
                         if name in ("few_shot", "zero_shot") else None)}
    meta = {"ckpt": prompt.path if prompt else None, "ckpt_meta": prompt.meta if prompt else None,
            "backbone": bcfg, **ident, "git_commit": git_commit(), "config": c}
    store = SampleStore(out_dir, inputs, meta, overwrite=bool(c.get("overwrite")))
    attempt.accept(out_dir)  # the same configuration (or a new dir): the run owns out_dir from here
    base_source = {"ckpt": prompt.path if prompt else None, "model": ident["backbone_id"],
                   "backbone_hash": ident["backbone_hash"], "engine": engine.name, "run_seed": seed,
                   **{k: v for k, v in params.to_dict().items() if k != "stop_token_ids"},
                   "fingerprint": store.fingerprint}
    # a baseline's references and held-out split are its domain's: the lineage names the domain
    # config (curation rebuilds the split from it only when it needs it); a domain prompt's run
    # inherits its training run's references.jsonl and heldout.jsonl
    lineage.write(out_dir, _parent_lineage(prompt), samples=str(store.path.resolve()), samples_method=label,
                  samples_fingerprint=store.fingerprint, backbone={k: v for k, v in bcfg.items() if k != "cache_dir"},
                  **({"domain": domain} if name in BASELINES and domain else {}))
    log.info("synthesis: method=%s n=%d -> %s (%d already there; resume or extend by rerunning with "
             "output_dir=%s)", label, n, store.path, len(store.done), out_dir)
    try:
        stats = _sample_loop(engine, plan, store, label, n, seed, base_source, bool(c.get("progress", True)),
                             refill=bool(ecfg.get("refill")) and engine.name == "hf")
    finally:
        store.close()
    store.sort_by_index()  # refill writes samples as they finish: the finished file is in index order
    total = sum(1 for i in range(n) if sample_id(label, i) in store.done)
    result = {"output_dir": str(out_dir), "samples": str(store.path), "n": n, "n_present": total, **stats}
    store.update_meta(last_run={k: v for k, v in result.items() if k not in ("output_dir", "samples")})
    if c.get("save_dataset"):
        result["dataset"] = str(store.save_dataset())
    beyond = len(store.done) - total
    log.info("synthesis done: %d/%d samples in %s (%d new, %.1f samples/s, %.0f tokens/s, finish: %s)%s",
             total, n, store.path, stats["n_new"], stats["samples_per_s"], stats["tokens_per_s"],
             stats["finish_reasons"], f"; the file holds {len(store.done)}: this n={n} set is its first {n}, "
             f"the other {beyond} are kept" if beyond > 0 else "")
    return result


BASELINES = ("few_shot", "zero_shot", "magpie")


def _parent_lineage(prompt: DomainPrompt | None) -> dict[str, Any]:
    """The training run behind the domain prompt (its lineage.json; for a file without one, what
    the prompt's own metadata says). Baselines have none."""
    if prompt is None:
        return {}
    found = lineage.read(prompt.path)
    if not found and Path(prompt.path).parent.name == "checkpoints":  # <run>/checkpoints/last.ckpt
        found = lineage.read(Path(prompt.path).parent.parent)
    own = {k: prompt.meta[k] for k in ("references", "heldout", "reference_fingerprint") if prompt.meta.get(k)}
    return {**own, **found, "domain_prompt": str(Path(prompt.path).resolve()), "domain_prompt_digest": prompt.digest}


def _sample_loop(engine, plan: Plan, store: SampleStore, name: str, n: int, seed: int,
                 base_source: dict[str, Any], show: bool, refill: bool = False) -> dict[str, Any]:
    """Write the samples of indices [0, n) not yet in `store`. Fixed batches (refill=False): the
    batch boundaries never move, so a resumed batch is regenerated whole (same rows, same
    numerics) and only its missing samples are written. refill=True (HF engine, continuous
    batching): rows that finish are refilled with the next samples and each sample is written as
    it finishes; a resumed run decodes only the missing ones, each from its own seed (the same
    distribution; its rounding depends on which rows shared its batch)."""
    bs = engine.batch_size
    if refill:  # the engine schedules the rows of a call; calls of 64 batches bound what it holds
        missing = [i for i in range(n) if sample_id(name, i) not in store.done]
        todo = [missing[s:s + 64 * bs] for s in range(0, len(missing), 64 * bs)]
    else:
        batches = [range(s, min(s + bs, n)) for s in range(0, n, bs)]
        todo = [b for b in batches if any(sample_id(name, i) not in store.done for i in b)]
    already = sum(1 for i in range(n) if sample_id(name, i) in store.done)
    prefix = None
    n_new = n_tok = 0
    reasons: Counter = Counter()
    t0 = time.perf_counter()
    with SynthesisProgress(total=n, completed=already, enabled=show) as bar:
        def write(i: int, s: int, g: Generation, ex: dict) -> None:
            nonlocal n_new, n_tok
            sid = sample_id(name, i)
            if sid in store.done:
                return
            store.write(_record(sid, name, i, s, g, ex, base_source))
            n_new += 1
            n_tok += len(g.token_ids)
            reasons[g.finish_reason] += 1
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(already + n_new, n_new / dt, n_tok / dt)

        for idx in todo:
            seeds = [sample_seed(seed, i) for i in idx]
            if plan.per_sample is not None:
                built = [plan.per_sample(s) for s in seeds]
                prompts, extras = [ids for ids, _ in built], [ex for _, ex in built]
            else:
                if prefix is None:  # once per run, only if there is work left
                    prefix = _prefix(engine, plan)
                extras = [{}] * len(seeds)
            if refill:
                def done(j: int, g: Generation) -> None:
                    write(idx[j], seeds[j], g, extras[j])
                if plan.per_sample is not None:
                    engine.generate_many(prompts, seeds, on_result=done)
                else:
                    engine.generate_shared_many(prefix, seeds, on_result=done)
                continue
            gens = (engine.generate_prompts(prompts, seeds) if plan.per_sample is not None
                    else engine.generate_shared(prefix, seeds))
            for i, s, g, ex in zip(idx, seeds, gens, extras):
                write(i, s, g, ex)
    dt = time.perf_counter() - t0
    return {"n_new": n_new, "new_tokens": n_tok, "elapsed_s": round(dt, 3),
            "samples_per_s": n_new / dt if dt > 0 else 0.0, "tokens_per_s": n_tok / dt if dt > 0 else 0.0,
            "finish_reasons": dict(reasons)}


def _prefix(engine, plan: Plan):
    if plan.prefix_embeds is not None:
        return engine.prefill(plan.prefix_embeds)
    if engine.name == "vllm":
        return list(plan.prefix_ids)
    return engine.prefill(engine.embed_ids(plan.prefix_ids))


def _record(sid: str, method: str, index: int, seed: int, g: Generation, extra: dict, base: dict) -> dict:
    return {"id": sid, "text": g.text, "method": method, "finish_reason": g.finish_reason,
            "n_tokens": len(g.token_ids),
            "source": {**base, "index": index, "seed": seed, "truncated": g.finish_reason == "length",
                       "stop_reason": g.stop_reason, **extra}}
