"""Small reference models written out (no torchvision) and learnable synthetic tasks, for
calibrating the diagnosis on the architectures people train.

Models (every one returns logits; ``hf_gpt2`` returns the Hugging Face model, read
``lm_logits(model, tokens)`` for its logits):

- ``resnet_cnn``: ResNet-style CNN with BatchNorm, basic blocks (He et al. 2016, "Deep Residual
  Learning for Image Recognition", Fig. 2 left and Table 1; the CIFAR variant of Sec. 4.2).
- ``resnet34`` / ``resnet18``: ResNet-34 and -18 as torchvision writes them (basic blocks
  [3, 4, 6, 3] and [2, 2, 2, 2], 7x7 stem, ``downsample`` projections; He et al. 2016, Table 1),
  written out since torchvision's CPU wheel is not installable here.
- ``nanogpt``: nanoGPT-style decoder (Karpathy, nanoGPT ``model.py``): pre-LayerNorm blocks of
  causal self-attention and a GELU MLP, learned positions, weight-tied head.
- ``transformer_lm``: ``nn.TransformerEncoder`` with a causal mask as a language model.
- ``lstm_lm``: embedding -> ``nn.LSTM(num_layers=layers)`` -> linear head (Zaremba et al. 2014).
- ``sigmoid_mlp`` / ``sigmoid_cnn``: deep plain nets with sigmoid and no normalisation or skips,
  the textbook vanishing-gradient case (Glorot & Bengio 2010).
- ``hf_gpt2``: a tiny ``GPT2LMHeadModel`` from ``GPT2Config`` (full 50257 vocabulary, tied
  embeddings); built from the config only, nothing is downloaded.

Data: ``image_task`` (each class a fixed random template plus noise) and ``markov_tokens``
(a sparse random Markov chain over a few tokens of the vocabulary), both learnable in tens of
steps on a CPU.

Example:
    >>> model = resnet_cnn(blocks=2, channels=8)
    >>> x, y = image_task(4, size=8, seed=0)
    >>> model(x).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# -- ResNet-style CNN -----------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the identity (or, when the shape changes, a ``downsample``
    projection: conv1x1 stride s, BN), then ReLU: He et al. 2016, Fig. 2 (left) and option B of
    Sec. 3.3. Parameter names as torchvision's (``layer4.2.conv2``, ``layer2.0.downsample.0``);
    its two ReLUs are modules of their own so that each is an activation tap."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + (x if self.downsample is None else self.downsample(x)))


class ResNetCNN(nn.Module):
    """Stem conv3x3-BN-ReLU, ``blocks`` basic blocks (the second half at twice the channels and
    half the resolution), global average pooling, linear ``fc``.

    Shapes: (N, in_channels, H, W) -> (N, classes).
    """

    def __init__(self, blocks: int = 4, channels: int = 64, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        layers, cin = [], channels
        for i in range(blocks):
            down = blocks > 1 and i == blocks // 2
            cout = cin * 2 if down else cin
            layers.append(BasicBlock(cin, cout, 2 if down else 1))
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():                    # He et al. 2015 init, as torchvision's ResNet
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_cnn(blocks: int = 4, channels: int = 64, classes: int = 10, in_channels: int = 3) -> ResNetCNN:
    """ResNet-style CNN with BatchNorm (He et al. 2016, basic blocks).

    Shapes: (N, in_channels, H, W) float -> (N, classes) logits.

    Example:
        >>> resnet_cnn(blocks=2, channels=8)(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    return ResNetCNN(blocks, channels, classes, in_channels)


# -- ResNet-34 (torchvision's layout) ----------------------------------------------------------


class ResNet(nn.Module):
    """The ImageNet ResNet of He et al. 2016 (Table 1) as torchvision writes it: stem conv7x7/2
    (64) - BN - ReLU - maxpool3x3/2, four stages of basic blocks at 64, 128, 256, 512 channels
    (the first block of stages 2-4 halves the resolution), global average pooling, ``fc``.
    Init as torchvision: convs ``kaiming_normal_(fan_out, relu)``, BN weight 1 and bias 0, ``fc``
    torch's default.

    Shapes: (N, in_channels, H, W) -> (N, classes); H, W >= 32 keep every stage at least 1x1.
    """

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for stage, (count, cout) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            stride = 1 if stage == 1 else 2
            layer = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(count - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet34(classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-34: basic blocks [3, 4, 6, 3] (He et al. 2016, Table 1), torchvision's layout and
    names, 21.3M parameters with 10 classes.

    Shapes: (N, in_channels, H, W) float -> (N, classes) logits.

    Example:
        >>> resnet34()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNet((3, 4, 6, 3), classes, in_channels)


def resnet18(classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2] (He et al. 2016, Table 1), torchvision's layout and
    names, 11.2M parameters with 10 classes.

    Shapes: (N, in_channels, H, W) float -> (N, classes) logits.

    Example:
        >>> resnet18()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNet((2, 2, 2, 2), classes, in_channels)


# -- nanoGPT-style transformer ----------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection (nanoGPT ``c_attn``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(n, t, c))


class MLP(nn.Module):
    """Linear(width, 4 width) -> GELU -> Linear(4 width, width) (nanoGPT ``MLP``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Token and position embeddings, ``layers`` blocks, final LayerNorm, head tied to ``wte``.

    Init as nanoGPT: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 layers)).
    Shapes: (N, T <= context) int64 -> (N, T, vocab) logits.
    """

    def __init__(self, vocab: int = 256, width: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt(vocab: int = 256, width: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> NanoGPT:
    """nanoGPT-style decoder-only transformer with tied embeddings (Karpathy, nanoGPT).

    Shapes: (N, T <= context) int64 -> (N, T, vocab) logits.

    Example:
        >>> nanogpt(vocab=32, width=16, layers=1, heads=2, context=8)(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 32])
    """
    return NanoGPT(vocab, width, layers, heads, context)


# -- nn.TransformerEncoder LM ----------------------------------------------------------------


class TransformerLM(nn.Module):
    """Embedding + learned positions -> ``nn.TransformerEncoder`` (pre-norm, GELU, causal mask)
    -> LayerNorm -> linear head (untied).

    Shapes: (N, T <= context) int64 -> (N, T, vocab) logits.
    """

    def __init__(self, vocab: int = 256, width: int = 256, layers: int = 4, heads: int = 8, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.embed.weight, 0.0, 0.02)
        nn.init.normal_(self.pos, 0.0, 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        x = self.encoder(self.embed(idx) + self.pos[:t], mask=mask, is_causal=True)
        return self.head(self.norm(x))


def transformer_lm(vocab: int = 256, width: int = 256, layers: int = 4, heads: int = 8,
                   context: int = 64) -> TransformerLM:
    """A causal language model on torch's ``nn.TransformerEncoder``.

    Shapes: (N, T <= context) int64 -> (N, T, vocab) logits.

    Example:
        >>> transformer_lm(vocab=32, width=16, layers=1, heads=2, context=8)(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 32])
    """
    return TransformerLM(vocab, width, layers, heads, context)


# -- LSTM LM ---------------------------------------------------------------------------------


class LSTMLM(nn.Module):
    """Embedding -> ``nn.LSTM(width, width, num_layers=layers, batch_first=True)`` -> linear head.

    ``forget_bias`` is added to the forget gate's slice of both LSTM biases (PyTorch orders the
    gates input, forget, cell, output): +1 is Jozefowicz et al. 2015's advice; a large negative
    value forgets at every step, so the gradient through time vanishes.
    Shapes: (N, T) int64 -> (N, T, vocab) logits.
    """

    def __init__(self, vocab: int = 256, width: int = 256, layers: int = 2, forget_bias: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, num_layers=layers, batch_first=True)
        self.head = nn.Linear(width, vocab)
        if forget_bias:
            with torch.no_grad():
                for name, p in self.lstm.named_parameters():
                    if name.startswith("bias"):
                        p[width:2 * width] += forget_bias / 2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)


def lstm_lm(vocab: int = 256, width: int = 256, layers: int = 2, forget_bias: float = 0.0) -> LSTMLM:
    """An LSTM language model (Zaremba et al. 2014, without dropout).

    Shapes: (N, T) int64 -> (N, T, vocab) logits.

    Example:
        >>> lstm_lm(vocab=32, width=16, layers=2)(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 32])
    """
    return LSTMLM(vocab, width, layers, forget_bias)


# -- deep plain nets with sigmoid --------------------------------------------------------------


def sigmoid_mlp(depth: int = 10, width: int = 64, inputs: int = 3 * 16 * 16, classes: int = 10) -> nn.Sequential:
    """Flatten -> ``depth`` x (Linear(width) -> Sigmoid) -> Linear(classes); PyTorch's default
    init, no normalisation, no skips: gradients shrink by about 1/4 per layer (sigmoid' <= 1/4;
    Glorot & Bengio 2010).

    Shapes: (N, ...) with ``inputs`` features -> (N, classes).

    Example:
        >>> sigmoid_mlp(depth=2, width=4, inputs=6)(torch.zeros(3, 6)).shape
        torch.Size([3, 10])
    """
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = inputs
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Sigmoid()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, classes))


def sigmoid_cnn(depth: int = 8, channels: int = 16, classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """``depth`` x (Conv3x3 -> Sigmoid), global average pooling, Linear(classes); no BatchNorm,
    no skips (the plain nets of He et al. 2016, Sec. 4.1, with sigmoid for tanh/ReLU).

    Shapes: (N, in_channels, H, W) -> (N, classes).

    Example:
        >>> sigmoid_cnn(depth=2, channels=4)(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    cin = in_channels
    for _ in range(depth):
        layers += [nn.Conv2d(cin, channels, 3, 1, 1), nn.Sigmoid()]
        cin = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


# -- Hugging Face GPT-2 ------------------------------------------------------------------------


def hf_gpt2(vocab: int = 50257, width: int = 128, layers: int = 4, heads: int = 4, context: int = 64,
            seed: int | None = None):
    """A tiny ``transformers.GPT2LMHeadModel`` built from ``GPT2Config`` (no download): full
    GPT-2 vocabulary by default, tied embeddings (``lm_head.weight`` is ``transformer.wte.weight``),
    dropout off.

    Shapes: ``lm_logits(model, (N, T) int64)`` -> (N, T, vocab).

    Example:
        >>> model = hf_gpt2(vocab=64, width=16, layers=1, heads=2, context=8)   # doctest: +SKIP
        >>> lm_logits(model, torch.zeros(2, 8, dtype=torch.long)).shape          # doctest: +SKIP
        torch.Size([2, 8, 64])
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if seed is not None:
        torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=context,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def lm_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of any language model here: a plain module's output, or a Hugging Face model's
    ``.logits``."""
    out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


# -- synthetic tasks ---------------------------------------------------------------------------


def image_task(n: int, size: int = 16, classes: int = 10, channels: int = 3, noise: float = 1.0,
               seed: int = 0, templates_seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, channels, size, size), labels (n,)): each class a fixed smooth random
    template (the same for every ``seed``), plus Gaussian noise of std ``noise``. Learnable
    by any CNN in tens of steps; chance accuracy is 1/classes.

    Example:
        >>> x, y = image_task(5, size=8, seed=0)
        >>> tuple(x.shape), tuple(y.shape)
        ((5, 3, 8, 8), (5,))
    """
    g = torch.Generator().manual_seed(templates_seed)
    coarse = torch.randn(classes, channels, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    images = templates[labels] + noise * torch.randn(n, channels, size, size, generator=g)
    return images, labels


def markov_tokens(n: int, length: int = 32, vocab: int = 256, states: int = 32, branching: int = 2,
                  seed: int = 0, chain_seed: int = 1234) -> torch.Tensor:
    """(n, length + 1) int64 token sequences from a sparse random Markov chain over ``states``
    tokens spread over ``vocab`` (each has ``branching`` equally likely successors): the
    best loss is log(branching) against log(vocab) at the start, and most of the embedding rows
    never occur, as with a real tokenizer on a small corpus. Inputs are ``[:, :-1]``, targets
    ``[:, 1:]``. The chain is the same for every ``seed``.

    Example:
        >>> markov_tokens(2, length=8, vocab=64, states=8).shape
        torch.Size([2, 9])
    """
    g = torch.Generator().manual_seed(chain_seed)
    ids = torch.randperm(vocab, generator=g)[:states]
    successors = torch.randint(0, states, (states, branching), generator=g)
    g = torch.Generator().manual_seed(seed)
    state = torch.randint(0, states, (n,), generator=g)
    out = torch.empty(n, length + 1, dtype=torch.long)
    for t in range(length + 1):
        out[:, t] = ids[state]
        pick = torch.randint(0, branching, (n,), generator=g)
        state = successors[state, pick]
    return out
