"""The benchmarks' workloads: the real models of ``gradflow.experiments.zoo`` (one definition of
each, shared with the calibration) at the sizes of issue 15, and the wide MLP.

Each builder returns (model, inputs, targets, loss) for one batch; the benchmarks repeat that
batch. Data comes from the zoo's learnable tasks, so gradients look like a real run's.

    >>> model, x, y, loss = resnet_cnn()
    >>> loss(model(x), y).backward()
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gradflow.experiments import zoo  # noqa: E402


def _images(model: nn.Module, images: int, size: int):
    x, y = zoo.image_task(images, size=size, seed=0)
    return model, x, y, F.cross_entropy


def _tokens(model: nn.Module, vocab: int, batch: int, length: int):
    tokens = zoo.markov_tokens(batch, length, vocab, seed=0)

    def loss(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return model, tokens[:, :-1], tokens[:, 1:], loss


def resnet_cnn():
    """zoo.resnet_cnn: 4 basic blocks (64 channels, then 128 at half resolution), 32 images of 16x16."""
    return _images(zoo.resnet_cnn(blocks=4, channels=64), 32, 16)


def resnet18():
    """zoo.resnet18 (11.2 M parameters) on 16 images of 64x64."""
    return _images(zoo.resnet18(), 16, 64)


def transformer_lm():
    """zoo.transformer_lm: torch ``TransformerEncoder``, 4 layers of width 256, 8 x 64 tokens of 1024."""
    return _tokens(zoo.transformer_lm(vocab=1024, width=256, layers=4, heads=8, context=64), 1024, 8, 64)


def lstm_lm():
    """zoo.lstm_lm: 2 layers of width 256 on 16 x 64 tokens of 1024."""
    return _tokens(zoo.lstm_lm(vocab=1024, width=256, layers=2), 1024, 16, 64)


def nanogpt():
    """zoo.nanogpt: 4 layers of width 128, 4 heads, characters (vocab 65), 8 x 64 tokens."""
    return _tokens(zoo.nanogpt(vocab=65, width=128, layers=4, heads=4, context=64), 65, 8, 64)


def wide_mlp(batch: int = 256):
    """Six hidden layers of 1024 ReLU units (Keras-style names) at batch 256."""
    layers, size = OrderedDict(), 1024
    for i in range(1, 7):
        layers[f"dense_{i}"], layers[f"relu_{i}"] = nn.Linear(size, 1024), nn.ReLU()
    layers["dense_7"] = nn.Linear(1024, 1)
    x = torch.randn(batch, 1024)
    return nn.Sequential(layers), x, (x[:, :1] > 0).float(), F.binary_cross_entropy_with_logits


SHAPES = {"resnet_cnn": resnet_cnn, "transformer_lm": transformer_lm, "lstm_lm": lstm_lm,
          "resnet18": resnet18, "nanogpt": nanogpt}
PROFILED = {**SHAPES, "wide": wide_mlp}
