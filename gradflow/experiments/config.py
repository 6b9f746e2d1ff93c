"""Typed config: defaults here, a YAML file overrides them, ``key=value`` overrides the file.

Every field has a typed default and a comment. Validation is strict and happens before
anything is written: unknown keys, wrong types (bool is not int, int is accepted as float),
non-positive sizes and unknown registry names raise ``ConfigError`` naming the dotted key.

Example:
    >>> cfg = load_config("configs/deep_relu.yaml", ["model.depth=15", "train.epochs=50"])
    >>> cfg.model.depth, cfg.train.epochs, cfg.name
    (15, 50, 'deep_relu')
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from gradflow.errors import ConfigError
from gradflow.experiments.data import DATASETS
from gradflow.experiments.models import ACTIVATIONS, INITIALIZERS, RECURRENT, initializer_params
from gradflow.experiments.optimizers import OPTIMIZERS
from gradflow.experiments.sequences import SEQUENCE_TASKS

_UNIONS = (Union, types.UnionType)  # Union[int, str] and int | str
InitSpec = str | dict  # "he_uniform" or {name: random_uniform, minval: 0.0, maxval: 1.0}

# Upper bounds on sizes: far above any study gradflow runs, low enough that a slip such as
# model.width=50000000 is a one-line error at once rather than an out-of-memory crash mid-run.
MAX_N_SAMPLES = 10_000_000
MAX_DEPTH = 1_000
MAX_WIDTH = 100_000
MAX_PARAMETERS = 100_000_000  # of the whole MLP (two input features)
MAX_EPOCHS = 1_000_000
MAX_BATCH_SIZE = 10_000_000
MAX_INIT_PARAM = 1e6  # |minval|, |maxval|, |mean|, stddev, |gain| of an initializer
MAX_NAME_LENGTH = 100  # the run directory's name adds a time stamp and the seed
MAX_SEQUENCE_LENGTH = 100_000  # time steps of a sequence task
MAX_RANDOM_STATE = 2**32  # sklearn's random_state must lie in [0, 2**32)


@dataclass
class DataConfig:
    name: str = "circles"  # dataset registry name: circles | moons | first_token (a sequence task)
    n_samples: int = 1000  # points drawn in total (train + test)
    noise: float = 0.1  # std of the Gaussian noise sklearn adds (first_token: the std of steps 1..T-1)
    random_state: int = 1  # sklearn's seed: fixes the data, independent of train.seed
    n_train: int = 500  # first n_train rows train, the rest test
    factor: float = 0.8  # circles only: inner/outer radius (sklearn's default, as the tutorial)
    sequence_length: int = 0  # sequence tasks only (first_token): time steps T per sequence; 0 for the others


@dataclass
class OutputConfig:
    units: int = 1  # one unit: the loss is binary cross-entropy
    activation: str = "sigmoid"  # only sigmoid: the loss is computed from its logits
    initializer: InitSpec = "glorot_uniform"  # Keras' default for Dense


@dataclass
class ModelConfig:
    depth: int = 5  # number of hidden Dense layers (recurrent: stacked recurrent layers)
    width: int | list[int] = 5  # units per hidden layer, or one per layer
    activation: str | list[str] = "tanh"  # hidden activation, or one per layer
    initializer: InitSpec | list[InitSpec] = "glorot_uniform"  # spec, or one per layer
    output: OutputConfig = field(default_factory=OutputConfig)  # the output layer
    type: str = "mlp"  # mlp | rnn | lstm | gru (recurrent: depth stacked layers of width units, a sequence task)
    # lstm/gru: chrono init with this constant (models.chrono_bias: forget/update gate bias +b, LSTM input
    # gate -b); 0: PyTorch's init
    chrono: float = 0.0


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.01  # learning rate (Keras SGD's default)
    momentum: float = 0.9  # SGD momentum, v = momentum * v - lr * g
    nesterov: bool = False  # SGD Nesterov momentum
    beta_1: float = 0.9  # Adam, Keras default
    beta_2: float = 0.999  # Adam, Keras default
    epsilon: float = 1e-7  # Adam, Keras default (torch's is 1e-8)


@dataclass
class TrainConfig:
    epochs: int = 500  # passes over the training set (the tutorial's 500)
    batch_size: int = 32  # Keras fit's default; the last batch may be partial
    seed: int = 0  # fixes the initial weights and the shuffling
    on_nonfinite: str = "stop"  # stop | continue when an epoch's loss is NaN/inf
    checkpoint_every: int = 50  # epochs between checkpoints (0: only at the end and on Ctrl-C/SIGTERM)


@dataclass
class MonitorConfig:
    enabled: bool = True  # attach the gradient monitor during training
    window_steps: int = 0  # 0: one window per epoch, else flush every N steps
    # TensorBoard histograms: N = one per N windows (epochs), summing their counts (25 divides
    # train.checkpoint_every); true: every window; false: none
    histograms: bool | int = 25
    weights: bool = True  # log weight statistics too
    activations: bool = True  # log activation statistics too
    activations_every: int = 1  # tap activations at every Nth optimizer step (the tutorial's nets are tiny: every step)
    histogram_every: int = 1  # gradient histograms of every Nth step of a window (tiny nets: every step)
    flow_images: int = 50  # TensorBoard Images: the gradient-flow picture every N windows and at the end (0: none)
    through_time_every: int = 5  # recurrent models: profile the gradient through time at every Nth optimizer step


@dataclass
class Config:
    name: str = "gradflow"  # run name; defaults to the config file's stem
    data: DataConfig = field(default_factory=DataConfig)  # the dataset
    model: ModelConfig = field(default_factory=ModelConfig)  # the network
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # the update rule
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # gradient monitoring


# --- YAML ------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``) and refuses a
    key given twice in one mapping (PyYAML keeps the last silently: a second ``train:`` section
    would drop the first); merge keys (``<<``) may still repeat a key, as YAML defines them."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key_node.value}' (first at line {seen[key].line + 1}); "
                        "write each key once", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{where}: YAML nested too deeply; a config is a few levels of sections and keys") from None
    except ValueError as exc:  # e.g. an int of more than 4300 digits (Python's conversion limit)
        raise ConfigError(f"{where}: unreadable value: {str(exc)[:120]}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at}: {problem}") from None


def read_yaml(path: str | Path, allow_empty: bool = True) -> dict[str, Any]:
    """Read a config file into a dict; missing files and bad YAML raise ``ConfigError``, and so
    does an empty (or comments-only) file unless ``allow_empty``.

    Example:
        >>> read_yaml("configs/deep_relu.yaml")["model"]["activation"]
        'relu'
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = "" if path.is_absolute() else f" (a relative path is read from the current directory, {Path.cwd()})"
        raise ConfigError(f"{path}: config file not found{where}; pass a YAML file: the examples are in the "
                          "configs/ folder of gradflow's repository, such as configs/deep_relu.yaml") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({type(exc).__name__}); pass a readable YAML file") from None
    raw = _yaml_load(text, str(path))
    if raw is None and not allow_empty:
        # Most often a truncated or wrong file: silently training the defaults would hide it.
        raise ConfigError(f"{path}: config file is empty; write {{}} to train the defaults, or see configs/deep_relu.yaml")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...), got {type(raw).__name__}")
    return raw


