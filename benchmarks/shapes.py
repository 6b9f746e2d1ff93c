"""Real-model shapes for the overhead benchmark (issue 15), written out in plain torch.

torchvision's PyPI wheel is a CUDA build that fails here, so the ResNets are written out as
torchvision writes them (BasicBlock, BatchNorm, ReLU modules). Each builder returns
(model, inputs, targets, loss) for one batch; the benchmark repeats that batch.

    >>> model, x, y, loss = resnet_cnn()
    >>> loss(model(x), y).backward()
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn plus the (projected) input, relu."""

    def __init__(self, inp: int, out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + skip)


def _classify(model: nn.Module, images: int, size: int, classes: int = 10):
    return model, torch.randn(images, 3, size, size), torch.randint(classes, (images,)), F.cross_entropy


def resnet_cnn(blocks: int = 4, width: int = 64, images: int = 32, size: int = 16):
    """A ResNet-style CNN: a conv stem, ``blocks`` residual blocks of ``width`` channels, a linear head."""
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                          *[BasicBlock(width, width) for _ in range(blocks)],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    return _classify(model, images, size)


def resnet18(images: int = 16, size: int = 64, classes: int = 10):
    """torchvision's resnet18 (11.2 M parameters with 10 classes) on ``size`` x ``size`` images."""
    layers, inp = [], 64
    for i, out in enumerate((64, 128, 256, 512)):
        layers += [BasicBlock(inp, out, 1 if i == 0 else 2), BasicBlock(out, out)]
        inp = out
    model = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                          nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))
    return _classify(model, images, size, classes)


def _tokens(model: nn.Module, vocab: int, batch: int, length: int):
    tokens = torch.randint(vocab, (batch, length + 1))

    def loss(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return model, tokens[:, :-1], tokens[:, 1:], loss


class TransformerLM(nn.Module):
    """Token and position embeddings, a causal torch ``TransformerEncoder``, a linear head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.position[:t]
        return self.head(self.encoder(x, mask=self.mask[:t, :t], is_causal=True))


def transformer_lm(vocab: int = 1024, width: int = 256, layers: int = 4, batch: int = 8, length: int = 64):
    """A transformer LM: torch ``TransformerEncoder``, 4 layers of width 256, 8 x 64 tokens."""
    return _tokens(TransformerLM(vocab, width, layers, 8, length), vocab, batch, length)


class LSTMLM(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, layers, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def lstm_lm(vocab: int = 1024, width: int = 256, layers: int = 2, batch: int = 16, length: int = 64):
    """A 2-layer LSTM LM of width 256 on 16 x 64 tokens."""
    return _tokens(LSTMLM(vocab, width, layers), vocab, batch, length)


class Block(nn.Module):
    """nanoGPT's block: pre-LayerNorm causal self-attention and a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's GPT: token and position embeddings, blocks, a final LayerNorm, a tied head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.h = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt(vocab: int = 65, width: int = 128, layers: int = 4, batch: int = 8, length: int = 64):
    """nanoGPT, 4 layers of width 128, 4 heads, characters (vocab 65), 8 x 64 tokens."""
    return _tokens(NanoGPT(vocab, width, layers, 4, length), vocab, batch, length)


SHAPES = {"resnet_cnn": resnet_cnn, "transformer_lm": transformer_lm, "lstm_lm": lstm_lm,
          "resnet18": resnet18, "nanogpt": nanogpt}
