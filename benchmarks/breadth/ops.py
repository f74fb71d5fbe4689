"""Single ops at realistic sizes: activations, softmax and reductions along each dim, cumsum, norms,
pooling, concat/split/pad/slices, losses, matmul/bmm."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Size, case


def _act_shape(s: Size) -> tuple[int, ...]:
    return s.pick((4, 16, 32), (32, 512, 512), (256, 2048, 1024))  # 8M (32 MB fp32) / 512M (1 GiB bf16)


def _red_shape(s: Size) -> tuple[int, ...]:
    return s.pick((4, 12, 40), (32, 256, 1024), (128, 1024, 2048))


class Unary(nn.Module):
    """An activation from torch.nn.functional, by name (keyword options as attributes)."""

    def __init__(self, fn: str, **options):
        super().__init__()
        self.fn, self.options = fn, options

    def forward(self, x):
        return getattr(F, self.fn)(x, **self.options)


ACTIVATIONS = {"relu": {}, "gelu": {}, "gelu_tanh": {"approximate": "tanh"}, "silu": {}, "sigmoid": {}, "tanh": {},
               "elu": {}, "selu": {}, "leaky_relu": {"negative_slope": 0.01}, "hardswish": {}, "hardsigmoid": {},
               "mish": {}, "softplus": {}}


def _activation(name: str, options: dict):
    def build(s: Size):
        return Unary(name.removesuffix("_tanh"), **options), (s.randn(*_act_shape(s)),)
    return build


for _name, _options in ACTIVATIONS.items():
    case("ops", _name)(_activation(_name, _options))


class Softmax(nn.Module):
    def __init__(self, dim: int, log: bool):
        super().__init__()
        self.dim, self.log = dim, log

    def forward(self, x):
        return x.log_softmax(self.dim) if self.log else x.softmax(self.dim)


for _dim in range(3):
    for _log in (False, True):
        case("ops", f"{'log_' if _log else ''}softmax_d{_dim}")(
            lambda s, d=_dim, log=_log: (Softmax(d, log), (s.randn(*_red_shape(s)),)))


class Reduce(nn.Module):
    """torch.<op>(x, dims): sum, mean, amax, amin, var, std, logsumexp."""

    def __init__(self, op: str, dims: tuple[int, ...], keepdim: bool = False):
        super().__init__()
        self.op, self.dims, self.keepdim = op, dims, keepdim

    def forward(self, x):
        return getattr(torch, self.op)(x, self.dims, keepdim=self.keepdim)


REDUCTIONS = {"sum": [(0,), (1,), (2,), (0, 2)], "mean": [(0,), (2,), (1, 2)], "amax": [(0,), (1,), (2,)],
              "amin": [(2,)], "var": [(0,), (2,), (0, 2)], "std": [(1,), (2,)], "logsumexp": [(0,), (1,), (2,)]}

for _op, _dims_list in REDUCTIONS.items():
    for _dims in _dims_list:
        case("ops", f"{_op}_d{''.join(map(str, _dims))}")(
            lambda s, op=_op, dims=_dims: (Reduce(op, dims), (s.randn(*_red_shape(s)),)))


class Cumsum(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.cumsum(self.dim)


@case("ops")
def cumsum_last(s: Size):
    return Cumsum(-1), (s.randn(*s.pick((8, 64), (1024, 4096), (32768, 4096))),)


@case("ops")
def cumsum_first(s: Size):
    return Cumsum(0), (s.randn(*s.pick((64, 8), (4096, 1024), (4096, 32768))),)


def _image(s: Size, c_small: int = 8) -> torch.Tensor:
    return s.randn(*s.pick((2, c_small, 8, 8), (16, 64, 56, 56), (128, 256, 56, 56)))


class RMSNorm(nn.Module):
    """RMSNorm written out (nn.RMSNorm's own function is used by `rms_norm_nn`)."""

    def __init__(self, n: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _with_stats(norm: nn.Module) -> nn.Module:
    """A norm with non-trivial running statistics and affine parameters (what a trained model holds)."""
    with torch.no_grad():
        for name in ("running_mean", "weight", "bias"):
            t = getattr(norm, name, None)
            if t is not None:
                t.copy_(torch.randn_like(t) * 0.5 + (1.0 if name == "weight" else 0.0))
        if getattr(norm, "running_var", None) is not None:
            norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    return norm


@case("ops")
def batch_norm2d(s: Size):
    x = _image(s)
    return _with_stats(nn.BatchNorm2d(x.shape[1])), (x,)


@case("ops")
def instance_norm2d(s: Size):
    x = _image(s)
    return nn.InstanceNorm2d(x.shape[1], affine=True), (x,)


@case("ops")
def group_norm(s: Size):
    x = _image(s)
    return _with_stats(nn.GroupNorm(4, x.shape[1])), (x,)


@case("ops")
def layer_norm(s: Size):
    x = s.randn(*s.pick((4, 16, 64), (64, 512, 768), (64, 4096, 4096)))
    return _with_stats(nn.LayerNorm(x.shape[-1])), (x,)


@case("ops")
def layer_norm_2d(s: Size):
    """LayerNorm over the last two dims (channels-last image rows)."""
    x = s.randn(*s.pick((4, 8, 32), (64, 128, 512), (256, 512, 1024)))
    return _with_stats(nn.LayerNorm(list(x.shape[-2:]))), (x,)


@case("ops")
def rms_norm(s: Size):
    x = s.randn(*s.pick((4, 16, 64), (64, 512, 768), (64, 4096, 4096)))
    return RMSNorm(x.shape[-1]), (x,)


@case("ops")
def rms_norm_nn(s: Size):
    x = s.randn(*s.pick((4, 16, 64), (64, 512, 768), (64, 4096, 4096)))
    return nn.RMSNorm(x.shape[-1], eps=1e-6), (x,)


@case("ops")
def max_pool2d(s: Size):
    return nn.MaxPool2d(3, stride=2, padding=1), (_image(s),)


@case("ops")
def avg_pool2d(s: Size):
    return nn.AvgPool2d(2), (_image(s),)


@case("ops")
def adaptive_avg_pool2d(s: Size):
    return nn.AdaptiveAvgPool2d(1), (_image(s),)


@case("ops")
def max_pool1d(s: Size):
    return nn.MaxPool1d(4, stride=2), (s.randn(*s.pick((2, 8, 64), (32, 128, 8192), (256, 512, 16384))),)


@case("ops")
def avg_pool3d(s: Size):
    return nn.AvgPool3d(2), (s.randn(*s.pick((2, 4, 8, 8, 8), (8, 32, 32, 64, 64), (32, 64, 64, 128, 128))),)


class Concat(nn.Module):
    def forward(self, a, b, c):
        return torch.cat([a, b, c], dim=1)


@case("ops")
def concat(s: Size):
    n, h, w = s.pick((2, 8, 8), (16, 56, 56), (128, 56, 56))
    return Concat(), (s.randn(n, 32, h, w), s.randn(n, 64, h, w), s.randn(n, 16, h, w))


class Split(nn.Module):
    """Split along channels into contiguous pieces (a channel shuffle's first step)."""

    def forward(self, x):
        return tuple(t.contiguous() for t in x.split([x.shape[1] // 4, 3 * x.shape[1] // 4], dim=1))


@case("ops")
def split(s: Size):
    return Split(), (_image(s),)


class Pad(nn.Module):
    def __init__(self, pad: tuple[int, ...], mode: str = "constant"):
        super().__init__()
        self.pad, self.mode = pad, mode

    def forward(self, x):
        return F.pad(x, self.pad, mode=self.mode)


@case("ops")
def pad_constant(s: Size):
    return Pad((1, 2, 3, 0)), (_image(s),)


@case("ops")
def pad_reflect(s: Size):
    return Pad((2, 2, 2, 2), "reflect"), (_image(s),)


class Slices(nn.Module):
    """Strided slices of an image (the four phases of a space-to-depth), concatenated."""

    def forward(self, x):
        return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1)


@case("ops")
def slices(s: Size):
    return Slices(), (_image(s),)


class HingeLoss(nn.Module):
    def forward(self, pred, target):
        return torch.clamp(1 - pred * target, min=0).mean()


@case("ops")
def hinge_loss(s: Size):
    shape = s.pick((16, 64), (4096, 4096), (32768, 32768))
    return HingeLoss(), (s.randn(*shape), torch.sign(s.randn(*shape)))


class MSELoss(nn.Module):
    def forward(self, pred, target):
        return F.mse_loss(pred, target)


@case("ops")
def mse_loss(s: Size):
    shape = s.pick((16, 64), (4096, 4096), (32768, 32768))
    return MSELoss(), (s.randn(*shape), s.randn(*shape))


class CrossEntropy(nn.Module):
    def forward(self, logits, labels):
        return F.cross_entropy(logits, labels)


@case("ops")
def cross_entropy(s: Size):
    n, c = s.pick((16, 10), (4096, 1000), (32768, 32000))
    return CrossEntropy(), (s.randn(n, c), s.randint(c, n))


class Matmul(nn.Module):
    def forward(self, a, b):
        return a @ b


@case("ops")
def matmul(s: Size):
    m, k, n = s.pick((16, 32, 24), (1024, 1024, 1024), (8192, 8192, 8192))
    return Matmul(), (s.randn(m, k), s.randn(k, n))


@case("ops")
def bmm(s: Size):
    b, m, k, n = s.pick((4, 16, 32, 24), (32, 256, 128, 256), (256, 1024, 512, 1024))
    return Matmul(), (s.randn(b, m, k), s.randn(b, k, n))
