"""Dense models as ``nn.Sequential`` with Keras layer names and Keras initializers.

Layers are named the Keras way: ``dense_1`` is the first hidden layer, ``dense_{depth+1}``
the output layer; each activation module is named after its function and layer index
(``tanh_1``, ``relu_3``, ``sigmoid_6``). PyTorch stores a weight as (out, in), so
fan_in = in_features and fan_out = out_features.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

InitSpec = str | Mapping[str, Any]

# name -> module factory. leaky_relu uses tf.nn.leaky_relu's slope (0.2), gelu the exact erf form.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=0.2),
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": lambda: nn.GELU(approximate="none"),
    "softplus": nn.Softplus,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
}

# Keras' VarianceScaling divides the target std by the std of a unit normal cut at +-2.
_TRUNC_STD = 0.87962566103423978


def _fans(w: torch.Tensor) -> tuple[int, int]:
    return w.shape[1], w.shape[0]  # (out, in) storage


def _trunc_normal(w: torch.Tensor, mean: float, std: float) -> None:
    # Keras TruncatedNormal redraws values beyond two standard deviations.
    nn.init.trunc_normal_(w, mean=mean, std=std, a=mean - 2 * std, b=mean + 2 * std)


def _variance_scaling(w: torch.Tensor, scale: float, mode: str, distribution: str) -> None:
    fan_in, fan_out = _fans(w)
    n = {"fan_in": fan_in, "fan_avg": (fan_in + fan_out) / 2}[mode]
    if distribution == "uniform":
        limit = math.sqrt(3.0 * scale / n)
        nn.init.uniform_(w, -limit, limit)
    else:
        std = math.sqrt(scale / n) / _TRUNC_STD
        _trunc_normal(w, 0.0, std)


def random_uniform(w: torch.Tensor, minval: float = -0.05, maxval: float = 0.05) -> None:
    """Keras RandomUniform: U(minval, maxval)."""
    nn.init.uniform_(w, minval, maxval)


def random_normal(w: torch.Tensor, mean: float = 0.0, stddev: float = 0.05) -> None:
    """Keras RandomNormal: N(mean, stddev), not truncated."""
    nn.init.normal_(w, mean, stddev)


def truncated_normal(w: torch.Tensor, mean: float = 0.0, stddev: float = 0.05) -> None:
    """Keras TruncatedNormal: N(mean, stddev) cut at two standard deviations."""
    _trunc_normal(w, mean, stddev)


def he_uniform(w: torch.Tensor) -> None:
    """U(+-sqrt(6 / fan_in))."""
    _variance_scaling(w, 2.0, "fan_in", "uniform")


def he_normal(w: torch.Tensor) -> None:
    """Truncated normal with variance 2 / fan_in."""
    _variance_scaling(w, 2.0, "fan_in", "normal")


def glorot_uniform(w: torch.Tensor) -> None:
    """U(+-sqrt(6 / (fan_in + fan_out))), the Keras default."""
    _variance_scaling(w, 1.0, "fan_avg", "uniform")


def glorot_normal(w: torch.Tensor) -> None:
    """Truncated normal with variance 2 / (fan_in + fan_out)."""
    _variance_scaling(w, 1.0, "fan_avg", "normal")


def lecun_uniform(w: torch.Tensor) -> None:
    """U(+-sqrt(3 / fan_in))."""
    _variance_scaling(w, 1.0, "fan_in", "uniform")


def lecun_normal(w: torch.Tensor) -> None:
    """Truncated normal with variance 1 / fan_in."""
    _variance_scaling(w, 1.0, "fan_in", "normal")


def orthogonal(w: torch.Tensor, gain: float = 1.0) -> None:
    """Keras Orthogonal: a (semi-)orthogonal matrix times ``gain``."""
    nn.init.orthogonal_(w, gain=gain)


def zeros(w: torch.Tensor) -> None:
    """All zeros."""
    nn.init.zeros_(w)


def ones(w: torch.Tensor) -> None:
    """All ones."""
    nn.init.ones_(w)


# Keras names (and the xavier aliases) -> initializer(weight, **params), filling in place.
INITIALIZERS: dict[str, Callable[..., None]] = {
    "random_uniform": random_uniform,
    "random_normal": random_normal,
    "truncated_normal": truncated_normal,
    "he_uniform": he_uniform,
    "he_normal": he_normal,
    "glorot_uniform": glorot_uniform,
    "xavier_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "xavier_normal": glorot_normal,
    "lecun_uniform": lecun_uniform,
    "lecun_normal": lecun_normal,
    "orthogonal": orthogonal,
    "zeros": zeros,
    "ones": ones,
}


def initializer_params(name: str) -> list[str]:
    """Keyword parameters an initializer accepts, e.g. ``['minval', 'maxval']``.

    Example:
        >>> initializer_params("random_uniform")
        ['minval', 'maxval']
    """
    return list(inspect.signature(INITIALIZERS[name]).parameters)[1:]


def split_spec(spec: InitSpec) -> tuple[str, dict[str, Any]]:
    """``"he_uniform"`` or ``{name: random_uniform, minval: 0}`` -> (name, params).

    Example:
        >>> split_spec({"name": "random_uniform", "minval": 0.0, "maxval": 1.0})
        ('random_uniform', {'minval': 0.0, 'maxval': 1.0})
    """
    if isinstance(spec, str):
        return spec, {}
    params = dict(spec)
    return params.pop("name"), params


@torch.no_grad()
def init_linear(layer: nn.Linear, spec: InitSpec) -> None:
    """Fill ``layer.weight`` per ``spec`` (drawing from torch's global RNG); bias to zero.

    Example:
        >>> layer = nn.Linear(2, 5)
        >>> init_linear(layer, {"name": "random_uniform", "minval": 0.0, "maxval": 1.0})
        >>> bool(layer.weight.min() >= 0) and layer.bias.abs().sum().item() == 0.0
        True
    """
    name, params = split_spec(spec)
    INITIALIZERS[name](layer.weight, **params)
    nn.init.zeros_(layer.bias)


def _broadcast(value: Any, depth: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * depth


def build_mlp(
    in_features: int,
    widths: Sequence[int],
    activations: Sequence[str],
    initializers: Sequence[InitSpec],
    out_features: int = 1,
    out_activation: str = "sigmoid",
    out_initializer: InitSpec = "glorot_uniform",
) -> nn.Sequential:
    """Dense stack with Keras names; one entry per hidden layer in each sequence.

    Example:
        >>> m = build_mlp(2, [5], ["tanh"], ["he_uniform"])
        >>> list(dict(m.named_children()))
        ['dense_1', 'tanh_1', 'dense_2', 'sigmoid_2']
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    fan_in = in_features
    units = [*widths, out_features]
    acts = [*activations, out_activation]
    inits = [*initializers, out_initializer]
    for i, (width, act, init) in enumerate(zip(units, acts, inits), start=1):
        linear = nn.Linear(fan_in, width)
        init_linear(linear, init)
        layers[f"dense_{i}"] = linear
        layers[f"{act}_{i}"] = ACTIVATIONS[act]()
        fan_in = width
    return nn.Sequential(layers)


def build_model(cfg: Any, in_features: int = 2) -> nn.Sequential:
    """Build the model a (validated) ``ModelConfig`` describes.

    Seed first (``torch.manual_seed``): the weights come from torch's global RNG.

    Example:
        >>> from gradflow.experiments.config import ModelConfig
        >>> _ = torch.manual_seed(0)
        >>> m = build_model(ModelConfig(depth=2, width=5, activation="relu"))
        >>> [n for n, _ in m.named_children()]
        ['dense_1', 'relu_1', 'dense_2', 'relu_2', 'dense_3', 'sigmoid_3']
    """
    if getattr(cfg, "type", "mlp") != "mlp":
        return build_recurrent(cfg, in_features)
    depth = cfg.depth
    out = cfg.output
    return build_mlp(
        in_features,
        _broadcast(cfg.width, depth),
        _broadcast(cfg.activation, depth),
        _broadcast(cfg.initializer, depth),
        out.units,
        out.activation,
        out.initializer,
    )


# -- recurrent models (issue 22) ----------------------------------------------------------------

RECURRENT = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}   # model.type -> torch module


