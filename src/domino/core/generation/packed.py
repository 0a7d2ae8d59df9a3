"""Pre-packed bf16 linear weights for decoding on a CPU.

A bf16 `F.linear` on a CPU runs through oneDNN, which first reorders the (out, in) weight into its
blocked layout, on every call. A decoding step multiplies a few dozen rows by every weight of the
model, so that reorder (a full read and write of each weight) costs about as much as the product
itself: over the 0.5B's weights at 64 rows, 580-680 GFLOP/s as they are against 860-960 GFLOP/s
reordered once (bench/README.md). `packed_linears(model)` reorders each bf16 `nn.Linear` weight of
the model once, for the length of a `with` block (at the layer's first decoding-sized call), and
routes those modules' forward through oneDNN's linear on the packed weight for calls of up to a
decoding step's rows (a prefill's thousands of rows keep plain F.linear, which chooses its own
layout per call). For most row counts that is the same sum and the same bits; for some (76-80 and
91-96 rows of the 0.5B's 4864 -> 896 projection, bench/packed_bits.py) oneDNN blocks the sum
differently on one path than on the other and about 1 output in 7,000 rounds to a neighbouring
bf16 value, so greedy decoding can flip a near-tied token (bench/README.md: 48 of 48 evaluation
answers identical, 45 of 48 when prefills were packed too), as the batch a row shares can.

The packed copies live only inside the block (each weight is read at its layer's first
decoding-sized call in it): a model whose weights change between engine calls (an optimiser step,
a LoRA merge through `.data`) is never run on stale copies. Packing costs one pass over the weights
(0.3 s for the 0.5B) and as much memory again as the packed weights for the rest of the block.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)
MODES = ("auto", True, False)
MEMORY_SHARE = 0.5  # auto packs only when the copies take at most this share of the available memory


def supported() -> bool:
    """Whether this torch can pack bf16 linear weights for oneDNN on this CPU."""
    ops = torch.ops.mkldnn
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_linear_pointwise") and bool(ops._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


def packable(model: nn.Module) -> list[nn.Linear]:
    """The model's linear layers a packed weight can serve: bf16 weights on the CPU, frozen."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16
            and m.weight.device.type == "cpu" and not m.weight.requires_grad]


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_mode(mode) -> bool | str:
    """`engine.packed_weights` as auto | True | False (YAML's true / false, or their strings)."""
    m = {"true": True, "false": False}.get(str(mode).lower(), mode) if isinstance(mode, str) else mode
    if m not in MODES:
        raise ValueError(f"engine.packed_weights={mode!r}: expected auto, true or false")
    return m


def should_pack(model: nn.Module, mode) -> bool:
    """`mode` auto: packs where it can (CPU, bf16, oneDNN bf16 support) and the copies fit in
    MEMORY_SHARE of the available memory; true: packs, or says why it cannot; false: never."""
    mode = check_mode(mode)
    if mode is False:
        return False
    layers = packable(model)
    if not layers or not supported():
        if mode is True:
            raise ValueError("engine.packed_weights=true: needs frozen bf16 linear layers on a CPU and a torch "
                             "with oneDNN bf16 support (this model/CPU has none); set it to auto or false")
        return False
    if mode == "auto":
        need, avail = sum(m.weight.numel() * 2 for m in layers), available_memory()
        if avail is not None and need > MEMORY_SHARE * avail:
            log.info("engine.packed_weights=auto: not packing (%.1f GB of copies, %.1f GB available)",
                     need / 1e9, avail / 1e9)
            return False
    return True


def _reorder(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`weight` reordered into oneDNN's blocked layout for products of about `rows_hint` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int, max_rows: int):
    """A linear layer's forward that runs oneDNN's linear on a packed copy of `weight` for calls of at
    most `max_rows` rows, the copy made at the first such call (so a call that never decodes, a
    prefix's prefill, makes none but the head's, for its last row), and plain F.linear otherwise."""
    linear, packed = torch.ops.mkldnn._linear_pointwise, None

    def forward(x: torch.Tensor) -> torch.Tensor:
        nonlocal packed
        if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or torch.is_grad_enabled()
                or x.numel() > max_rows * x.shape[-1]):
            return nn.functional.linear(x, weight, bias)
        if packed is None:
            packed = _reorder(weight, rows_hint)
        return linear(x, packed, bias, "none", [None], "")
    return forward


@contextlib.contextmanager
def packed_linears(model: nn.Module, rows_hint: int = 64, enabled: bool = True,
                   max_rows: int | None = None) -> Iterator[int]:
    """Within the block, each of `packable(model)`'s layers computes its forward with its weight
    reordered once for oneDNN (`rows_hint`: the rows of a decoding step, which pick the blocked
    layout) for calls of at most `max_rows` rows (default `rows_hint`). Yields the number of layers
    routed so (0 when not `enabled` or already inside a block on this model); each packs its copy at
    its first such call. Outside no_grad, for an input of another dtype or device, or of more rows
    (a prefill), a layer runs its plain `F.linear`: the packed layout gained 1.3-1.5x up to
    `rows_hint` rows and from 0.76x to 1.35x beyond it (bench/packed_rows.py), and evaluation's
    prefills ran slower on it.

    Packing at the first decoding-sized call rather than when the block opens: a prefill ran
    1.2-1.4x slower while the copies existed, and as slow beside plain copies of the weights taking
    the same memory (bench/packed_prefill.py, AMD EPYC: page faults of glibc's freed mappings,
    which grow with what else the process holds), so a call's first prefill (its prompts, or a
    prefix's prefill, which packs only the head for its last row) runs before the copies exist."""
    if not enabled or getattr(model, "_domino_packed", False):
        yield 0
        return
    layers, rows_hint = packable(model), max(1, int(rows_hint))
    model._domino_packed = True
    try:
        for m in layers:
            m.forward = _packed_forward(m.weight, m.bias, rows_hint, max_rows or rows_hint)
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
        del model._domino_packed
