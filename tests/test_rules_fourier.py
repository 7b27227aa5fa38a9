"""Ops of rules/fourier.py (torch.fft's transforms, real / imag parts, view_as_real / view_as_complex,
torch.complex; T rule: autograd's vjp) in float64 through both front ends: every rule's TJML
residual and adjoint gap with random vectors, input and parameter gradients equal to autograd's,
FNet's token mixing ``fftn(h, dim=(1, 2)).real`` in both spellings of ``.real``, DTP's small-beta
limit, and the refusal, by name, of a rule written for real tensors on complex values."""
import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.errors import UnsupportedOpError

from helpers import randomise_vectors
from test_rules_elementwise import assert_matches_autograd, dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_DIM = ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")
TWO_DIMS = ("fft2", "ifft2", "rfft2", "irfft2")
N_DIMS = ("fftn", "ifftn", "rfftn", "irfftn")
#: how each transform's output (real or complex) becomes real again
AS_REAL = {"real": torch.real, "imag": torch.imag, "view_as_real": torch.view_as_real}


class Spectral(nn.Module):
    """Linear -> (N, 4, 6) -> ``transform`` over the token and feature dims (or the last) with an
    ``options`` dict -> a real part of it -> Linear. A complex input (``complex_input``) is
    ``torch.complex`` of two linear maps of x; the head is sized on a first call."""

    def __init__(self, transform, options=None, part="real", complex_input=False):
        super().__init__()
        self.transform, self.options, self.part = getattr(torch.fft, transform), options or {}, part
        self.a, self.b = nn.Linear(5, 24), nn.Linear(5, 24)
        self.complex_input, self.complex_output = complex_input, None
        with torch.no_grad():
            self.complex_output = self.transformed(torch.randn(2, 5)).is_complex()
            self.head = nn.Linear(self.features(torch.randn(2, 5)).shape[1], 3)

    def transformed(self, x):
        h = self.a(x).view(-1, 4, 6)
        if self.complex_input:
            h = torch.complex(h, self.b(x).view(-1, 4, 6))
        return self.transform(h, **self.options)

    def features(self, x):
        z = self.transformed(x)
        return (AS_REAL[self.part](z) if self.complex_output else z).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


def _model(*args, **kwargs):
    torch.manual_seed(0)
    return randomise_vectors(Spectral(*args, **kwargs)).double()


CASES = [(name, {}, False) for name in ONE_DIM] + [(name, {"dim": (1, 2)}, False) for name in TWO_DIMS + N_DIMS] + [
    ("fft", {"n": 8, "norm": "ortho"}, False), ("rfft2", {"s": (3, 4), "dim": (1, 2), "norm": "forward"}, False),
    ("irfft", {"n": 9}, False), ("fftn", {"dim": (1, 2)}, True), ("ifft2", {"dim": (1, 2), "norm": "ortho"}, True),
    ("hfft", {}, True), ("irfftn", {"dim": (1, 2)}, True)]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("transform,options,complex_input", CASES)
def test_transforms_equal_autograd(transform, options, complex_input, frontend):
    model = _model(transform, options, complex_input=complex_input)
    x = torch.randn(3, 5, dtype=torch.float64)
    ops = [f"fft_{transform}"] + (["complex"] if complex_input else [])
    assert_matches_autograd(model, x, frontend, ops=ops)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("part", ["real", "imag", "view_as_real"])
def test_each_part_of_a_complex_value_equals_autograd(part, frontend):
    model = _model("fft2", {"dim": (1, 2)}, part=part, complex_input=True)
    assert_matches_autograd(model, torch.randn(3, 5, dtype=torch.float64), frontend,
                            ops=["fft_fft2", "complex", part])


