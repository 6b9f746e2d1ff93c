"""Small models and tasks for the issue-23 calibration (benchmarks/calibrate_architectures.py):
modern architectures the diagnosis was not tuned on, and the classic pathologies from the
literature, written out (no torchvision), CPU-sized.

Models: ``unet`` (Ronneberger et al. 2015; three variants: plain, He init, BatchNorm),
``vit`` (Dosovitskiy et al. 2021; a top-level ``cls_token`` and ``pos_embed``, blocks of
``nn.MultiheadAttention``, whose ``out_proj`` never runs as a module; ``pool="cls"`` or
``"mean"``, and a head called ``head`` or ``to_logits``), ``mixer`` (Tolstikhin et al. 2021),
``token_transformer`` (pre-LN or post-LN blocks, Xiong et al. 2020), ``plain_cnn`` (deep conv
stack with BatchNorm, no skips), ``lora_mlp`` (a frozen base with rank-r adapters, Hu et al.
2021: B starts at zero), ``recurrent_classifier`` (tanh RNN / LSTM over a long sequence),
``sigmoid_net`` (Glorot & Bengio 2010, Sec. 3: standard init U[-1/sqrt(n), 1/sqrt(n)], the top
hidden layer saturates at 0), ``relu_net`` (He et al. 2015, Fig. 3: 30 plain ReLU layers,
Xavier or He init).

Tasks: ``fields`` (denoising smooth random 16x16 fields, MSE), ``first_token`` (the class is the
first of T tokens: a long-range dependency), ``circles`` (two noisy circles, 2-D inputs).

Example:
    >>> unet("bn")(torch.zeros(2, 1, 16, 16)).shape
    torch.Size([2, 1, 16, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# -- U-Net ---------------------------------------------------------------------------------


def _conv_block(cin: int, cout: int, norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """Two down levels, a bottleneck, two up levels with skip concatenations, a 1x1 ``out``.

    Shapes: (N, 1, H, W) -> (N, 1, H, W), H and W divisible by 4.
    """

    def __init__(self, width: int = 8, norm: bool = False) -> None:
        super().__init__()
        self.down1 = _conv_block(1, width, norm)
        self.down2 = _conv_block(width, 2 * width, norm)
        self.bottom = _conv_block(2 * width, 2 * width, norm)
        self.up2 = _conv_block(4 * width, width, norm)
        self.up1 = _conv_block(2 * width, width, norm)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(x)
        d2 = self.down2(F.max_pool2d(d1, 2))
        b = self.bottom(F.max_pool2d(d2, 2))
        u2 = self.up2(torch.cat([F.interpolate(b, scale_factor=2.0), d2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, scale_factor=2.0), d1], 1))
        return self.out(u1)


def unet(variant: str = "plain", width: int = 8) -> UNet:
    """``plain`` (torch's default init), ``he`` (kaiming_normal_ on every conv), ``bn``
    (BatchNorm after every 3x3 conv)."""
    model = UNet(width, norm=variant == "bn")
    if variant == "he":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return model


def fields(n: int, size: int = 16, noise: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy (n, 1, size, size), clean (n, 1, size, size)): smooth random fields (4x4
    Gaussian coarse grids upsampled bilinearly) plus Gaussian noise of std ``noise``."""
    g = torch.Generator().manual_seed(seed)
    clean = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(size, size), mode="bilinear",
                          align_corners=False)
    return clean + noise * torch.randn(n, 1, size, size, generator=g), clean


