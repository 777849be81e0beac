"""The optimiser recipe: parameter groups and the warmup + poly learning-rate schedule."""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler

FAST_LR_PREFIXES = ("ffm.", "conv_out")
"""Parameters under these names (the FFM and every head ``conv_out*``) get ``lr_mult`` x the lr."""


def lr_factor(it: int, max_iter: int, warmup_iters: int = 1000, warmup_ratio: float = 0.1,
              warmup: str = "exp", power: float = 0.9) -> float:
    """The multiplier of the base lr at iteration ``it`` (0-based, the lr used for step ``it``).

    Warmup (``it < warmup_iters``): ``exp``: ``ratio ** (1 - it / warmup_iters)``; ``linear``:
    ``ratio + (1 - ratio) * it / warmup_iters``. Then poly: ``(1 - (it - wu) / (max_iter - wu)) ** power``.
    """
    if it < warmup_iters:
        alpha = it / warmup_iters
        if warmup == "exp":
            return warmup_ratio ** (1.0 - alpha)
        if warmup == "linear":
            return warmup_ratio + (1.0 - warmup_ratio) * alpha
        raise ValueError(f"warmup must be 'exp' or 'linear', got {warmup!r}")
    span = max(max_iter - warmup_iters, 1)
    alpha = min(max(it - warmup_iters, 0) / span, 1.0)
    return (1.0 - alpha) ** power


class WarmupPolyLR(LRScheduler):
    """``lr = base_lr * lr_factor(iteration)``; step once per iteration (after ``optimizer.step()``)."""

    def __init__(self, optimizer: Optimizer, max_iter: int, warmup_iters: int = 1000,
                 warmup_ratio: float = 0.1, warmup: str = "exp", power: float = 0.9,
                 last_epoch: int = -1) -> None:
        if max_iter < 1 or warmup_iters < 0:
            raise ValueError(f"need max_iter >= 1 and warmup_iters >= 0, got {max_iter}, {warmup_iters}")
        self.max_iter = max_iter
        self.warmup_iters = warmup_iters
        self.warmup_ratio = warmup_ratio
        self.warmup = warmup
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        f = lr_factor(self.last_epoch, self.max_iter, self.warmup_iters, self.warmup_ratio, self.warmup,
                      self.power)
        return [base * f for base in self.base_lrs]


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_mult: float = 10.0,
                 fast_prefixes: tuple[str, ...] = FAST_LR_PREFIXES) -> list[dict]:
    """Four groups: {decay, no decay} x {base lr, ``lr_mult`` x lr}.

    Weight decay applies to conv (and linear) weights only, never to BatchNorm parameters or biases.
    The ``lr_mult`` groups are the parameters whose names start with ``fast_prefixes``.
    """
    groups: dict[tuple[bool, bool], list] = {(d, f): [] for d in (True, False) for f in (False, True)}
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            name = name.removeprefix("module.")
            decay = not isinstance(module, norm_types) and p_name == "weight" and p.dim() > 1
            fast = name.startswith(fast_prefixes)
            groups[(decay, fast)].append(p)
    out = []
    for (decay, fast), params in groups.items():
        if params:
            out.append({"params": params, "lr": lr * (lr_mult if fast else 1.0),
                        "weight_decay": weight_decay if decay else 0.0,
                        "name": f"{'fast' if fast else 'base'}_{'decay' if decay else 'no_decay'}"})
    return out


def build_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                    lr_mult: float = 10.0) -> SGD:
    """SGD with momentum over :func:`param_groups`."""
    return SGD(param_groups(model, lr, weight_decay, lr_mult), lr=lr, momentum=momentum,
               weight_decay=weight_decay)


__all__ = ["FAST_LR_PREFIXES", "WarmupPolyLR", "build_optimizer", "lr_factor", "param_groups"]
