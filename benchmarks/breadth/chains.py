"""Conv / conv-transpose (1-D, 2-D, 3-D), GEMM and bmm followed by every kind of epilogue: bias, activation,
scaling, residual add, norm, pooling, softmax, logsumexp, clamp, dropout in eval mode."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Size, case


def _img(s: Size, c: int) -> torch.Tensor:
    return s.randn(*s.pick((2, c, 12, 12), (8, c, 56, 56), (64, c, 128, 128)))


class ConvBiasReLU(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


@case("chains")
def conv2d_bias_relu(s: Size):
    c = s.pick(4, 64, 128)
    return ConvBiasReLU(c, c), (_img(s, c),)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@case("chains")
def conv2d_bn_relu(s: Size):
    c = s.pick(4, 64, 128)
    return ConvBNReLU(c, c), (_img(s, c),)


class ConvGeluScaleResidual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + F.gelu(self.conv(x)) * 0.5


@case("chains")
def conv2d_gelu_scale_residual(s: Size):
    c = s.pick(4, 64, 128)
    return ConvGeluScaleResidual(c), (_img(s, c),)


class ConvGroupNormScaleSigmoid(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)
        self.norm = nn.GroupNorm(4, cout)
        self.scale = nn.Parameter(torch.rand(cout, 1, 1) + 0.5)

    def forward(self, x):
        return torch.sigmoid(self.norm(self.conv(x)) * self.scale)


@case("chains")
def conv2d_groupnorm_scale_sigmoid(s: Size):
    cin, cout = s.pick((3, 8), (32, 64), (64, 128))
    return ConvGroupNormScaleSigmoid(cin, cout), (_img(s, cin),)


class ConvReLUAvgPool(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return F.avg_pool2d(F.relu(self.conv(x)), 2)


@case("chains")
def conv2d_relu_avgpool(s: Size):
    cin, cout = s.pick((3, 8), (32, 64), (64, 128))
    return ConvReLUAvgPool(cin, cout), (_img(s, cin),)


class ConvMaxPoolHardswish(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)

    def forward(self, x):
        return F.hardswish(F.max_pool2d(self.conv(x) - 0.5, 2))


@case("chains")
def conv2d_sub_maxpool_hardswish(s: Size):
    cin, cout = s.pick((3, 8), (32, 64), (64, 128))
    return ConvMaxPoolHardswish(cin, cout), (_img(s, cin),)


class ConvSoftmaxChannels(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return torch.softmax(self.conv(x), dim=1)


@case("chains")
def conv2d_softmax_channels(s: Size):
    cin, cout = s.pick((3, 8), (32, 64), (64, 128))
    return ConvSoftmaxChannels(cin, cout), (_img(s, cin),)


class ConvLogsumexpClamp(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        y = torch.logsumexp(self.conv(x), dim=1, keepdim=True)
        return torch.clamp(y, -1.0, 1.0) * 2.0


@case("chains")
def conv2d_logsumexp_clamp(s: Size):
    cin, cout = s.pick((3, 8), (32, 64), (64, 128))
    return ConvLogsumexpClamp(cin, cout), (_img(s, cin),)


class ConvHardtanhMean(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x):
        return F.hardtanh(self.conv(x), -1, 1).mean(dim=(2, 3))


@case("chains")
def conv2d_hardtanh_mean(s: Size):
    cin, cout = s.pick((3, 8), (32, 64), (64, 128))
    return ConvHardtanhMean(cin, cout), (_img(s, cin),)


class Conv1dBiasGelu(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 5, padding=2)
        self.bias = nn.Parameter(torch.randn(cout, 1) * 0.1)

    def forward(self, x):
        return F.gelu(self.conv(x) + self.bias)


@case("chains")
def conv1d_bias_gelu(s: Size):
    cin, cout = s.pick((4, 8), (64, 128), (256, 512))
    return Conv1dBiasGelu(cin, cout), (s.randn(*s.pick((2, cin, 32), (16, cin, 4096), (64, cin, 16384))),)


class Conv3dInstanceNormClamp(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.InstanceNorm3d(cout)

    def forward(self, x):
        return torch.clamp(self.norm(self.conv(x)), min=-1.0, max=1.0)


@case("chains")
def conv3d_instancenorm_clamp(s: Size):
    cin, cout = s.pick((2, 4), (8, 16), (32, 64))
    x = s.randn(*s.pick((2, cin, 6, 8, 8), (4, cin, 16, 32, 32), (16, cin, 32, 64, 64)))
    return Conv3dInstanceNormClamp(cin, cout), (x,)


class ConvTranspose2dSoftmaxBiasScaleSigmoid(nn.Module):
    """The issue's example: ConvTranspose2d, softmax over channels, bias, scaling, sigmoid."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, output_padding=0)
        self.bias = nn.Parameter(torch.randn(cout, 1, 1) * 0.1)

    def forward(self, x):
        return torch.sigmoid((torch.softmax(self.conv(x), dim=1) + self.bias) * 2.0)


@case("chains")
def convt2d_softmax_bias_scale_sigmoid(s: Size):
    cin, cout = s.pick((4, 8), (32, 64), (64, 128))
    x = s.randn(*s.pick((2, cin, 8, 8), (8, cin, 32, 32), (64, cin, 64, 64)))
    return ConvTranspose2dSoftmaxBiasScaleSigmoid(cin, cout), (x,)