class LastStep(nn.Module):
    """Takes an ``nn.RNN``/``nn.LSTM``/``nn.GRU`` output tuple (batch first) and returns the last
    time step's output: (N, T, H) -> (N, H)."""

    def forward(self, output: tuple) -> torch.Tensor:
        return output[0][:, -1]


def build_recurrent(cfg: Any, in_features: int = 1) -> nn.Sequential:
    """A recurrent classifier: ``<type>_1`` (``model.depth`` stacked layers of ``model.width``,
    batch first, PyTorch's default init U(+-1/sqrt(width)), with ``model.chrono`` > 0 the
    gate biases of ``chrono_bias``), ``last_1`` (the last step's output),
    ``dense_2`` (one unit, ``model.output.initializer``), ``sigmoid_2``. ``model.type=rnn`` takes
    ``model.activation`` tanh or relu.

    Example:
        >>> from gradflow.experiments.config import ModelConfig
        >>> m = build_recurrent(ModelConfig(type="lstm", depth=1, width=8))
        >>> [n for n, _ in m.named_children()], m(torch.zeros(2, 5, 1)).shape
        (['lstm_1', 'last_1', 'dense_2', 'sigmoid_2'], torch.Size([2, 1]))
    """
    kind = RECURRENT[cfg.type]
    extra = {"nonlinearity": cfg.activation} if cfg.type == "rnn" else {}
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    recurrent = kind(in_features, cfg.width, num_layers=cfg.depth, batch_first=True, **extra)
    if getattr(cfg, "chrono", 0.0):
        chrono_bias(recurrent, cfg.chrono)
    layers[f"{cfg.type}_1"] = recurrent
    layers["last_1"] = LastStep()
    head = nn.Linear(cfg.width, cfg.output.units)
    init_linear(head, cfg.output.initializer)
    layers["dense_2"] = head
    layers["sigmoid_2"] = nn.Sigmoid()
    return nn.Sequential(layers)


