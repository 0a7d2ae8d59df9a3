"""Completions for benchmark prompts, sampled by the project's one decoding stack
(domino.core.generation: `engine=hf`, batched with a KV cache, or `engine=vllm`, GPU only and imported
only then), with the backbone optionally carrying a LoRA adapter.

Sample `i` of task `t` draws its random numbers from its own seed,
`sample_seed(seed, sample_index(t, i))`: it is the same sample whatever batch it is decoded in,
whether the run was resumed, and however many samples per task were asked for.

Completions are appended to a JSONL file and flushed batch by batch, so a crashed run can be
resumed (`resume=<old completions.jsonl or run dir>`) without regenerating finished samples.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from domino.core.generation.factory import RUNTIME_KEYS, engine_config
from domino.core.generation.params import SamplingParams, sample_seed
from domino.core.records import JsonlStore, iter_jsonl

log = logging.getLogger(__name__)

# what a completion depends on besides its key's fields; bumped when the same settings would
# produce other records (2: one engine with per-sample seeds, finish reasons, one extract_code)
COMPLETIONS_VERSION = 2


# ---------------------------------------------------------------------------------- adapters
def load_adapter(model, adapter: str | None, merge: bool | None = None):
    """Attach a peft LoRA directory, merged into the weights (base-model speed) when `merge`; by
    default (None) where the backbone's weights are fp32 only. A bf16 backbone keeps the adapter
    unmerged: rounding W + BA to bf16 would blur the small update that training learnt on top of
    the bf16 weights (its fp32 LoRA path is what was trained)."""
    if not adapter:
        return model, None
    import torch
    from peft import PeftModel
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"adapter={adapter}: no adapter_config.json there (a peft LoRA dir?)")
    if merge is None:
        merge = next(model.parameters()).dtype == torch.float32
    model = PeftModel.from_pretrained(model, str(path))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model, adapter_fingerprint(path)


PROVENANCE_FILES = ("domino_finetune.json", "lineage.json")


def adapter_fingerprint(path: Path) -> str:
    """What the adapter computes: its config and weights. finetune.py's provenance files beside
    them (domino_finetune.json, lineage.json: paths, git commit) are left out, so the same weights
    exported by another run have the same fingerprint (and completion keys)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin") and f.name not in PROVENANCE_FILES:
            h.update(f.name.encode())
            h.update(_canonical_config(f.read_bytes()) if f.name == "adapter_config.json" else f.read_bytes())
    return h.hexdigest()[:16]


def _canonical_config(raw: bytes) -> bytes:
    # peft saves target_modules (a set) in hash-seed order: the same adapter must hash the same
    conf = json.loads(raw)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(conf.get(key), list):
            conf[key] = sorted(conf[key])
    return json.dumps(conf, sort_keys=True).encode()


def lora_rank(adapter: str) -> int:
    """The adapter's rank, rounded up to a rank vLLM accepts as max_lora_rank."""
    r = int(json.loads((Path(adapter).expanduser() / "adapter_config.json").read_text()).get("r", 16))
    return next((v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= r), r)


# ---------------------------------------------------------------------------------- engines
def build_engine(backbone_cfg: dict, ecfg: dict[str, Any], params: SamplingParams, adapter: str | None,
                 seed: int) -> tuple[Any, Any, str, str | None, str]:
    """(engine, tokenizer, model id, adapter fingerprint, dtype), from the one engine factory
    (domino.core.generation.factory); the model is loaded once."""
    from domino.core.generation import factory
    if ecfg["name"] == "vllm":
        tok, ident = factory.vllm_identity(backbone_cfg, ecfg)
        eng = factory.open_vllm(backbone_cfg, ecfg, params, seed, prompt_embeds=False, adapter=adapter,
                                max_lora_rank=lora_rank(adapter) if adapter else None)
        return (eng, tok, ident["backbone_id"],
                adapter_fingerprint(Path(adapter).expanduser()) if adapter else None, ident["dtype"])
    bb = factory.load_model(backbone_cfg, ecfg)
    model, adapter_fp = load_adapter(bb.model, adapter)
    model = model.to(bb.model.device)
    return factory.open_hf(model, bb.tokenizer, params, ecfg), bb.tokenizer, bb.id, adapter_fp, bb.dtype


