"""The interpreter shims in conftest make bf16 kernels behave as on a GPU (compiled on a GPU: the hardware's own)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bf16_kernel(x_ptr, a_ptr, b_ptr, y_ptr, c_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))  # fp32 -> bf16, the default rounding
    rows = offs[:, None] * N + offs[None, :]
    c = tl.dot(tl.load(a_ptr + rows), tl.load(b_ptr + rows))  # bf16 operands, fp32 accumulation
    tl.store(c_ptr + rows, c)


def test_bf16_conversion_rounds_to_nearest_and_dot_multiplies_values(device):
    n = 16
    x = (torch.randn(n, device=device) * 3).float()
    a, b = (torch.randn(n, n, device=device).to(torch.bfloat16) for _ in range(2))
    y = torch.empty(n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device)
    _bf16_kernel[(1,)](x, a, b, y, c, N=n)
    assert torch.equal(y, x.to(torch.bfloat16))  # the interpreter itself truncates (drops the low 16 bits)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-5, atol=1e-5)  # itself: products of bit patterns
