"""CUDA-graph capture of an inference model for one fixed input shape and dtype.

Example::

    model = BiSeNet(19, "pred").cuda().eval()
    graphed = capture(model, torch.randn(1, 3, 1024, 2048, device="cuda"), autocast_dtype=torch.bfloat16)
    labels = graphed(image)          # copies image into the graph's input buffer and replays

The graph replays the exact kernels recorded at capture, so the shape, dtype and device of every later
input must match the example (checked on each call; any memory layout is copied into the graph's input
buffer). Outputs live in buffers owned by the graph and are overwritten by the next replay: ``g(a)`` and
``g(b)`` return the same tensor, so ``clone()`` an output to keep it (or pass ``clone=True``).
Triton autotuning and any other first-call work happen in the warm-up runs, before capture.

Weights: the fused convs read a packed copy of each conv weight (see :mod:`fastbisenet.ops.conv_bn`), and
v1's two stems a merged copy of their weights and BN statistics; an eager call after an in-place weight change
repacks them in place, into the buffers the graph reads (a conversion such as ``.to()`` makes new ones), while
other BN parameters and statistics are read where they are. So a replay reads whatever is packed at that
moment, neither reliably the capture-time nor the current weights: after changing any weight or buffer
(``load_state_dict``, an optimizer step, ``.to()``), capture again. Use the model from one stream: repacking
does not wait for other streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn


class GraphedModel:
    """A captured ``model(x)``; call it with a tensor like the example input."""

    def __init__(
        self,
        model: nn.Module,
        example: Tensor,
        *,
        autocast_dtype: torch.dtype | None = None,
        warmup: int = 3,
        clone: bool = False,
    ) -> None:
        if not example.is_cuda:
            raise ValueError("CUDA-graph capture needs a CUDA input tensor")
        if model.training:
            raise ValueError("capture an eval-mode model (model.eval()): training-mode BatchNorm updates buffers")
        self.model = model
        self.clone = clone
        self.autocast_dtype = autocast_dtype
        self.static_input = example.detach().clone(memory_format=torch.preserve_format)
        # Triton launches on the current device: capture (and replay) with the example's device current
        with torch.cuda.device(example.device):
            stream = torch.cuda.Stream(device=example.device)
            stream.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(stream):
                for _ in range(max(warmup, 1)):
                    self._run()
            torch.cuda.current_stream(example.device).wait_stream(stream)
            torch.cuda.synchronize(example.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(device=example.device)):
                self.static_output = self._run()
        # the replays read these buffers: keep them alive even if the weights' data is replaced later
        from fastbisenet.ops.conv_bn import packed_weights_of

        self._packed_weights = packed_weights_of(model)

    def _run(self):
        # no autocast weight cache: cached casts made in warm-up live outside the graph's memory pool and could
        # be freed (an outer autocast exiting) while replays still read them
        if self.autocast_dtype is not None:
            amp = torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
        elif torch.is_autocast_enabled("cuda"):
            amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        else:
            amp = contextlib.nullcontext()
        with torch.no_grad(), amp:
            return self.model(self.static_input)

    def __call__(self, x: Tensor):
        s = self.static_input
        if x.shape != s.shape or x.dtype != s.dtype or x.device != s.device:
            raise ValueError(
                f"graph was captured for {tuple(s.shape)} {s.dtype} on {s.device}, "
                f"got {tuple(x.shape)} {x.dtype} on {x.device}"
            )
        s.copy_(x)  # any layout: copied into the captured buffer's
        with torch.cuda.device(s.device):
            self.graph.replay()
        if not self.clone:
            return self.static_output
        return _map(self.static_output, Tensor.clone)

    def replay(self) -> None:
        """Replay on whatever the input buffer holds (for benchmarks)."""
        with torch.cuda.device(self.static_input.device):
            self.graph.replay()


def _map(out, fn: Callable[[Tensor], Tensor]):
    if isinstance(out, Tensor):
        return fn(out)
    return type(out)(fn(o) for o in out)


def capture(model: nn.Module, example: Tensor, **kwargs) -> GraphedModel:
    """Capture ``model`` for inputs shaped like ``example``; see :class:`GraphedModel`."""
    return GraphedModel(model, example, **kwargs)
