"""OHEM cross-entropy against a direct per-pixel formula."""

import math

import pytest
import torch

from fastbisenet.losses import OhemCELoss, total_loss, total_pixel_loss


def ohem_direct(logits: torch.Tensor, labels: torch.Tensor, thresh: float = 0.7, ignore: int = 255):
    """The recipe written out pixel by pixel: returns (loss, branch) with branch 'thresh' or 'n_min'."""
    n, c, h, w = logits.shape
    losses = []
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(labels[b, i, j])
                if y == ignore:
                    continue
                z = [float(logits[b, k, i, j]) for k in range(c)]
                m = max(z)
                log_sum = m + math.log(sum(math.exp(v - m) for v in z))
                losses.append(log_sum - z[y])
    n_min = len(losses) // 16
    hard = [v for v in losses if v > -math.log(thresh)]
    if len(hard) < n_min:
        return sum(sorted(losses, reverse=True)[:n_min]) / n_min, "n_min"
    if not hard:
        return 0.0, "empty"
    return sum(hard) / len(hard), "thresh"


def test_ohem_many_hard_pixels():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 8, 8, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (2, 8, 8))
    expected, branch = ohem_direct(logits, labels)
    assert branch == "thresh"
    got = OhemCELoss()(logits, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_n_min_fallback_with_ignore():
    torch.manual_seed(2)
    labels = torch.randint(0, 4, (2, 8, 8))
    # confident and right almost everywhere: CE < -log(0.7) for all but a couple of pixels
    logits = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).double() * 6
    logits += 0.1 * torch.randn_like(logits)
    logits[0, :, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 5.0]) * (1 if labels[0, 0, 0] != 3 else -1)
    labels[1, :4] = 255  # 32 ignored pixels: n_min = 96 // 16 = 6, not 128 // 16 = 8
    expected, branch = ohem_direct(logits, labels)
    assert branch == "n_min"
    got = OhemCELoss()(logits, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ohem_ignored_pixels_do_not_count():
    torch.manual_seed(3)
    logits = torch.randn(1, 3, 8, 8, dtype=torch.float64) * 2
    labels = torch.randint(0, 3, (1, 8, 8))
    masked = labels.clone()
    masked[0, ::2] = 255
    wild = logits.clone()
    wild[0, :, ::2] = 100 * torch.randn(3, 4, 8, dtype=torch.float64)  # huge logits where ignored
    assert OhemCELoss()(wild, masked).item() == pytest.approx(ohem_direct(logits, masked)[0], rel=1e-5)


def test_ohem_all_ignored_is_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 4, 4), 255)
    loss = OhemCELoss()(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()


def test_ohem_gradient_only_from_kept_pixels():
    torch.manual_seed(4)
    labels = torch.randint(0, 3, (1, 8, 8))
    logits = (torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 8).requires_grad_()
    OhemCELoss()(logits, labels).backward()
    kept = logits.grad.abs().sum(1).flatten().gt(0).sum().item()
    assert kept == 64 // 16  # all easy: exactly n_min pixels get gradient


def test_total_loss_sums_outputs_and_checks_shapes():
    torch.manual_seed(5)
    outs = [torch.randn(2, 4, 6, 6) for _ in range(3)]
    labels = torch.randint(0, 4, (2, 6, 6))
    crit = OhemCELoss()
    assert total_loss(outs, labels, crit).item() == pytest.approx(sum(crit(o, labels).item() for o in outs))
    with pytest.raises(ValueError, match="labels"):
        crit(outs[0], labels[:, :3])
    with pytest.raises(ValueError, match="thresh"):
        OhemCELoss(thresh=1.5)


def test_total_pixel_loss_one_sync_per_step_and_each_branch():
    """Three heads taking the three branches (threshold, n_min, nothing valid is impossible per head, so
    an all-easy head) give the sum of the per-head definitions and their gradients, with no boolean
    indexing (a host sync each) and one scalar read for all heads' counts beside the label check's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(6)
    labels = torch.randint(0, 4, (2, 8, 8))
    labels[0, 0] = 255
    hard = (torch.rand(2, 8, 8) * 3).requires_grad_()  # most pixels above -log(0.7)
    easy = (torch.rand(2, 8, 8) * 0.1).requires_grad_()  # none above: the n_min largest
    mixed = torch.where(torch.rand(2, 8, 8) < 0.3, 2.0, 0.05).requires_grad_()
    for t in (hard, easy, mixed):
        t.data[labels == 255] = 0.0
    crit = OhemCELoss()
    ops: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        got = total_pixel_loss([hard, easy, mixed], labels, crit, 4)
    assert not {"nonzero", "masked_select", "index"} & set(ops), ops
    assert ops.count("_local_scalar_dense") <= 2 + 3  # the label check's two counts, the heads' three
    want = sum(crit.reduce(t, labels, 4) for t in (hard, easy, mixed))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    g = torch.autograd.grad(got, (hard, easy, mixed))
    g_want = torch.autograd.grad(want, (hard, easy, mixed))
    for a, b in zip(g, g_want, strict=True):
        torch.testing.assert_close(a, b)
    n_min = int((labels != 255).sum()) // 16
    assert int((g[1] != 0).sum()) == n_min  # the easy head: exactly the n_min largest
