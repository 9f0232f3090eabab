"""Reference architectures used by the tests, the benchmarks and the reproductions, written in
plain PyTorch the way their authors write them (so that fastcurv is tried on models as people
train them, not on models shaped for it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["resnet18", "NanoGPT", "LSTMClassifier"]


def resnet18(width: int = 64, num_classes: int = 10, norm=None) -> nn.Sequential:
    """ResNet-18 for 32x32 inputs (CIFAR stem: 3x3 conv, no max-pool), BasicBlocks [2, 2, 2, 2];
    ``width`` scales the channels (64 is the standard network); ``norm(channels)`` builds the
    normalization layers (default ``nn.BatchNorm2d``)."""
    norm = norm or nn.BatchNorm2d

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = norm(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = norm(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU()]
    cin = width
    for mult, stride in [(1, 1), (2, 2), (4, 2), (8, 2)]:
        layers += [BasicBlock(cin, width * mult, stride), BasicBlock(width * mult, width * mult, 1)]
        cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


class _CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.heads = heads

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = _CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT as written: tied ``wte``/``lm_head``, ``wpe(torch.arange(T))`` without a batch dim,
    causal attention through ``F.scaled_dot_product_attention``, pre-LayerNorm blocks."""

    def __init__(self, vocab: int = 256, block_size: int = 128, layers: int = 2, heads: int = 4, d: int = 64):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.h = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM (batch_first) -> last hidden state -> Linear."""

    def __init__(self, vocab: int = 1000, d: int = 64, hidden: int = 128, layers: int = 1, classes: int = 10,
                 bidirectional: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])
