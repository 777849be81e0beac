"""CUDA-graph capture helper: input checks everywhere, capture and replay on a GPU."""

from __future__ import annotations

import pytest
import torch

from fastbisenet import BiSeNet
from fastbisenet.graphs import capture


def test_capture_needs_a_cuda_input_and_an_eval_model():
    model = BiSeNet(3, "pred").eval()
    with pytest.raises(ValueError, match="CUDA"):
        capture(model, torch.randn(1, 3, 64, 64))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="eval"):
            capture(model.cuda().train(), torch.randn(1, 3, 64, 64, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("aux_mode", ["eval", "pred"])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_graph_replay_matches_eager(aux_mode, autocast_dtype):
    torch.manual_seed(0)
    model = BiSeNet(19, aux_mode, backend="triton").cuda().eval()
    x = torch.randn(1, 3, 256, 512, device="cuda")
    graphed = capture(model, x, autocast_dtype=autocast_dtype, clone=True)
    for _ in range(2):  # new data each time: the replay reads the copied-in input
        x = torch.randn_like(x)
        got = graphed(x)
        with torch.no_grad(), torch.autocast("cuda", dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            want = model(x)
        if aux_mode == "pred":
            assert got.dtype == torch.int32 and (got == want).float().mean() > 0.999
        else:
            assert got[0].dtype == want[0].dtype
            torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="captured for"):
        graphed(torch.randn(2, 3, 256, 512, device="cuda"))
    # another memory layout of the same values is copied in: the same result
    same = graphed(x)
    other_layout = graphed(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(same if isinstance(same, tuple) else (same,),
                    other_layout if isinstance(other_layout, tuple) else (other_layout,), strict=True):
        assert torch.equal(a, b)
    # without clone=True the output is the graph's own buffer, overwritten by the next call
    shared = capture(model, x, autocast_dtype=autocast_dtype)
    first = shared(x)
    assert shared(torch.randn_like(x)) is first


@pytest.mark.gpu
def test_graph_replay_makes_no_allocations():
    model = BiSeNet(19, "pred", backend="triton").cuda().eval()
    x = torch.randn(1, 3, 256, 512, device="cuda")
    graphed = capture(model, x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(3):
        graphed.replay()
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
