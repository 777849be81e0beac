"""The single dispatch point: picks the Triton kernels or the reference ops for a call.

Modules never test the backend themselves; they call ``ops.impl(self.backend, x).<op>(...)``, where
every op has the same signature in :mod:`fastbisenet.reference` and in the fused namespace.

Backends:
    ``"auto"``   Triton kernels for CUDA tensors, reference ops otherwise (decided per call).
    ``"triton"`` always the kernels; CPU tensors only under Triton's interpreter
                 (``TRITON_INTERPRET=1`` set before triton was imported), otherwise an error.
    ``"torch"``  the reference ops (plain PyTorch, cuDNN on GPU).
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from fastbisenet import reference

BACKENDS = ("auto", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """``backend="triton"`` on a tensor the kernels cannot run on (a CPU tensor without the interpreter)."""


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names a backend, else raise ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    """True when the Triton kernels were (or will be) built for Triton's CPU interpreter."""
    from fastbisenet import kernels

    return kernels.INTERPRET


def resolve(backend: str, x: Tensor) -> str:
    """Concrete backend (``"triton"`` or ``"torch"``) for a call whose main input is ``x``."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton":
        if not x.is_cuda and not interpreter_enabled():
            raise BackendUnavailableError(
                "backend='triton' got a CPU tensor: the Triton kernels need a CUDA GPU, or Triton's "
                "interpreter enabled with TRITON_INTERPRET=1 in the environment before triton is imported"
            )
        return "triton"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def impl(backend: str, x: Tensor) -> ModuleType:
    """The op namespace (:mod:`fastbisenet.reference` or :mod:`fastbisenet.ops.fused`) for this call."""
    if resolve(backend, x) == "torch":
        return reference
    from fastbisenet.ops import fused

    return fused


