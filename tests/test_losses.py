"""The loss and output error every learner starts from: the kernel path of the common losses must
give exactly what one autograd call on the loss gives, and everything else must take that call."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.runtime import losses
from fbcompile.runtime.losses import autograd_output_error, output_error


def _labels(n, classes, generator, ignored=None):
    labels = torch.randint(0, classes, (n,), device="cpu", generator=generator)
    if ignored is not None:
        labels[::3] = ignored
    return labels


def _cases():
    g = torch.Generator().manual_seed(0)
    weight = torch.rand(7, device="cpu", generator=g, dtype=torch.float64) + 0.5
    return [
        ("F.cross_entropy", F.cross_entropy, None),
        ("mean", nn.CrossEntropyLoss(), None),
        ("sum", nn.CrossEntropyLoss(reduction="sum"), None),
        ("weighted", nn.CrossEntropyLoss(weight=weight), None),
        ("ignored -100", nn.CrossEntropyLoss(), -100),
        ("ignored 3, weighted, sum", nn.CrossEntropyLoss(weight=weight, ignore_index=3, reduction="sum"), 3),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_cross_entropy_kernel_path_equals_autograd_bitwise(case, dtype):
    _, loss_fn, ignored = case
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.to(dtype)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 7, device="cpu", generator=g, dtype=dtype) * 3
    labels = _labels(12, 7, g, ignored)
    assert losses._known_loss(logits, labels, loss_fn) is not None        # the kernel path is taken
    loss, (error,) = output_error(logits, labels, loss_fn)
    reference_loss, (reference,) = autograd_output_error(logits, labels, loss_fn)
    assert torch.equal(loss, reference_loss) and torch.equal(error, reference)
    assert error.dtype == dtype and not error.requires_grad


@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.MSELoss(), nn.MSELoss(reduction="sum")], ids=["F", "mean", "sum"])
def test_mse_kernel_path_equals_autograd_bitwise(loss_fn):
    g = torch.Generator().manual_seed(2)
    output, target = torch.randn(9, 4, 3, device="cpu", generator=g, dtype=torch.float64), torch.randn(9, 4, 3, device="cpu", generator=g,
                                                                                           dtype=torch.float64)
    assert losses._known_loss(output, target, loss_fn) is not None
    loss, (error,) = output_error(output, target, loss_fn)
    reference_loss, (reference,) = autograd_output_error(output, target, loss_fn)
    assert torch.equal(loss, reference_loss) and torch.equal(error, reference)


def test_kernel_path_accepts_an_output_that_requires_grad():
    logits = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 1, 0])
    loss, (error,) = output_error(logits, labels, F.cross_entropy)
    reference_loss, (reference,) = autograd_output_error(logits, labels, F.cross_entropy)
    assert torch.equal(loss, reference_loss) and torch.equal(error, reference)
    assert logits.grad is None and not error.requires_grad


def _custom_loss(output, target):
    return F.cross_entropy(output, target)


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("name,loss_fn,make", [
    ("label smoothing", nn.CrossEntropyLoss(label_smoothing=0.1), lambda g: torch.randint(0, 4, (6,), device="cpu", generator=g)),
    ("probability targets", F.cross_entropy, lambda g: torch.softmax(torch.randn(6, 4, device="cpu", generator=g), 1)),
    ("a function of our own", _custom_loss, lambda g: torch.randint(0, 4, (6,), device="cpu", generator=g)),
    ("broadcast mse target", F.mse_loss, lambda g: torch.randn(1, 4, device="cpu", generator=g)),
    ("a subclass that may change forward", type("MyCE", (nn.CrossEntropyLoss,), {})(),
     lambda g: torch.randint(0, 4, (6,), device="cpu", generator=g)),
])
def test_other_losses_take_the_autograd_call(name, loss_fn, make):
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(6, 4, device="cpu", generator=g), make(g)
    assert losses._known_loss(logits, targets, loss_fn) is None
    loss, (error,) = output_error(logits, targets, loss_fn)
    reference_loss, (reference,) = autograd_output_error(logits, targets, loss_fn)
    assert torch.equal(loss, reference_loss) and torch.equal(error, reference)


@pytest.mark.cpu_only("a bad label is a device-side assert on CUDA, not a Python exception")
def test_kernel_path_reports_a_bad_label_as_the_loss_would():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 5, 2])
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        output_error(logits, labels, F.cross_entropy)
