"""LoRA dropout on a CPU, drawn by the gaps between dropped elements.

`nn.Dropout(p)` draws one Bernoulli number per element: on a CPU that is most of its cost
(`bernoulli_` was 6.1% of a LoRA step on the 0.5B in bf16, dropout 0.05: 96 adapters, each
masking its (tokens x 896) input; bench/README.md). Dropping each element independently with
probability p is the same as dropping the elements at the positions whose gaps (from the previous
dropped element, or from the start) are independent Geometric(p) numbers on {1, 2, ...}, so
`GapDropout` draws about p * n numbers instead of n, scales the input by 1 / (1 - p) and zeroes
the positions they give. Same distribution, other draws than `nn.Dropout`'s (both from torch's
default generator, so a seeded step draws the same masks again). On other devices, and for
p >= GAP_MAX_P (where the gaps are no fewer draws than the elements), it is `F.dropout`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GAP_MAX_P = 0.5
DROPOUT_DRAWS = ("gaps", "bernoulli")  # lora.dropout_draws: GapDropout, or nn.Dropout as peft builds it


def drop_positions(n: int, p: float) -> torch.Tensor:
    """Sorted positions (int64, CPU) among n elements where i.i.d. Bernoulli(p) drops fall: the
    cumulative sums (1-based) of Geometric(p) gaps, drawn in fp64 (exact integers) until they reach n."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability {p} is not in (0, 1)")
    mean = n * p
    k = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)  # nearly always one draw is enough
    pos = torch.empty(k, dtype=torch.float64).geometric_(p).cumsum_(0)
    while pos[-1].item() < n:  # rare: the drops after these could still fall within n
        more = torch.empty(k, dtype=torch.float64).geometric_(p).cumsum_(0).add_(pos[-1])
        pos = torch.cat([pos, more])
    return pos[pos <= n].long() - 1


class GapDropout(nn.Module):
    """`nn.Dropout(p)`, the same distribution, drawn by gaps on a CPU (module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= GAP_MAX_P:
            return F.dropout(x, self.p, True)
        out = (x * (1.0 / (1.0 - self.p))).contiguous()  # a no-op unless x is a strided view
        # `out` is mul's own fresh output (mul's backward needs only the scale): zeroing in place is
        # safe for autograd, whose index_fill_ backward zeroes the same positions of the gradient
        out.view(-1).index_fill_(0, drop_positions(out.numel(), self.p), 0)
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_gap_dropout(model: nn.Module) -> int:
    """Replace every LoRA adapter's `nn.Dropout` (peft's `lora_dropout` entries) with a
    `GapDropout` of the same p and training mode; the number replaced."""
    n = 0
    for name, m in model.named_modules():
        if name.endswith("lora_dropout") and isinstance(m, nn.ModuleDict):
            for adapter, d in list(m.items()):
                if type(d) is nn.Dropout:
                    g = GapDropout(d.p)
                    g.train(d.training)
                    m[adapter] = g
                    n += 1
    return n