class FourierMixing(nn.Module):
    """FNet's block: tokens and features mixed by ``fftn(h, dim=(1, 2))``, its real part taken as
    ``z.real`` (an attribute, rewritten to torch.real) or ``torch.real(z)``; then a residual, tanh
    and a Linear head."""

    def __init__(self, attribute: bool):
        super().__init__()
        self.attribute = attribute
        self.embed, self.head = nn.Linear(6, 8), nn.Linear(5 * 8, 3)

    def forward(self, x):
        h = self.embed(x)
        z = torch.fft.fftn(h, dim=(1, 2))
        return self.head(torch.tanh(h + (z.real if self.attribute else torch.real(z))).flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("attribute", [True, False])
def test_fnet_mixing_equals_autograd_and_keeps_dtps_small_beta_limit(attribute, frontend):
    torch.manual_seed(0)
    model, x = randomise_vectors(FourierMixing(attribute)).double(), torch.randn(4, 5, 6, dtype=torch.float64)
    assert_matches_autograd(model, x, frontend, ops=["fft_fftn", "real"])
    assert dtp_angle(model, x) < 1e-3


class SpectralFilter(nn.Module):
    """GFNet's global filter: rfft2, times a complex weight (``view_as_complex`` of a real parameter),
    irfft2 (``divide``: divided by it); with ``gain``, also times a real parameter broadcast over the
    spectrum (a real operand of a complex product: its feedback is the real part)."""

    def __init__(self, gain=False, divide=False):
        super().__init__()
        self.a, self.head = nn.Linear(5, 24), nn.Linear(24, 3)
        self.weight = nn.Parameter(torch.randn(4, 4, 2) + (2.0 if divide else 0.0))     # away from 0 to divide
        self.gain = nn.Parameter(torch.randn(4, 1)) if gain else None
        self.divide = divide

    def forward(self, x):
        z = torch.fft.rfft2(self.a(x).view(-1, 4, 6), dim=(1, 2), norm="ortho")
        weight = torch.view_as_complex(self.weight)
        z = z / weight if self.divide else z * weight
        z = z * self.gain if self.gain is not None else z
        return self.head(torch.fft.irfft2(z, s=(4, 6), dim=(1, 2), norm="ortho").flatten(1))


@pytest.mark.filterwarnings("error:Casting complex values to real")
@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("gain,divide", [(False, False), (True, False), (True, True)])
def test_a_spectral_filter_with_a_complex_weight_equals_autograd(gain, divide, frontend):
    """The product's transpose conjugates the other factor: without it the gradients are off by a
    relative 1.2 (measured with the conjugation removed)."""
    torch.manual_seed(0)
    model, x = SpectralFilter(gain, divide).double(), torch.randn(3, 5, dtype=torch.float64)
    ops = ["fft_rfft2", "div" if divide else "mul", "view_as_complex", "fft_irfft2"]
    assert_matches_autograd(model, x, frontend, ops=ops)
    assert dtp_angle(model, x) < 1e-3


class ComplexActivation(nn.Module):
    """tanh of a complex spectrum: the activation rules are written for real tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(5, 6), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.view_as_real(torch.tanh(torch.fft.rfft(self.a(x)))).flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_rule_for_real_tensors_is_refused_on_complex_values_by_name(frontend):
    with pytest.raises(UnsupportedOpError, match=r"op 'tanh' on complex values: its rule '[\w.]+' is written for "
                                                 "real tensors"):
        fbcompile.compile(ComplexActivation().double(), torch.randn(3, 5, dtype=torch.float64), frontend=frontend)


class ComplexPlumbing(nn.Module):
    """A spectrum sliced, permuted, reshaped, concatenated, negated, reduced, shifted by a real
    parameter (a real operand of a complex sum: its feedback is the real part), expanded and
    flipped: every structural rule maps with real coefficients, the same for complex values."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(5, 24), nn.Linear(2 * 11 * 2, 3)
        self.shift = nn.Parameter(torch.randn(11))

    def forward(self, x):
        z = torch.fft.rfft(self.a(x).view(-1, 4, 6))[:, 1:, :3]                 # (N, 3, 3) complex
        z = z.permute(0, 2, 1).reshape(-1, 9)
        z = torch.cat([z, -z[:, :2]], 1)
        z = z - z.mean(1, keepdim=True) + 0.1 * z.sum(1, keepdim=True) + self.shift
        return self.head(torch.view_as_real(z.unsqueeze(1).expand(-1, 2, -1).flip(1)).flatten(1))


@pytest.mark.filterwarnings("error:Casting complex values to real")     # a real operand's feedback: .real
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_structural_rules_carry_complex_values_as_autograd(frontend):
    torch.manual_seed(0)
    model, x = ComplexPlumbing().double(), torch.randn(3, 5, dtype=torch.float64)
    assert_matches_autograd(model, x, frontend, ops=["index", "permute", "cat", "neg", "mean", "sum", "add", "sub"])
    assert dtp_angle(model, x) < 1e-3


class ComplexRearranged(nn.Module):
    """The other rules marked for complex values: transpose, flatten / unflatten, squeeze /
    unsqueeze, chunk / split, stack / unbind, roll, narrow, select, gather, index_select, repeat
    and clone, on a spectrum, then its real pair to a Linear head."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(5, 24), nn.Linear(50, 3)
        self.register_buffer("gathered", torch.tensor([[0, 4, 4]]))
        self.register_buffer("selected", torch.tensor([1, 1, 5]))

    def forward(self, x):
        z = torch.fft.fft(self.a(x).view(-1, 4, 6)).transpose(1, 2).flatten(1).unflatten(1, (6, 4))   # (N, 6, 4)
        first, second = torch.chunk(z, 2, 1)
        left, right = torch.split(z.unsqueeze(1).squeeze(1), [1, 3], 2)
        parts = torch.stack([first, torch.roll(second, 1, 2)], 1).unbind(1)                  # 2 x (N, 3, 4)
        picked = torch.cat([parts[0].narrow(2, 0, 2).flatten(1), parts[1].select(1, 2), left.flatten(1),
                            torch.gather(right.flatten(1), 1, self.gathered.expand(x.shape[0], 3)),
                            torch.index_select(right.flatten(1), 1, self.selected),
                            first[:, :1, :1].repeat(1, 1, 3).flatten(1).clone()], 1)          # (N, 25)
        return self.head(torch.view_as_real(picked).flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_rearranging_rules_carry_complex_values_as_autograd(frontend):
    torch.manual_seed(0)
    model, x = ComplexRearranged().double(), torch.randn(3, 5, dtype=torch.float64)
    ops = ["transpose", "flatten", "unflatten", "chunk", "split", "stack", "unbind", "roll", "narrow", "select",
           "gather", "index_select", "repeat"] if frontend == "fx" else ["fft_fft", "cat"]
    assert_matches_autograd(model, x, frontend, ops=ops)


class Spectrogram(nn.Module):
    """A log-mel spectrogram inside the model: stft, |z|^2 (abs of complex values), a learned
    filterbank, log1p, a classifier (torchaudio's front end, written out)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(16))
        self.mel = nn.Parameter(torch.rand(9, 4) + 0.1)
        self.head = nn.Linear(4 * 9, 3)

    def forward(self, x):
        z = torch.stft(x, 16, hop_length=4, window=self.window, return_complex=True)      # (N, 9, 9) complex
        return self.head(torch.log1p(z.abs().pow(2).transpose(1, 2) @ self.mel).flatten(1))


class SpectralGate(nn.Module):
    """stft, a learned complex gain per frequency, istft back to the signal."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(16))
        self.gain = nn.Parameter(torch.randn(9, 1, dtype=torch.cdouble))       # .double() leaves complex alone

    def forward(self, x):
        z = torch.stft(x, 16, hop_length=4, window=self.window, return_complex=True)
        return torch.istft(z * self.gain, 16, hop_length=4, window=self.window, length=x.shape[-1])


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("make,ops", [(Spectrogram, ("stft", "abs")), (SpectralGate, ("stft", "istft"))])
def test_short_time_transforms_and_complex_magnitudes_equal_autograd(make, ops, frontend):
    torch.manual_seed(0)
    model = make().double()
    assert_matches_autograd(model, torch.randn(3, 32, dtype=torch.float64), frontend, ops=ops)