# --- overrides -------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"model.width=[5,10]"`` -> (["model", "width"], [5, 10]); the value is read as YAML.

    Example:
        >>> parse_override("train.epochs=50")
        (['train', 'epochs'], 50)
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{item!r}: overrides must look like key=value, e.g. model.depth=20")
    return key.strip().split("."), _yaml_load(text, key.strip())


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``raw[path]`` in place after checking that every part of the path is a known key."""
    cls: Any = Config
    node = raw
    for i, part in enumerate(path):
        dotted = ".".join(path[: i + 1])
        hints = _field_types(cls)
        if part not in hints:
            raise _unknown_key(dotted, cls)
        if i == len(path) - 1:
            node[part] = value
            return
        cls = hints[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{dotted}: has no sub-keys (it takes {_type_name(cls)}); use {dotted}=<value>")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: expected a mapping, got {type(child).__name__}")
        node = child


# --- structural validation -------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is dict:
        return "mapping {name: ..., params}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return tp.__name__


def _unknown_key(dotted: str, cls: type) -> ConfigError:
    known = ", ".join(_field_types(cls))
    shown = dotted if dotted.isprintable() else repr(dotted)  # a key may hold a newline: keep one line
    nearest = suggest_key(dotted) if dotted.isprintable() else None
    hint = f" (did you mean {nearest}?)" if nearest else ""
    return ConfigError(f"{shown}: unknown key{hint}; accepted: {known}")


def config_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts (``train.epochs``, ``model.output.units``, ...).

    Example:
        >>> "optimizer.lr" in config_keys(), "train.epochs" in config_keys()
        (True, True)
    """
    keys = []
    for name, tp in _field_types(cls or Config).items():
        keys.append(f"{prefix}{name}")
        if dataclasses.is_dataclass(tp):
            keys.extend(config_keys(tp, f"{prefix}{name}."))
    return keys