class ConvTranspose1dReLU(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, 4, stride=2, padding=1)

    def forward(self, x):
        return F.leaky_relu(self.conv(x), 0.2)


@case("chains")
def convt1d_leaky_relu(s: Size):
    cin, cout = s.pick((8, 4), (128, 64), (512, 256))
    return ConvTranspose1dReLU(cin, cout), (s.randn(*s.pick((2, cin, 16), (16, cin, 2048), (64, cin, 8192))),)


class ConvTranspose3dBNAvgPool(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm3d(cout)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return F.avg_pool3d(self.bn(self.conv(x)), 2)


@case("chains")
def convt3d_bn_avgpool(s: Size):
    cin, cout = s.pick((4, 4), (16, 16), (32, 32))
    x = s.randn(*s.pick((1, cin, 4, 6, 6), (4, cin, 8, 16, 16), (16, cin, 16, 32, 32)))
    return ConvTranspose3dBNAvgPool(cin, cout), (x,)


def _tokens(s: Size, d: int) -> torch.Tensor:
    return s.randn(*s.pick((2, 16, d), (16, 512, d), (64, 2048, d)))


class LinearGelu(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)

    def forward(self, x):
        return F.gelu(self.fc(x))


@case("chains")
def linear_bias_gelu(s: Size):
    d, f = s.pick((32, 64), (768, 3072), (4096, 16384))
    return LinearGelu(d, f), (_tokens(s, d),)


class LinearDropoutResidualLayerNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.drop(self.fc(x)))


@case("chains")
def linear_dropout_residual_layernorm(s: Size):
    d = s.pick(32, 768, 4096)
    return LinearDropoutResidualLayerNorm(d), (_tokens(s, d),)


class GemmScaleClampLogsumexp(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)

    def forward(self, x):
        y = torch.clamp(self.fc(x) * 2.0, -10.0, 10.0)
        return torch.logsumexp(y, dim=-1)


@case("chains")
def gemm_scale_clamp_logsumexp(s: Size):
    d, f = s.pick((32, 64), (1024, 2048), (8192, 8192))
    return GemmScaleClampLogsumexp(d, f), (s.randn(s.pick(16, 1024, 8192), d),)


class GemmSigmoidSum(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, f) / d ** 0.5)

    def forward(self, x):
        return torch.sigmoid(x @ self.weight).sum(dim=1)


@case("chains")
def gemm_sigmoid_sum(s: Size):
    d, f = s.pick((32, 64), (1024, 2048), (8192, 8192))
    return GemmSigmoidSum(d, f), (s.randn(s.pick(16, 1024, 8192), d),)


class LinearSwishMean(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)

    def forward(self, x):
        return F.silu(self.fc(x)).mean(dim=-1, keepdim=True)


@case("chains")
def linear_swish_mean(s: Size):
    d, f = s.pick((32, 64), (1024, 2048), (8192, 8192))
    return LinearSwishMean(d, f), (s.randn(s.pick(16, 1024, 8192), d),)


class LinearBatchNormReLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)
        self.bn = nn.BatchNorm1d(f)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return F.relu(self.bn(self.fc(x)))


@case("chains")
def linear_batchnorm_relu(s: Size):
    d, f = s.pick((32, 64), (1024, 2048), (8192, 8192))
    return LinearBatchNormReLU(d, f), (s.randn(s.pick(16, 1024, 8192), d),)


class LinearSoftmax(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)

    def forward(self, x):
        return torch.softmax(self.fc(x) / 0.7, dim=-1)


@case("chains")
def linear_scale_softmax(s: Size):
    d, f = s.pick((32, 64), (768, 1000), (4096, 32000))
    return LinearSoftmax(d, f), (s.randn(s.pick(16, 1024, 4096), d),)


class BmmSoftmaxBmm(nn.Module):
    """Attention written as bmm, scale, softmax, bmm (no SDPA)."""

    def forward(self, q, k, v):
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5, dim=-1)
        return torch.bmm(p, v)


@case("chains")
def bmm_softmax_bmm(s: Size):
    b, t, d = s.pick((4, 16, 16), (32, 256, 64), (256, 1024, 128))
    return BmmSoftmaxBmm(), (s.randn(b, t, d), s.randn(b, t, d), s.randn(b, t, d))


class BmmScaleResidual(nn.Module):
    def forward(self, a, b, r):
        return torch.bmm(a, b) * 0.125 + r


@case("chains")
def bmm_scale_residual(s: Size):
    b, m, k, n = s.pick((4, 16, 32, 24), (32, 256, 128, 256), (256, 1024, 512, 1024))
    return BmmScaleResidual(), (s.randn(b, m, k), s.randn(b, k, n), s.randn(b, m, n))


class LinearMinBias(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)
        self.bias = nn.Parameter(torch.randn(f) * 0.1)

    def forward(self, x):
        return torch.clamp_max(self.fc(x), 0.5) + self.bias


@case("chains")
def linear_min_bias(s: Size):
    d, f = s.pick((32, 64), (1024, 2048), (8192, 8192))
    return LinearMinBias(d, f), (s.randn(s.pick(16, 1024, 8192), d),)
