"""What every engine shares: sampling settings, per-sample seeds, and the shape of a generation."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

FINISH_REASONS = ("stop", "length")  # vLLM's vocabulary: "stop" = EOS, stop token or stop string


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()      # stop strings; the text is cut before the first one
    stop_token_ids: tuple[int, ...] = ()  # ends a sample like EOS (e.g. an end-of-turn token)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k} must be >= 0 (0 = off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"sampling.repetition_penalty={self.repetition_penalty} must be > 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"sampling.min_new_tokens={self.min_new_tokens} must be in "
                             f"[0, max_new_tokens={self.max_new_tokens}]")
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any], stop_token_ids: tuple[int, ...] = ()) -> "SamplingParams":
        stop = cfg.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        return cls(temperature=float(cfg.get("temperature", 1.0)), top_p=float(cfg.get("top_p", 1.0)),
                   top_k=int(cfg.get("top_k") or 0),
                   repetition_penalty=float(cfg.get("repetition_penalty", 1.0)),
                   max_new_tokens=int(cfg.get("max_new_tokens", 512)),
                   min_new_tokens=int(cfg.get("min_new_tokens") or 0), stop=stop,
                   stop_token_ids=tuple(int(t) for t in stop_token_ids))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        return d


@dataclass
class Generation:
    token_ids: list[int]            # generated tokens, EOS/stop token excluded
    text: str                       # decoded, cut before a stop string
    finish_reason: str              # "stop" | "length" (hit max_new_tokens: flagged, kept)
    stop_reason: str | int | None = None  # "eos", the stop string or the stop token id
    extra: dict[str, Any] = field(default_factory=dict)


# a row's own early end (HFEngine.generate_many's `stop_fns`): its text so far -> how many characters
# of it to keep, ending the row, or None to go on
StopFn = Callable[[str], "int | None"]


def check_rows(prompts: list, seeds: list, stop_fns: list | None) -> None:
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if stop_fns is not None and len(stop_fns) != len(prompts):
        raise ValueError(f"one stop_fn (or None) per prompt: {len(stop_fns)} for {len(prompts)} prompts")


def stop_after(g: Generation, fn: StopFn | None) -> Generation:
    """`fn` applied to a generation decoded to its end (an engine that cannot stop a row on a
    callable, vLLM): asked at each line break of the text in order, as HFEngine asks while decoding;
    its first answer cuts the text (the tokens stay all those decoded)."""
    if fn is None:
        return g
    at = g.text.find("\n")
    while at >= 0:
        end = fn(g.text[:at + 1])
        if end is not None:
            return Generation(g.token_ids, g.text[:end], "stop", "stop_fn", g.extra)
        at = g.text.find("\n", at + 1)
    return g


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a run: independent of batching, so a resumed run draws the
    same random numbers for the same index as an uninterrupted one."""
    digest = hashlib.sha256(f"domino-synthesis:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)
