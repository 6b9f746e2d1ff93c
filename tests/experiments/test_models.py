"""Models: Keras initializer formulas, layer names and shapes, activations."""

import math

import pytest
import torch
from torch import nn

from gradflow.experiments.config import ModelConfig, OutputConfig
from gradflow.experiments.models import ACTIVATIONS, INITIALIZERS, build_model, init_linear

SHAPES = [(5, 2), (5, 5), (3, 8), (30, 10)]  # (out, in) = (fan_out, fan_in)
SHAPE_IDS = [f"fan_in{i}-fan_out{o}" for o, i in SHAPES]
MIN_SAMPLES = 60_000  # with a fixed seed; 3% is > 5 standard errors here


def draw(name: str, shape: tuple[int, int], **params) -> torch.Tensor:
    """Many draws of one weight shape (fans fixed by the shape), flattened."""
    torch.manual_seed(0)
    w = torch.empty(shape)
    out = []
    for _ in range(math.ceil(MIN_SAMPLES / w.numel())):
        INITIALIZERS[name](w, **params)
        out.append(w.flatten().clone())
    return torch.cat(out).double()


def uniform_limit(name: str, fan_in: int, fan_out: int) -> float:
    return {
        "he_uniform": math.sqrt(6 / fan_in),
        "glorot_uniform": math.sqrt(6 / (fan_in + fan_out)),
        "xavier_uniform": math.sqrt(6 / (fan_in + fan_out)),
        "lecun_uniform": math.sqrt(3 / fan_in),
    }[name]


def normal_variance(name: str, fan_in: int, fan_out: int) -> float:
    return {
        "he_normal": 2 / fan_in,
        "glorot_normal": 2 / (fan_in + fan_out),
        "xavier_normal": 2 / (fan_in + fan_out),
        "lecun_normal": 1 / fan_in,
    }[name]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", ["he_uniform", "glorot_uniform", "xavier_uniform", "lecun_uniform"])
def test_uniform_initializers_match_keras_limit_and_variance(name, shape):
    limit = uniform_limit(name, fan_in=shape[1], fan_out=shape[0])
    w = draw(name, shape)
    assert w.abs().max() <= limit
    assert w.abs().max() > 0.99 * limit  # the bound is reached, not a narrower one
    assert w.var().item() == pytest.approx(limit**2 / 3, rel=0.03)
    assert abs(w.mean().item()) < 0.01 * limit


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("name", ["he_normal", "glorot_normal", "xavier_normal", "lecun_normal"])
def test_truncated_normal_initializers_match_keras_variance(name, shape):
    # Keras VarianceScaling: std = sqrt(scale / n) / 0.8796..., cut at 2 std, so the
    # variance after truncation is the target scale / n itself.
    target = normal_variance(name, fan_in=shape[1], fan_out=shape[0])
    w = draw(name, shape)
    assert w.var().item() == pytest.approx(target, rel=0.03)
    assert w.abs().max() <= 2 * math.sqrt(target) / 0.87962566103423978 + 1e-6


@pytest.mark.parametrize(
    ("params", "low", "high"),
    [({}, -0.05, 0.05), ({"minval": 0.0, "maxval": 1.0}, 0.0, 1.0)],
    ids=["keras-default", "tutorial-0-1"],
)
def test_random_uniform_bounds(params, low, high):
    w = draw("random_uniform", (5, 5), **params)
    assert low <= w.min() < low + 0.01 * (high - low)
    assert high - 0.01 * (high - low) < w.max() <= high
    assert w.var().item() == pytest.approx((high - low) ** 2 / 12, rel=0.03)


def test_random_normal_is_plain_normal():
    w = draw("random_normal", (5, 5))
    assert w.std().item() == pytest.approx(0.05, rel=0.02)
    assert w.abs().max() > 3 * 0.05  # not truncated


def test_truncated_normal_cuts_at_two_std():
    w = draw("truncated_normal", (5, 5), stddev=1.0)
    assert w.abs().max() <= 2.0
    assert w.var().item() == pytest.approx(0.87962566103423978**2, rel=0.03)


@pytest.mark.parametrize("shape", [(5, 2), (2, 5), (5, 5)], ids=["tall", "wide", "square"])
def test_orthogonal(shape):
    w = torch.empty(shape)
    INITIALIZERS["orthogonal"](w)
    small = min(shape)
    gram = w @ w.T if shape[0] == small else w.T @ w
    torch.testing.assert_close(gram, torch.eye(small), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "value"), [("zeros", 0.0), ("ones", 1.0)], ids=["zeros", "ones"])
def test_constant_initializers(name, value):
    layer = nn.Linear(3, 4)
    init_linear(layer, name)
    assert torch.all(layer.weight == value)


@pytest.mark.parametrize("name", sorted(INITIALIZERS), ids=sorted(INITIALIZERS))
def test_biases_start_at_zero(name):
    layer = nn.Linear(3, 4)
    nn.init.ones_(layer.bias)
    init_linear(layer, name)
    assert torch.all(layer.bias == 0)


def tutorial_model(depth: int, activation: str) -> ModelConfig:
    init = {"name": "random_uniform", "minval": 0.0, "maxval": 1.0}
    return ModelConfig(depth=depth, width=5, activation=activation, initializer=init, output=OutputConfig(initializer=init))


@pytest.mark.parametrize(
    ("cfg", "names"),
    [
        (tutorial_model(1, "tanh"), ["dense_1", "tanh_1", "dense_2", "sigmoid_2"]),
        (
            tutorial_model(5, "relu"),
            ["dense_1", "relu_1", "dense_2", "relu_2", "dense_3", "relu_3", "dense_4", "relu_4",
             "dense_5", "relu_5", "dense_6", "sigmoid_6"],
        ),
    ],
    ids=["shallow", "deep"],
)
def test_keras_layer_names(cfg, names):
    assert [n for n, _ in build_model(cfg).named_children()] == names


def test_shapes_and_per_layer_lists():
    cfg = ModelConfig(depth=3, width=[4, 8, 6], activation=["tanh", "relu", "elu"], initializer=["he_uniform", "zeros", "glorot_normal"])
    model = build_model(cfg, in_features=2)
    assert [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)] == [(4, 2), (8, 4), (6, 8), (1, 6)]
    assert [n for n, _ in model.named_children()][1::2] == ["tanh_1", "relu_2", "elu_3", "sigmoid_4"]
    assert torch.all(model.dense_2.weight == 0)


def test_same_seed_same_weights():
    def weights():
        torch.manual_seed(7)
        return [p.clone() for p in build_model(ModelConfig(activation="relu", initializer="he_uniform")).parameters()]

    for a, b in zip(weights(), weights()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("tanh", torch.tanh),
        ("relu", torch.relu),
        ("sigmoid", torch.sigmoid),
        ("linear", lambda x: x),
        ("leaky_relu", lambda x: torch.where(x > 0, x, 0.2 * x)),  # tf.nn.leaky_relu's alpha
        ("elu", lambda x: torch.where(x > 0, x, torch.expm1(x))),
        ("selu", lambda x: 1.0507009873554805 * torch.where(x > 0, x, 1.6732632423543772 * torch.expm1(x))),
        ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),  # exact, not tanh approx
        ("softplus", lambda x: torch.log1p(torch.exp(x))),
        ("swish", lambda x: x * torch.sigmoid(x)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_activations_match_their_formula(name, fn):
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS[name]()(x), fn(x))
