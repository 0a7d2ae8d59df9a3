import pytest
import torch

from domino.core.scratch import Scratch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logsumexp_in_a_kept_buffer_is_torchs_to_the_bit(dtype):
    """A -inf entry (as the sampler's minimum length puts there) and an all -inf row included; a
    buffer sized for a larger batch serves a smaller one without reallocating."""
    s = Scratch()
    g = torch.Generator().manual_seed(1)
    for rows, scale in ((5, 0.1), (3, 8.0)):
        x = (torch.randn(rows, 5000, generator=g) * scale).to(dtype)
        x[0, :7] = float("-inf")
        x[-1] = float("-inf")
        assert torch.equal(s.logsumexp(x), x.logsumexp(-1, keepdim=True))
    kept = s._buffers["exp"]
    assert kept.shape == (5, 5000) and kept.dtype == dtype


def test_buffers_are_reused_while_they_fit_and_replaced_when_not():
    s = Scratch()
    a = s.get("a", 4, 10)
    assert s.get("a", 2, 10).data_ptr() == a.data_ptr()
    assert s.get("a", 8, 10).shape == (8, 10)            # more rows: a new buffer
    assert s.get("a", 2, 11).shape == (2, 11)            # other columns: a new buffer
    assert s.get("a", 2, 11, dtype=torch.bfloat16).dtype == torch.bfloat16
    s.clear()
    assert not s._buffers
