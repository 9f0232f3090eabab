"""fastcurv.losses.multiclass_hinge against a hand computation and a per-example loop."""
import pytest
import torch

from fastcurv.losses import multiclass_hinge


def _hinge_loop(logits, target, margin):
    """The definition, one example and one class at a time."""
    out = []
    for i in range(logits.shape[0]):
        y = int(target[i])
        best_wrong = max(float(logits[i, t]) for t in range(logits.shape[1]) if t != y)
        out.append(max(0.0, margin + best_wrong - float(logits[i, y])))
    return torch.tensor(out, dtype=torch.float64)


def test_by_hand():
    logits = torch.tensor(
        [[2.0, 1.0, 0.0], [0.0, 3.0, 2.5], [1.0, 1.0, 1.0], [5.0, -1.0, 0.0]], dtype=torch.float64
    )
    target = torch.tensor([0, 1, 2, 1])
    # 0: max(0, 1 + 1 - 2) = 0;  1: max(0, 1 + 2.5 - 3) = 0.5;  2: 1 + 1 - 1 = 1;  3: 1 + 5 + 1 = 7
    expected = torch.tensor([0.0, 0.5, 1.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(multiclass_hinge(logits, target, reduction="none"), expected)
    torch.testing.assert_close(multiclass_hinge(logits, target, reduction="sum"), expected.sum())
    torch.testing.assert_close(multiclass_hinge(logits, target), expected.mean())
    # margin 0.25: 0 -> 0; 1 -> 0 (0.25 + 2.5 - 3 < 0); 2 -> 0.25; 3 -> 6.25
    torch.testing.assert_close(
        multiclass_hinge(logits, target, margin=0.25, reduction="none"),
        torch.tensor([0.0, 0.0, 0.25, 6.25], dtype=torch.float64),
    )


@pytest.mark.parametrize("batch,classes", [(1, 2), (7, 3), (33, 10)])
def test_against_loop_and_gradient(device, batch, classes):
    logits = (3 * torch.randn(batch, classes, dtype=torch.float64, device=device)).requires_grad_()
    target = torch.randint(0, classes, (batch,), device=device)
    losses = multiclass_hinge(logits, target, margin=1.5, reduction="none")
    torch.testing.assert_close(losses.cpu(), _hinge_loop(logits.detach().cpu(), target.cpu(), 1.5))
    losses.sum().backward()
    # Subgradient: +1 on the most violating wrong class, -1 on the true class, for active examples.
    expected = torch.zeros(batch, classes, dtype=torch.float64)
    lg, tg = logits.detach().cpu(), target.cpu()
    for i in range(batch):
        if losses[i] > 0:
            wrong = lg[i].clone()
            wrong[tg[i]] = float("-inf")
            expected[i, int(wrong.argmax())] += 1
            expected[i, int(tg[i])] -= 1
    torch.testing.assert_close(logits.grad.cpu(), expected)


def test_differs_from_weston_watkins():
    # torch's multi_margin_loss averages over the wrong classes; Crammer-Singer takes the max.
    logits = torch.tensor([[0.0, 0.9, 0.8]], dtype=torch.float64)
    target = torch.tensor([0])
    assert multiclass_hinge(logits, target).item() == pytest.approx(1.9)
    assert torch.nn.functional.multi_margin_loss(logits, target).item() == pytest.approx((1.9 + 1.8) / 3)


def test_empty_batch():
    logits = torch.zeros(0, 4)
    target = torch.zeros(0, dtype=torch.long)
    assert multiclass_hinge(logits, target, reduction="none").shape == (0,)
    assert multiclass_hinge(logits, target, reduction="sum").item() == 0.0


def test_low_precision_and_int32_targets():
    logits = torch.randn(5, 4)
    target = torch.randint(0, 4, (5,), dtype=torch.int32)
    ref = multiclass_hinge(logits.double(), target.long())
    out = multiclass_hinge(logits.bfloat16(), target)
    assert out.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; a handful of roundings of O(1) values.
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "logits,target,match",
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), r"logits must be \[B, C\], got shape \(4,\)"),
        (torch.randn(4, 1), torch.zeros(4, dtype=torch.long), "at least 2 classes"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), r"target must be \[B\] = \[4\]"),
        (torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.long), r"got shape \(4, 3\)"),
        (torch.randn(4, 3), torch.tensor([0, 1, 3, 0]), r"\[0, 3\), got values in \[0, 3\]"),
        (torch.randn(4, 3), torch.tensor([0, -1, 2, 0]), r"got values in \[-1, 2\]"),
    ],
)
def test_bad_shapes_and_labels(logits, target, match):
    with pytest.raises(ValueError, match=match):
        multiclass_hinge(logits, target)


def test_bad_types_and_options():
    logits = torch.randn(4, 3)
    with pytest.raises(TypeError, match="integer class indices"):
        multiclass_hinge(logits, torch.zeros(4))
    with pytest.raises(TypeError, match="floating point"):
        multiclass_hinge(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        multiclass_hinge(logits, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="margin"):
        multiclass_hinge(logits, torch.zeros(4, dtype=torch.long), margin=-1.0)