# ---------------------------------------------------------------------------------- seeds and keys
def sample_index(task_id: str, sample_idx: int) -> int:
    """A stable integer naming sample `sample_idx` of a task (the index sample_seed hashes)."""
    digest = hashlib.sha256(json.dumps([str(task_id), int(sample_idx)]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def gen_key(model_id: str, adapter_fp: str | None, engine: str, params: SamplingParams, seed: int,
            chat: bool, prompt: str, dtype: str = "float32", stop_after_solution: bool = False) -> str:
    """What a task's completions depend on; resumed records are reused only when it matches. (fp32
    keys are those of releases before the dtype rule: the dtype enters only when it is another;
    likewise `stop_after_solution` only when decoding of that task stops there.)"""
    parts = [COMPLETIONS_VERSION, model_id, adapter_fp, engine, params.to_dict(), seed, chat, prompt]
    parts += ([] if dtype == "float32" else [dtype]) + (["stop_after_solution"] if stop_after_solution else [])
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- the loop
def generate_completions(problems: list[dict], backbone_cfg: dict, params: SamplingParams, n_samples: int,
                         seed: int, out_path: Path, engine: Any = "hf", adapter: str | None = None,
                         chat: bool | None = None, resume: str | None = None, batch_size: int | None = None,
                         progress: Callable | None = None, style: str = "evalplus",
                         stop_after_solution: bool = True) -> tuple[list[dict], dict]:
    """Sample `n_samples` outputs per problem, appending each completion to `out_path` as soon as it
    exists (`engine.refill`: continuous batching on the HF engine; else in fixed batches). Whether a
    completion was decoded with refill is not part of its key: a resume may mix the two.
    Prompts are text (prompting.build_prompt), tokenised as the model sees them: chat templates
    carry their own special tokens, plain prompts get the tokenizer's (BOS).
    `stop_after_solution` (`prompt.stop_after_solution`): where the answer is the code itself (an
    opened fence) and the problem names its entry point, decoding stops once the entry point and
    what it uses are complete and the model starts top-level code of its own (its example calls
    and asserts, which `to_program` drops): `generation.code.solution_end`."""
    from domino.core.generation.code import solution_end
    from domino.evaluation.prompting import CLOSE_FENCE, build_prompt, opens_fence, to_program, use_chat
    ecfg = engine_config(engine, batch_size)  # domino.core.generation.factory's one schema
    eng, tok, model_id, adapter_fp, dtype = build_engine(backbone_cfg, ecfg, params, adapter, seed)
    chat = use_chat(tok, chat)
    if any(opens_fence(p, chat, style) for p in problems) and CLOSE_FENCE not in params.stop:
        # the answer is one code block: nothing after its closing fence is ever scored
        params = dataclasses.replace(params, stop=params.stop + (CLOSE_FENCE,))
        eng.params = params
    prompts = {p["task_id"]: build_prompt(p, tok, chat, style) for p in problems}
    stop_fn = {p["task_id"]: functools.partial(solution_end, entry_point=p["entry_point"])
               for p in problems if stop_after_solution and opens_fence(p, chat, style) and p.get("entry_point")}
    keys = {t: gen_key(model_id, adapter_fp, ecfg["name"], params, seed, chat, pr, dtype, t in stop_fn)
            for t, pr in prompts.items()}
    # the run's own completions.jsonl is one append-only store keyed by (task, sample, gen_key):
    # a rerun or a crash resumes from it (a torn last line is dropped, see records.JsonlStore),
    # records of another configuration never match, and nothing is ever written twice
    store = JsonlStore(out_path, key=lambda r: (r["task_id"], r["sample_idx"], r.get("gen_key")), keep_records=True)
    done: dict[tuple[str, int], dict] = {}
    for rec in store.records.values():
        if keys.get(rec["task_id"]) == rec.get("gen_key") and rec["sample_idx"] < n_samples:
            done[(rec["task_id"], rec["sample_idx"])] = rec
    if done:
        log.info("resume: %d completions already in %s", len(done), out_path)
    if resume:
        n_before = len(done)
        for rec in read_completions(resume):
            same = keys.get(rec.get("task_id")) == rec.get("gen_key")
            if same and rec.get("sample_idx", 1 << 30) < n_samples:
                done.setdefault((rec["task_id"], rec["sample_idx"]), rec)
        log.info("resume: reusing %d completions from %s", len(done) - n_before, resume)
    by_id = {p["task_id"]: p for p in problems}
    for (t, _), rec in done.items():  # the program follows today's rule, whatever built the stored one
        rec["program"] = rec["solution"] = to_program(by_id[t], rec["output"], chat, style)
    reused = len(done)
    ids = {t: list(tok(pr, add_special_tokens=not chat)["input_ids"]) for t, pr in prompts.items()}
    todo = [(t, i) for t in prompts for i in range(n_samples) if (t, i) not in done]
    todo.sort(key=lambda ti: len(ids[ti[0]]))  # similar lengths per batch: less padding
    bs = eng.batch_size
    with store:
        for rec in done.values():
            store.add(rec)  # records reused from another file; those already here are not rewritten
        started, n_tok = time.monotonic(), 0
        clock0 = engine_clock(eng)
        bar = progress() if progress else _NoProgress()
        with bar:
            job = bar.add_task("generate", total=len(todo), rate="")

            def record(t: str, i: int, g) -> None:
                nonlocal n_tok
                n_tok += len(g.token_ids)
                program = to_program(by_id[t], g.text, chat, style)
                # `solution` is EvalPlus's field (the whole program): evalplus.evaluate reads
                # this file unchanged; `program` is the same string under this project's name
                rec = {"task_id": t, "sample_idx": i, "gen_key": keys[t], "output": g.text,
                       "finish_reason": g.finish_reason, "n_tokens": len(g.token_ids),
                       "program": program, "solution": program}
                if g.stop_reason == "stop_fn":  # the output ends where the solution did
                    rec["stop_reason"] = "solution_end"
                done[(t, i)] = rec
                store.add(rec)
                rate = n_tok / max(1e-9, time.monotonic() - started)
                bar.update(job, advance=1, rate=f"{rate:.1f} tok/s")

            seeds = [sample_seed(seed, sample_index(t, i)) for t, i in todo]
            fns = [stop_fn.get(t) for t, _ in todo] if stop_fn else None
            if ecfg.get("refill") and hasattr(eng, "generate_many"):
                # continuous batching: finished rows are refilled; each completion is stored as it ends
                eng.generate_many([ids[t] for t, _ in todo], seeds, on_result=lambda j, g: record(*todo[j], g),
                                  stop_fns=fns)
            else:
                for b in range(0, len(todo), bs):
                    gens = eng.generate_prompts([ids[t] for t, _ in todo[b: b + bs]], seeds[b: b + bs],
                                                stop_fns=fns[b: b + bs] if fns else None)
                    for (t, i), g in zip(todo[b: b + bs], gens):
                        record(t, i, g)
        gen_s = time.monotonic() - started
    truncated = sum(r.get("finish_reason") == "length" for r in done.values())
    if truncated:
        log.warning("%d of %d completions hit sampling.max_new_tokens=%d (finish_reason=length)",
                    truncated, len(done), params.max_new_tokens)
    provenance = {"model": model_id, "dtype": dtype, "adapter": adapter, "adapter_fingerprint": adapter_fp,
                  "engine": {k: v for k, v in ecfg.items() if k not in RUNTIME_KEYS
                             and not (k == "refill" and ecfg["name"] != "hf")},
                  "chat_template": chat, "prompt_style": style, "sampling": params.to_dict(),
                  "stop_after_solution": bool(stop_fn),
                  "n_samples": n_samples, "seed": seed,
                  "completions_version": COMPLETIONS_VERSION, "reused_completions": reused,
                  "truncated_completions": truncated,
                  "generation": {"new_completions": len(todo), "new_tokens": n_tok,
                                 "seconds": round(gen_s, 2), "tokens_per_s": round(n_tok / max(gen_s, 1e-9), 1),
                                 **{k: round(v - clock0[k], 2) for k, v in engine_clock(eng).items()}}}
    recs = sorted(done.values(), key=lambda r: (r["task_id"], r["sample_idx"]))
    return recs, provenance


def engine_clock(eng) -> dict[str, float]:
    """The HF engine's own split of its time so far (prefills, decoding loops); {} for engines
    without one (vLLM)."""
    return {k: float(getattr(eng, k)) for k in ("prefill_s", "decode_s") if hasattr(eng, k)}


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def read_completions(path: str | Path) -> list[dict]:
    """Records of a completions.jsonl (or a run dir holding one), another run's: a torn last line
    (crash mid-write) is skipped, and that completion generated again."""
    path = Path(path)
    if path.is_dir():
        path = path / "completions.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"resume={path}: no completions file there")
    return [rec for _, rec in iter_jsonl(path, skip_torn_tail=True)]