@torch.no_grad()
def chrono_bias(module: nn.RNNBase, value: float) -> None:
    """Chrono initialisation with a constant (Tallec & Ollivier 2018, "Can recurrent neural networks
    warp time?"): the gate that keeps the state gets bias +``value``, in every layer and
    direction. LSTM: forget gate +value and input gate -value (rows H:2H and 0:H of ``bias_ih``,
    order input|forget|cell|output), as chrono pairs b_i = -b_f; GRU: update gate +value (rows
    H:2H, order reset|update|new; h_t = (1 - z) n + z h_{t-1}, so z near 1 keeps h). The state
    then decays over about exp(value) steps at first (sigmoid(b) = 1 - 1/T for T = 1 + exp(b)), so
    the gradient reaches that far back. Tallec & Ollivier draw b = log(U(1, T_max - 1)); 5 is
    T_max ~ 150.

    Example:
        >>> lstm = nn.LSTM(1, 2); b = lstm.bias_ih_l0.clone(); chrono_bias(lstm, 3.0)
        >>> (lstm.bias_ih_l0 - b).tolist()
        [-3.0, -3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    """
    if module.mode not in ("LSTM", "GRU") or not module.bias:
        raise ValueError(f"chrono_bias: needs an nn.LSTM or nn.GRU with biases, got {module.mode} (bias={module.bias})")
    hidden = module.hidden_size
    for name, p in module.named_parameters():
        if name.startswith("bias_ih"):
            p[hidden:2 * hidden] += value
            if module.mode == "LSTM":
                p[:hidden] -= value
