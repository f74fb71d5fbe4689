"""Dynamic networks whose control flow depends on tensor values: the DyCL suite (tests and benchmark).

Each network is sized like a small real model (hidden 512, batch 32 by default) and written the way
such models are written in PyTorch: `.item()` in conditions, loops until a halting score, Python loops
over experts with `nonzero`, recursion over a tree of modules. `NETWORKS` maps a name to a factory
`(hidden, batch) -> (module, candidate_inputs)`; the candidates span input scales so that, together,
they take every branch (tests/test_dycl.py checks that by line coverage of the eager run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALES = (0.05, 0.3, 1.0, 3.0, 10.0, 50.0)


class Block(nn.Module):
    """A residual MLP block: the unit of work inside most segments."""

    def __init__(self, d: int):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.fc2(F.gelu(self.fc1(h)))


class EarlyExit(nn.Module):
    """BranchyNet / DeeBERT: an exit head after every stage; leave when the whole batch is confident."""

    def __init__(self, d: int = 512, classes: int = 10, stages: int = 3, threshold: float = 0.6):
        super().__init__()
        self.stages = nn.ModuleList(Block(d) for _ in range(stages))
        self.exits = nn.ModuleList(nn.Linear(d, classes) for _ in range(stages))
        self.threshold = threshold

    def forward(self, x):
        h = x
        for stage, head in zip(self.stages, self.exits):
            h = stage(h)
            logits = head(h)
            confidence = logits.softmax(-1).amax(-1).min()
            if confidence.item() > self.threshold:
                return logits
        return logits


class GatedResidual(nn.Module):
    """SkipNet / BlockDrop: a gate per block decides from the activations whether the block runs."""

    def __init__(self, d: int = 512, blocks: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.gates = nn.ModuleList(nn.Linear(d, 1) for _ in range(blocks))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        h = x
        for block, gate in zip(self.blocks, self.gates):
            g = torch.sigmoid(gate(h)).mean()
            if g.item() > 0.5:
                h = block(h)
            else:
                h = h * 0.5
        return self.head(h)


class AdaptiveDepth(nn.Module):
    """Adaptive computation time: repeat one cell until the accumulated halting score passes 1."""

    def __init__(self, d: int = 512, max_steps: int = 6):
        super().__init__()
        self.cell = Block(d)
        self.halt = nn.Linear(d, 1)
        self.out = nn.Linear(d, d)
        self.max_steps = max_steps

    def forward(self, x):
        h = x
        halting = x.new_zeros(())
        steps = 0
        while steps < self.max_steps:
            h = self.cell(h)
            halting = halting + torch.sigmoid(self.halt(h)).mean()
            steps += 1
            if halting.item() > 1.5:
                break
        return self.out(h)


class MoE(nn.Module):
    """Mixture of experts with top-1 routing and a Python loop over experts (data-dependent shapes)."""

    def __init__(self, d: int = 512, n_experts: int = 4):
        super().__init__()
        self.router = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(Block(d) for _ in range(n_experts))
        self.n_experts = n_experts

    def forward(self, x):
        route = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            idx = torch.nonzero(route == e).squeeze(1)
            if idx.shape[0] == 0:
                continue
            out[idx] = self.experts[e](x[idx])
        return out + x


class TreeNode(nn.Module):
    """A node of a soft decision tree evaluated hard: the gate picks one child, recursively."""

    def __init__(self, d: int, depth: int):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.gate = nn.Linear(d, 1)
        self.depth = depth
        if depth > 0:
            self.left = TreeNode(d, depth - 1)
            self.right = TreeNode(d, depth - 1)

    def forward(self, h):
        h = torch.relu(self.proj(h)) + h
        if self.depth == 0:
            return h
        if self.gate(h).mean().item() > 0:
            return self.left(h)
        return self.right(h)


class TreeNet(nn.Module):
    """Tree recursion: every node is a submodule with its own dynamic control flow."""

    def __init__(self, d: int = 512, depth: int = 3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.root = TreeNode(d, depth)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = self.inp(x)
        h = self.root(h)
        return self.out(h)


class GreedyDecoder(nn.Module):
    """Greedy decoding that stops once every sequence has produced the end token."""

    def __init__(self, d: int = 512, vocab: int = 64, max_len: int = 8, eos: int = 0):
        super().__init__()
        self.init = nn.Linear(d, d)
        self.emb = nn.Embedding(vocab, d)
        self.wx = nn.Linear(d, d)
        self.wh = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.max_len, self.eos = max_len, eos
        with torch.no_grad():
            self.head.bias[eos] = 0.5  # a prior for the end token, so sequences end at different steps

    def forward(self, x):
        h = torch.tanh(self.init(x))
        tok = torch.full((x.shape[0],), 1, dtype=torch.long, device=x.device)
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        outs = []
        for _ in range(self.max_len):
            h = torch.tanh(self.wx(self.emb(tok)) + self.wh(h))
            logits = self.head(h)
            tok = logits.argmax(-1)
            outs.append(logits)
            done = done | (tok == self.eos)
            if done.all().item():
                break
        return torch.stack(outs, 1)


class StatBranch(nn.Module):
    """Branches on tensor statistics: the spread and the sign of the activations choose the path."""

    def __init__(self, d: int = 512):
        super().__init__()
        self.pre = Block(d)
        self.wide = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.pos = Block(d)
        self.neg = nn.Linear(d, d)
        self.post = nn.Linear(d, d)

    def forward(self, x):
        h = self.pre(x)
        if h.std().item() > 4.0:
            h = self.wide(h)
        elif h.mean().item() > 0:
            h = self.pos(h)
        else:
            h = torch.tanh(self.neg(h))
        return self.post(h)


class ItemLoop(nn.Module):
    """A loop whose trip count comes from `.item()`: the model decides how many refinement steps to run."""

    def __init__(self, d: int = 512, max_iter: int = 4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.count = nn.Linear(d, 1)
        self.body = Block(d)
        self.out = nn.Linear(d, d)
        self.max_iter = max_iter

    def forward(self, x):
        h = self.inp(x)
        n = int(torch.sigmoid(self.count(h)).mean().item() * self.max_iter)
        for _ in range(n):
            h = self.body(h)
        return self.out(h)


class Positive(Exception):
    """Raised by EagerTry to leave its try-block."""


class EagerTry(nn.Module):
    """Exceptions used as control flow: DyCL runs that statement eagerly and compiles the rest."""

    def __init__(self, d: int = 512):
        super().__init__()
        self.a = Block(d)
        self.b = Block(d)

    def forward(self, x):
        h = self.a(x)
        try:
            if h.mean().item() > 0:
                raise Positive
            h = h * 2
        except Positive:
            h = -h
        return self.b(h)


def _inputs(seed: int, batch: int, d: int, scales=SCALES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, d, generator=g)
    shifted = base + 0.5
    return [base * s for s in scales] + [shifted * s for s in scales] + [-shifted * s for s in scales]


def _make(cls: type[nn.Module], **kw) -> Callable[[int, int], tuple[nn.Module, list[torch.Tensor]]]:
    def factory(d: int = 512, batch: int = 32) -> tuple[nn.Module, list[torch.Tensor]]:
        torch.manual_seed(0)
        return cls(d=d, **kw).eval(), _inputs(1, batch, d)
    factory.__name__ = cls.__name__
    return factory


NETWORKS: dict[str, Callable[..., tuple[nn.Module, list[torch.Tensor]]]] = {
    "early_exit": _make(EarlyExit),
    "gated_residual": _make(GatedResidual),
    "adaptive_depth": _make(AdaptiveDepth),
    "moe_top1": _make(MoE),
    "tree_recursion": _make(TreeNet),
    "greedy_decode": _make(GreedyDecoder),
    "stat_branch": _make(StatBranch),
    "item_loop": _make(ItemLoop),
}
