"""The two "real" models of the overhead table (issue 20, item 6), written for the benchmark so that
it needs no download and no torchvision: a nanoGPT-style character GPT (6 layers, 6 heads, width
384, 256-token blocks: 10.7M parameters) and ResNet-18 (11.2M parameters) for 64x64 images.

Both are ordinary eager modules built from torch.nn layers, so the hook sees what it sees on a
user's model: many parameter tensors of mixed sizes (the GPT: 4 matrices of 384x384 to 384x1536
per block, LayerNorms, embeddings; ResNet-18: convolutions of 1.7k to 2.4M weights, BatchNorms),
ReLU/GELU activations. The GPT returns its logits flattened to (batch x block, vocabulary) so that
the benchmark's `loss_fn(model(x), y)` with CrossEntropyLoss applies to both models unchanged."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from torch import Tensor

GPT_VOCAB = 65  # the character vocabulary of nanoGPT's Shakespeare example
GPT_BLOCK = 256
GPT_LAYERS, GPT_HEADS, GPT_WIDTH = 6, 6, 384


class _Attention(nn.Module):
    """Causal multi-head self-attention (one fused qkv projection, torch's SDPA kernel)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only language model, nanoGPT's layout (tied input/output embeddings)."""

    def __init__(
        self,
        vocab: int = GPT_VOCAB,
        block: int = GPT_BLOCK,
        layers: int = GPT_LAYERS,
        heads: int = GPT_HEADS,
        width: int = GPT_WIDTH,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        self.blocks = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        x = self.ln_f(self.blocks(x))
        return self.head(x).flatten(0, 1)  # (batch x block, vocab): CrossEntropyLoss takes it as is


class _Basic(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.down(x))


def resnet18(classes: int = 200) -> nn.Module:
    """ResNet-18 (2-2-2-2 basic blocks, 64-128-256-512 channels) with the ImageNet stem; for 64x64
    inputs (Tiny ImageNet's size, hence 200 classes) the last stage works on 2x2 maps."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Basic(cin, cout, stride), _Basic(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def gpt_batches(n: int, batch: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """Random token blocks; the targets are the inputs shifted by one, flattened like the logits."""
    out = []
    for _ in range(n):
        seq = torch.randint(0, GPT_VOCAB, (batch, GPT_BLOCK + 1), generator=generator)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].reshape(-1)))
    return out