def suggest_key(dotted: str) -> str | None:
    """The accepted key nearest to the unknown ``dotted`` (None if nothing is near): a key of
    the same section first, then any section (``epochs`` -> ``train.epochs``). Near means a
    ``difflib`` ratio of at least 0.6 on the last part, or the last part being the initials of
    an accepted name or the reverse (``learning_rate`` -> ``lr``).

    Example:
        >>> suggest_key("optimizer.learning_rate"), suggest_key("epochs"), suggest_key("model.dept")
        ('optimizer.lr', 'train.epochs', 'model.depth')
    """
    import difflib

    section, _, leaf = dotted.rpartition(".")
    keys = config_keys()
    for scope in ([k for k in keys if k.rpartition(".")[0] == section], keys):
        leaves = {k.rpartition(".")[2]: k for k in reversed(scope)}   # the shallowest key of a name wins
        initials = {k: v for k, v in leaves.items() if _initials(leaf) == k or _initials(k) == leaf}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        if leaf in leaves and leaves[leaf] != dotted:
            return leaves[leaf]
        if close or initials:
            return leaves[close[0]] if close else next(iter(initials.values()))
    return None


def _initials(name: str) -> str:
    return "".join(part[:1] for part in name.split("_")) if "_" in name else ""


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` for a message, cut to ``limit`` characters (a value may be a megabyte of junk)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deep nesting; an int too long to print
        text = f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(key: Any) -> str:
    """A key as a message shows it: plain if it is a printable string, else its (short) repr."""
    return key if isinstance(key, str) and key.isprintable() else _show(key)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _finite(value: float) -> bool:
    """True for a number that is a finite float (an int such as 10**400 overflows float)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _convert(value: Any, tp: Any) -> Any:
    """Ints become floats where floats are expected; everything else is kept as read."""
    if tp is float:
        return float(value)
    return value


def build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``raw``, checking keys and types (not values).

    Example:
        >>> build(TrainConfig, {"epochs": 3}).epochs
        3
    """
    hints = _field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{_label(key)}"
        if key not in hints:
            raise _unknown_key(dotted, cls)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping, got {_show(value)}")
            kwargs[key] = build(tp, value, f"{dotted}.")
        elif not _matches(value, tp):
            raise ConfigError(f"{dotted}: expected {_type_name(tp)}, got {_show(value)} ({type(value).__name__})")
        elif tp is float and not _finite(value):
            raise ConfigError(f"{dotted}: expected a finite float, got {_show(value)}")
        else:
            kwargs[key] = _convert(value, tp)
    return cls(**kwargs)


# --- value validation ------------------------------------------------------------------------

def _choice(key: str, value: str, accepted: Iterable[str], what: str) -> None:
    if value not in accepted:
        raise ConfigError(f"{key}: unknown {what} {_show(value)}; accepted: {', '.join(sorted(accepted))}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")


def _at_most(key: str, value: float, limit: float) -> None:
    if value > limit:
        raise ConfigError(f"{key}: must be at most {limit:,}, got {_show(value)}")


def _in_unit(key: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{key}: must be in [0, 1), got {value!r}")


def _per_layer(key: str, value: Any, depth: int) -> list[Any]:
    if not isinstance(value, list):
        return [value]
    if len(value) != depth:
        raise ConfigError(f"{key}: per-layer list has {len(value)} entries; model.depth is {depth}, give {depth} or a single value")
    return value


def _check_init(key: str, spec: Any) -> None:
    if isinstance(spec, str):
        _choice(key, spec, INITIALIZERS, "initializer")
        return
    if "name" not in spec or not isinstance(spec["name"], str):
        raise ConfigError(f"{key}: an initializer mapping needs name: <initializer>, "
                          "e.g. {name: random_uniform, minval: 0.0, maxval: 1.0}")
    _choice(f"{key}.name", spec["name"], INITIALIZERS, "initializer")
    accepted = initializer_params(spec["name"])
    for param, value in spec.items():
        if param == "name":
            continue
        param = _label(param)
        if param not in accepted:
            raise ConfigError(f"{key}.{param}: unknown parameter of {spec['name']}; accepted: {', '.join(accepted) or 'none'}")
        if not _matches(value, float):
            raise ConfigError(f"{key}.{param}: expected float, got {_show(value)} ({type(value).__name__})")
        if not (_finite(value) and abs(value) <= MAX_INIT_PARAM):
            raise ConfigError(f"{key}.{param}: must be a finite float within ±{MAX_INIT_PARAM:g}, got {_show(value)}")
    _check_init_ranges(key, spec)


def _check_init_ranges(key: str, spec: dict) -> None:
    # torch's samplers raise on these only when the model is built, after the run directory exists.
    if spec.get("minval", -0.05) > spec.get("maxval", 0.05):
        raise ConfigError(f"{key}: minval must be <= maxval, got {spec.get('minval', -0.05)} > "
                          f"{spec.get('maxval', 0.05)} (defaults -0.05, 0.05)")
    if "stddev" in spec and spec["stddev"] <= 0:
        raise ConfigError(f"{key}.stddev: must be > 0, got {spec['stddev']!r}")


def _check_data(c: DataConfig) -> None:
    _choice("data.name", c.name, {**DATASETS, **SEQUENCE_TASKS}, "dataset")
    if c.name in SEQUENCE_TASKS:
        _positive("data.sequence_length", c.sequence_length)
        _at_most("data.sequence_length", c.sequence_length, MAX_SEQUENCE_LENGTH)
    elif c.sequence_length:
        raise ConfigError(f"data.sequence_length: only for sequence tasks ({', '.join(SEQUENCE_TASKS)}); "
                          f"{c.name} is not one: leave it 0")
    _positive("data.n_samples", c.n_samples)
    _at_most("data.n_samples", c.n_samples, MAX_N_SAMPLES)
    _positive("data.n_train", c.n_train)
    if c.n_train >= c.n_samples:
        raise ConfigError(f"data.n_train: must be less than data.n_samples ({c.n_samples}) to leave a test set, got {c.n_train}")
    if c.noise < 0:
        raise ConfigError(f"data.noise: must be >= 0, got {c.noise!r}")
    if not 0 < c.factor < 1:
        raise ConfigError(f"data.factor: must be in (0, 1), got {c.factor!r}")
    if not 0 <= c.random_state < MAX_RANDOM_STATE:
        raise ConfigError(f"data.random_state: must be an int in [0, 2**32) (sklearn's range), got {c.random_state}")


def _check_recurrent(c: ModelConfig) -> None:
    """A recurrent model: one width, PyTorch's own init, tanh (or relu for a plain RNN)."""
    if isinstance(c.width, list) or isinstance(c.activation, list) or isinstance(c.initializer, list):
        raise ConfigError(f"model.type={c.type}: model.width, model.activation and model.initializer take one value, "
                          "not a per-layer list")
    _positive("model.width", c.width)
    _at_most("model.width", c.width, MAX_WIDTH)
    accepted = ["tanh", "relu"] if c.type == "rnn" else ["tanh"]
    _choice("model.activation", c.activation, accepted, f"activation for model.type={c.type}")
    if c.chrono and c.type not in ("lstm", "gru"):
        raise ConfigError(f"model.chrono: only for model.type lstm or gru (their forget/update gate biases), got type {c.type}")
    if abs(c.chrono) > MAX_INIT_PARAM:
        raise ConfigError(f"model.chrono: must be within ±{MAX_INIT_PARAM:g}, got {c.chrono!r}")
    if c.initializer != ModelConfig.initializer:
        raise ConfigError(f"model.initializer: recurrent models (model.type={c.type}) keep PyTorch's default init "
                          "U(+-1/sqrt(width)); remove model.initializer (model.output.initializer sets the head's)")


def _check_model(c: ModelConfig) -> None:
    _choice("model.type", c.type, ["mlp", *RECURRENT], "model type")
    _positive("model.depth", c.depth)
    _at_most("model.depth", c.depth, MAX_DEPTH)
    if c.type != "mlp":
        _check_recurrent(c)
    else:
        if c.chrono:
            raise ConfigError("model.chrono: only for model.type lstm or gru (their forget/update gate biases)")
        _check_dense(c)
    if c.output.units != 1:
        raise ConfigError(f"model.output.units: must be 1 (binary cross-entropy), got {c.output.units}")
    _choice("model.output.activation", c.output.activation, ["sigmoid"], "output activation")
    _check_init("model.output.initializer", c.output.initializer)


def _check_dense(c: ModelConfig) -> None:
    widths = _per_layer("model.width", c.width, c.depth)
    for i, w in enumerate(widths):
        _positive(f"model.width[{i}]" if isinstance(c.width, list) else "model.width", w)
        _at_most(f"model.width[{i}]" if isinstance(c.width, list) else "model.width", w, MAX_WIDTH)
    _check_parameter_count(widths if isinstance(c.width, list) else widths * c.depth)
    for i, a in enumerate(_per_layer("model.activation", c.activation, c.depth)):
        _choice(f"model.activation[{i}]" if isinstance(c.activation, list) else "model.activation", a, ACTIVATIONS, "activation")
    for i, s in enumerate(_per_layer("model.initializer", c.initializer, c.depth)):
        _check_init(f"model.initializer[{i}]" if isinstance(c.initializer, list) else "model.initializer", s)


def _check_parameter_count(widths: list[int]) -> None:
    units = [2, *widths, 1]  # two input features, one output unit
    count = sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(units, units[1:]))
    if count > MAX_PARAMETERS:
        raise ConfigError(f"model: {count:,} parameters is more than the limit of {MAX_PARAMETERS:,}; lower model.depth or model.width")


def _check_optimizer(c: OptimizerConfig) -> None:
    _choice("optimizer.name", c.name, OPTIMIZERS, "optimizer")
    _positive("optimizer.lr", c.lr)
    _in_unit("optimizer.momentum", c.momentum)
    if c.nesterov and c.momentum == 0:
        raise ConfigError("optimizer.nesterov: needs optimizer.momentum > 0")
    _in_unit("optimizer.beta_1", c.beta_1)
    _in_unit("optimizer.beta_2", c.beta_2)
    _positive("optimizer.epsilon", c.epsilon)


def _check_train(c: TrainConfig) -> None:
    _positive("train.epochs", c.epochs)
    _at_most("train.epochs", c.epochs, MAX_EPOCHS)
    _positive("train.batch_size", c.batch_size)
    _at_most("train.batch_size", c.batch_size, MAX_BATCH_SIZE)
    if not 0 <= c.seed < 2**63:
        raise ConfigError(f"train.seed: must be an int in [0, 2**63), got {c.seed}")
    _choice("train.on_nonfinite", c.on_nonfinite, ["stop", "continue"], "value")
    if c.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every: must be >= 0 (0 = only at the end), got {c.checkpoint_every}")


def validate(cfg: Config) -> Config:
    """Check values and registry names; return ``cfg`` unchanged or raise ``ConfigError``.

    Example:
        >>> validate(Config()).model.depth
        5
    """
    name = cfg.name
    if not name or "/" in name or "\\" in name or not name.isprintable() or len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"name: must be 1-{MAX_NAME_LENGTH} printable characters without path separators "
                          f"(it names the run directory), got {_show(name)}")
    _check_data(cfg.data)
    _check_model(cfg.model)
    if (cfg.model.type != "mlp") != (cfg.data.name in SEQUENCE_TASKS):
        raise ConfigError(f"model.type: {cfg.model.type} does not fit data.name {cfg.data.name}; recurrent models "
                          f"(rnn, lstm, gru) take a sequence task ({', '.join(SEQUENCE_TASKS)}), mlp the others")
    _check_optimizer(cfg.optimizer)
    _check_train(cfg.train)
    if cfg.monitor.histogram_every < 1:
        raise ConfigError(f"monitor.histogram_every: must be >= 1 (1 = every step), got {cfg.monitor.histogram_every}")
    if cfg.monitor.through_time_every < 1:
        raise ConfigError(f"monitor.through_time_every: must be >= 1 (1 = every step), got {cfg.monitor.through_time_every}")
    if cfg.monitor.window_steps < 0:
        raise ConfigError(f"monitor.window_steps: must be >= 0 (0 = once per epoch), got {cfg.monitor.window_steps}")
    if cfg.monitor.flow_images < 0:
        raise ConfigError(f"monitor.flow_images: must be >= 0 (0: no gradient-flow images), got {cfg.monitor.flow_images}")
    histograms = cfg.monitor.histograms
    if not isinstance(histograms, bool) and histograms < 1:
        raise ConfigError(f"monitor.histograms: must be true (every window), false (none) or a number of windows "
                          f"per histogram >= 1, got {histograms}")
    return cfg


# --- entry points ----------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, validated.

    ``name`` defaults to the file's stem.

    Example:
        >>> load_config(None, ["model.activation=relu", "model.width=[5,10,5,5,5]"]).model.width
        [5, 10, 5, 5, 5]
    """
    raw: dict[str, Any] = read_yaml(path, allow_empty=False) if path is not None else {}
    if path is not None:
        raw.setdefault("name", Path(path).stem)
    for item in overrides:
        apply_override(raw, *parse_override(item))
    return validate(build(Config, raw))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain dict of the resolved config, ready for ``yaml.safe_dump``; ``load_config`` reads it back.

    Example:
        >>> to_dict(Config())["train"]["batch_size"]
        32
    """
    return dataclasses.asdict(cfg)