# -- ViT -----------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Pre-LN (x + attn(LN(x)), x + mlp(LN(x))) or post-LN (LN(x + attn(x)), LN(x + mlp(x)))
    with ``nn.MultiheadAttention`` (its ``out_proj`` is called inside the attention's forward,
    never as a module)."""

    def __init__(self, width: int, heads: int, pre: bool = True, causal: bool = False) -> None:
        super().__init__()
        self.pre, self.causal = pre, causal
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.causal:
            t = x.shape[1]
            mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre:
            x = x + self._attend(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self._attend(x))
        return self.norm2(x + self.mlp(x))


class ViT(nn.Module):
    """Patch embedding (a strided conv), a top-level ``cls_token`` and ``pos_embed``, pre-LN
    blocks, a final LayerNorm, a linear head named ``head_name``; ``pool`` ``cls`` reads the
    class token, ``mean`` averages the patches (no class token then).

    Shapes: (N, 3, size, size) -> (N, classes).
    """

    def __init__(self, size: int = 16, patch: int = 4, width: int = 32, depth: int = 4, heads: int = 4,
                 classes: int = 10, pool: str = "cls", head_name: str = "head") -> None:
        super().__init__()
        self.pool, self.head_name = pool, head_name
        self.patch_embed = nn.Conv2d(3, width, patch, patch)
        tokens = (size // patch) ** 2 + (pool == "cls")
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        setattr(self, head_name, nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.pool == "cls":
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return getattr(self, self.head_name)(x[:, 0] if self.pool == "cls" else x.mean(1))


# -- MLP-Mixer -----------------------------------------------------------------------------


class MixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing, each pre-LN with a residual."""

    def __init__(self, tokens: int, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(width)
        self.channel_mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """Patch embedding, ``depth`` mixer blocks, LayerNorm, mean over patches, ``head``.
    Shapes: (N, 3, size, size) -> (N, classes)."""

    def __init__(self, size: int = 16, patch: int = 4, width: int = 32, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, patch, patch)
        self.blocks = nn.Sequential(*(MixerBlock((size // patch) ** 2, width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


# -- transformer LM (pre-LN / post-LN) -----------------------------------------------------


class TokenTransformer(nn.Module):
    """Token embedding, learned positions (top-level ``pos``), ``depth`` causal blocks (pre- or
    post-LN), a final LayerNorm for pre-LN, a linear ``lm_head``.
    Shapes: (N, T) int64 -> (N, T, vocab)."""

    def __init__(self, vocab: int = 256, width: int = 32, depth: int = 12, heads: int = 4, context: int = 32,
                 pre: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(1, context, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, pre=pre, causal=True) for _ in range(depth))
        self.final = nn.LayerNorm(width) if pre else nn.Identity()
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[:, :idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final(x))


# -- plain deep CNN with BatchNorm ---------------------------------------------------------


def plain_cnn(depth: int = 10, channels: int = 16, classes: int = 10) -> nn.Sequential:
    """``depth`` conv3x3-BN-ReLU layers, no skips (a VGG-style stack), global pooling, linear.
    Shapes: (N, 3, H, W) -> (N, classes)."""
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(depth):
        layers += [nn.Conv2d(cin, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        cin = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


# -- LoRA ----------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen ``base`` Linear plus a trainable low-rank update B A (Hu et al. 2021): A
    Kaiming-uniform, B zero, scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


def lora_mlp(inputs: int = 3 * 16 * 16, width: int = 64, depth: int = 3, classes: int = 10) -> nn.Sequential:
    """A random frozen ReLU MLP (``depth`` hidden layers) with LoRA adapters on every hidden
    Linear and a trainable head. Shapes: (N, 3, 16, 16) -> (N, classes)."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = inputs
    for _ in range(depth):
        layers += [LoRALinear(nn.Linear(fan_in, width)), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, classes))


# -- recurrent nets ------------------------------------------------------------------------


class RecurrentClassifier(nn.Module):
    """Embedding -> ``nn.RNN`` (tanh or relu) or ``nn.LSTM`` -> the last state -> ``head``.
    ``recurrent_scale`` multiplies the recurrent weight after an orthogonal init (RNN only):
    above 1 the gradient through time can grow geometrically (Pascanu et al. 2013).
    Shapes: (N, T) int64 -> (N, classes)."""

    def __init__(self, cell: str = "rnn", vocab: int = 8, width: int = 32, classes: int = 4,
                 recurrent_scale: float | None = None, nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = (nn.LSTM(width, width, batch_first=True) if cell == "lstm"
                    else nn.RNN(width, width, batch_first=True, nonlinearity=nonlinearity))
        if recurrent_scale is not None:
            with torch.no_grad():
                nn.init.orthogonal_(self.rnn.weight_hh_l0)
                self.rnn.weight_hh_l0.mul_(recurrent_scale)
        self.head = nn.Linear(width, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(idx))
        return self.head(out[:, -1])


def first_token(n: int, length: int, vocab: int = 8, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n, length), labels (n,)): the label is the first token (< ``classes``); the
    rest are noise tokens from ``classes`` .. ``vocab`` - 1. A dependency ``length`` steps long."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    tokens = torch.randint(classes, vocab, (n, length), generator=g)
    tokens[:, 0] = labels
    return tokens, labels


# -- classic pathologies -------------------------------------------------------------------


def sigmoid_net(depth: int = 4, width: int = 64, inputs: int = 3 * 16 * 16, classes: int = 10) -> nn.Sequential:
    """Glorot & Bengio 2010, Sec. 3.1-3.2: ``depth`` sigmoid layers with the "standard" init
    W ~ U[-1/sqrt(n), 1/sqrt(n)], biases 0, softmax output. Its top hidden layer is driven
    toward 0 early in training (their Fig. 2). Shapes: (N, 3, 16, 16) -> (N, classes)."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = inputs
    for _ in range(depth):
        linear = nn.Linear(fan_in, width)
        nn.init.uniform_(linear.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Sigmoid()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, classes))


def relu_net(depth: int = 30, width: int = 32, inputs: int = 3 * 16 * 16, classes: int = 10,
             init: str = "he") -> nn.Sequential:
    """He et al. 2015, Sec. 2.2 and Fig. 3: ``depth`` plain ReLU layers, init ``he``
    (N(0, 2/n)) or ``xavier`` (N(0, 1/n)): Xavier halves the signal at every layer, 30 layers
    shrink it 2^15-fold and the net does not learn. Shapes: (N, 3, 16, 16) -> (N, classes)."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = inputs
    for _ in range(depth):
        linear = nn.Linear(fan_in, width)
        nn.init.normal_(linear.weight, 0.0, math.sqrt((2.0 if init == "he" else 1.0) / fan_in))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, classes))
