"""Whole networks written here (no torchvision): ResNet-18, MobileNetV2, DenseNet block and transition, an
Inception module, ConvNeXt block and stage, a small ViT, a Swin block pair (window attention), a UNet stage,
LSTM and GRU (torch's modules and hand-written cell loops), an MLP-Mixer, a 1-D audio conv encoder."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import Size, case


def _bn(c: int) -> nn.BatchNorm2d:
    """BatchNorm with running statistics and affine parameters away from their initial values."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


def _image(s: Size, small: int = 32, batch_gpu: int = 64) -> torch.Tensor:
    return s.randn(*s.pick((1, 3, small, small), (1, 3, 224, 224), (batch_gpu, 3, 224, 224)))


# ------------------------------------------------------------------------------------------ ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, width: int = 64, classes: int = 1000):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), _bn(w), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        y = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@case("nets")
def resnet18(s: Size):
    return ResNet18(s.pick(8, 64), s.pick(10, 1000)), (_image(s),)


# ------------------------------------------------------------------------------------------ MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), _bn(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), _bn(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, cout, 1, bias=False), _bn(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

    def __init__(self, width: float = 1.0, repeats: int | None = None, classes: int = 1000):
        super().__init__()

        def c(n: int) -> int:
            return max(8, int(n * width + 4) // 8 * 8)
        layers: list[nn.Module] = [nn.Conv2d(3, c(32), 3, 2, 1, bias=False), _bn(c(32)), nn.ReLU6()]
        cin = c(32)
        for t, ch, n, stride in self.CONFIG:
            for i in range(repeats or n):
                layers.append(InvertedResidual(cin, c(ch), stride if i == 0 else 1, t))
                cin = c(ch)
        last = c(1280)
        layers += [nn.Conv2d(cin, last, 1, bias=False), _bn(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@case("nets")
def mobilenet_v2(s: Size):
    return MobileNetV2(s.pick(0.25, 1.0), s.pick(1, None), s.pick(10, 1000)), (_image(s),)


# ------------------------------------------------------------------------------------------ DenseNet
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1, self.conv1 = _bn(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = _bn(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(y)))


class DenseBlock(nn.Module):
    def __init__(self, cin: int, growth: int, n: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(n))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn, self.conv = _bn(cin), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


@case("nets")
def densenet_block(s: Size):
    cin, growth, n = s.pick((16, 8, 3), (64, 32, 6))
    x = s.randn(*s.pick((1, cin, 16, 16), (1, cin, 56, 56), (64, cin, 56, 56)))
    return DenseBlock(cin, growth, n), (x,)


@case("nets")
def densenet_transition(s: Size):
    cin = s.pick(32, 256)
    x = s.randn(*s.pick((1, cin, 16, 16), (4, cin, 56, 56), (64, cin, 56, 56)))
    return Transition(cin, cin // 2), (x,)


# ------------------------------------------------------------------------------------------ Inception
def _conv_bn_relu(cin: int, cout: int, k: int, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, bias=False, **kw), _bn(cout), nn.ReLU())


class InceptionModule(nn.Module):
    """GoogLeNet's inception (3a) module: 1x1, 1x1-3x3, 1x1-3x3-3x3 and pool-1x1 branches, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = _conv_bn_relu(cin, c1, 1)
        self.b2 = nn.Sequential(_conv_bn_relu(cin, c3r, 1), _conv_bn_relu(c3r, c3, 3, padding=1))
        self.b3 = nn.Sequential(_conv_bn_relu(cin, c5r, 1), _conv_bn_relu(c5r, c5, 3, padding=1),
                                _conv_bn_relu(c5, c5, 3, padding=1))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn_relu(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


@case("nets")
def inception_module(s: Size):
    k = s.pick(8, 1)
    x = s.randn(*s.pick((1, 24, 14, 14), (4, 192, 28, 28), (64, 192, 28, 28)))
    return InceptionModule(192 // k, 64 // k, 96 // k, 128 // k, 16 // k, 32 // k, 32 // k), (x,)


# ------------------------------------------------------------------------------------------ ConvNeXt
class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNeXtStage(nn.Module):
    def __init__(self, cin: int, dim: int, depth: int):
        super().__init__()
        self.down = nn.Sequential(ChannelsFirstLayerNorm(cin), nn.Conv2d(cin, dim, 2, stride=2))
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth)))

    def forward(self, x):
        return self.blocks(self.down(x))


@case("nets")
def convnext_block(s: Size):
    dim = s.pick(16, 96, 192)
    x = s.randn(*s.pick((1, dim, 14, 14), (4, dim, 56, 56), (64, dim, 56, 56)))
    return ConvNeXtBlock(dim), (x,)


@case("nets")
def convnext_stage(s: Size):
    cin, dim, depth = s.pick((8, 16, 2), (96, 192, 3))
    x = s.randn(*s.pick((1, cin, 16, 16), (4, cin, 56, 56), (64, cin, 56, 56)))
    return ConvNeXtStage(cin, dim, depth), (x,)


# ------------------------------------------------------------------------------------------ ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int, patch: int, dim: int, depth: int, heads: int, classes: int):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


@case("nets")
def vit_small(s: Size):
    image, patch, dim, depth, heads = s.pick((32, 8, 32, 2, 2), (224, 16, 384, 12, 6))
    return ViT(image, patch, dim, depth, heads, s.pick(10, 1000)), (_image(s, small=32),)


# ------------------------------------------------------------------------------------------ Swin
class WindowAttention(nn.Module):
    """Multi-head attention inside each window, with a learned relative position bias (precomputed
    index into the table, as Swin does)."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def forward(self, x, mask=None):
        n = x.shape[1]
        bias = self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:  # (windows, n, n), per window of each image
            nw = mask.shape[0]
            bias = (bias + mask[:, None]).repeat(x.shape[0] // nw, 1, 1, 1)
        return self.attn(x, bias)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, res: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, window, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        if shift:
            img = torch.zeros(1, res, res, 1)
            spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for i, (h, w) in enumerate((h, w) for h in spans for w in spans):
                img[:, h, w, :] = i
            win = self._partition(img).squeeze(-1)
            mask = win[:, None, :] - win[:, :, None]
            self.register_buffer("mask", mask.masked_fill(mask != 0, -100.0), persistent=False)
        else:
            self.mask = None

    def _partition(self, x):
        b, h, w, c = x.shape
        k = self.window
        return x.view(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k, c)

    def forward(self, x):
        b, h, w, c = x.shape
        k = self.window
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = self.attn(self._partition(y), self.mask)
        y = y.view(b, h // k, w // k, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class SwinPair(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, res: int):
        super().__init__()
        self.blocks = nn.Sequential(SwinBlock(dim, heads, window, 0, res), SwinBlock(dim, heads, window, window // 2, res))

    def forward(self, x):
        return self.blocks(x)


@case("nets")
def swin_block(s: Size):
    dim, heads, window, res = s.pick((32, 2, 4, 8), (96, 3, 7, 56))
    x = s.randn(*s.pick((1, res, res, dim), (2, res, res, dim), (64, res, res, dim)))
    return SwinPair(dim, heads, window, res), (x,)


# ------------------------------------------------------------------------------------------ UNet stage
class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(cin, cout, 3, padding=1), _conv_bn_relu(cout, cout, 3, padding=1))

    def forward(self, x):
        return self.body(x)


class UNetStage(nn.Module):
    """One level of a UNet: encode, pool, the level below, upsample, concatenate the skip, decode."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.enc, self.mid = DoubleConv(cin, c), DoubleConv(c, 2 * c)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = DoubleConv(2 * c, c)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        skip = self.enc(x)
        y = self.up(self.mid(F.max_pool2d(skip, 2)))
        return self.out(self.dec(torch.cat([skip, y], 1)))


@case("nets")
def unet_stage(s: Size):
    cin, c = s.pick((3, 8), (32, 64))
    x = s.randn(*s.pick((1, cin, 16, 16), (2, cin, 128, 128), (32, cin, 256, 256)))
    return UNetStage(cin, c), (x,)


# ------------------------------------------------------------------------------------------ recurrent
def _seq(s: Size, d: int) -> torch.Tensor:
    return s.randn(*s.pick((2, 8, d), (16, 64, d), (256, 128, d)))


class TorchRNN(nn.Module):
    def __init__(self, kind: str, d: int, h: int, layers: int):
        super().__init__()
        self.rnn = getattr(nn, kind)(d, h, num_layers=layers, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


@case("nets")
def lstm(s: Size):
    d, h = s.pick((8, 16), (256, 512), (1024, 1024))
    return TorchRNN("LSTM", d, h, 2), (_seq(s, d),)


@case("nets")
def gru(s: Size):
    d, h = s.pick((8, 16), (256, 512), (1024, 1024))
    return TorchRNN("GRU", d, h, 2), (_seq(s, d),)


class LSTMCells(nn.Module):
    """An LSTM layer written as a loop over time of matmuls and gates (unrolled at capture)."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.ih, self.hh = nn.Linear(d, 4 * h), nn.Linear(h, 4 * h, bias=False)
        self.h = h

    def forward(self, x):
        b, t, _ = x.shape
        h = c = x.new_zeros(b, self.h)
        xs = self.ih(x)  # every step's input projection in one GEMM
        outs = []
        for i in range(t):
            gi, gf, gg, go = (xs[:, i] + self.hh(h)).chunk(4, 1)
            c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
            h = torch.sigmoid(go) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, 1)


class GRUCells(nn.Module):
    """A GRU layer written as a loop over time (unrolled at capture)."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.ih, self.hh = nn.Linear(d, 3 * h), nn.Linear(h, 3 * h)
        self.h = h

    def forward(self, x):
        b, t, _ = x.shape
        h = x.new_zeros(b, self.h)
        xs = self.ih(x)
        outs = []
        for i in range(t):
            xr, xz, xn = xs[:, i].chunk(3, 1)
            hr, hz, hn = self.hh(h).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
            outs.append(h)
        return torch.stack(outs, 1)


@case("nets")
def lstm_cells(s: Size):
    d, h = s.pick((8, 16), (256, 512), (1024, 1024))
    x = s.randn(*s.pick((2, 6, d), (16, 32, d), (256, 64, d)))
    return LSTMCells(d, h), (x,)


@case("nets")
def gru_cells(s: Size):
    d, h = s.pick((8, 16), (256, 512), (1024, 1024))
    x = s.randn(*s.pick((2, 6, d), (16, 32, d), (256, 64, d)))
    return GRUCells(d, h), (x,)


# ------------------------------------------------------------------------------------------ MLP-Mixer
class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1, self.token_mlp = nn.LayerNorm(dim), Mlp(tokens, tokens * 2)
        self.norm2, self.channel_mlp = nn.LayerNorm(dim), Mlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, image: int, patch: int, dim: int, depth: int, classes: int):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*(MixerBlock((image // patch) ** 2, dim) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        t = self.blocks(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(t).mean(1))


@case("nets")
def mlp_mixer(s: Size):
    image, patch, dim, depth = s.pick((32, 8, 32, 2), (224, 16, 512, 8))
    return MLPMixer(image, patch, dim, depth, s.pick(10, 1000)), (_image(s, small=32),)


# ------------------------------------------------------------------------------------------ audio encoder
class AudioEncoder(nn.Module):
    """A wav2vec2-style feature encoder: strided 1-D convolutions with GELU, GroupNorm after the first."""

    LAYERS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))

    def __init__(self, c: int):
        super().__init__()
        convs, cin = [], 1
        for k, stride in self.LAYERS:
            convs.append(nn.Conv1d(cin, c, k, stride, bias=False))
            cin = c
        self.convs = nn.ModuleList(convs)
        self.norm = nn.GroupNorm(c, c)

    def forward(self, wav):
        x = wav[:, None]
        for i, conv in enumerate(self.convs):
            x = conv(x)
            x = F.gelu(self.norm(x) if i == 0 else x)
        return x.transpose(1, 2)


@case("nets")
def audio_encoder(s: Size):
    c = s.pick(16, 512)
    return AudioEncoder(c), (s.randn(*s.pick((1, 1600), (2, 16000), (32, 64000))),)
