"""Kept scratch tensors for full-vocabulary work.

On a CPU a fresh (rows x vocabulary) fp32 tensor is a fresh mapping from the allocator: every use
pays its allocation and the first touch (page faults) of hundreds of MB, which cost as much as the
arithmetic on it (measured in bench/README.md: the sampler, the training step's LM head). A
`Scratch` hands out named buffers that are kept and reused while their shape still fits.
"""
from __future__ import annotations

import torch


class Scratch:
    """Named 2-D scratch tensors, reused while (rows <= kept rows, same cols, dtype, device)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> torch.Tensor:
        buf = self._buffers.get(name)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if (buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype
                or buf.device != dev):
            buf = self._buffers[name] = torch.empty((rows, cols), dtype=dtype, device=dev)
        return buf[:rows]

    def clear(self) -> None:
        self._buffers.clear()

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        """x.logsumexp(-1, keepdim=True) for a 2-D x: torch's own operations in torch's order (so
        the same bits), with the exp in a kept buffer instead of two fresh tensors of x's size."""
        m = x.amax(-1, keepdim=True)
        m = m.masked_fill(m.abs() == float("inf"), 0)
        tmp = torch.sub(x, m, out=self.get("exp", *x.shape, dtype=x.dtype, device=x.device)).exp_()
        return tmp.sum(-1, keepdim=True).log_().add_(m)
