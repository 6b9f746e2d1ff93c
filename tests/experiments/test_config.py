"""Config: defaults <- YAML <- key=value, strict validation naming the key."""

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gradflow.errors import ConfigError
from gradflow.experiments.config import Config, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
DEEP_RELU = ROOT / "configs" / "deep_relu.yaml"


def test_defaults_are_the_tutorial_settings():
    cfg = Config()
    assert (cfg.data.n_samples, cfg.data.noise, cfg.data.random_state, cfg.data.n_train) == (1000, 0.1, 1, 500)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.01, 0.9)
    assert (cfg.train.epochs, cfg.train.batch_size) == (500, 32)


def test_file_overrides_defaults_and_name_is_the_stem():
    cfg = load_config(DEEP_RELU)
    assert cfg.name == "deep_relu"
    assert (cfg.model.activation, cfg.model.initializer, cfg.model.output.initializer) == ("relu", "he_uniform", "glorot_uniform")


def test_overrides_beat_the_file():
    cfg = load_config(DEEP_RELU, ["model.depth=20", "train.epochs=50", "model.output.initializer=zeros", "name=x"])
    assert (cfg.model.depth, cfg.train.epochs, cfg.model.output.initializer, cfg.name) == (20, 50, "zeros", "x")


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("model.width=[5,10,5,5,5]", "width", [5, 10, 5, 5, 5]),
        ("model.initializer={name: random_uniform, minval: 0, maxval: 1}", "initializer",
         {"name": "random_uniform", "minval": 0, "maxval": 1}),
        ("model.activation=[relu,tanh,relu,tanh,elu]", "activation", ["relu", "tanh", "relu", "tanh", "elu"]),
    ],
    ids=["width-list", "init-mapping", "activation-list"],
)
def test_yaml_values_in_overrides(override, key, expected):
    assert getattr(load_config(DEEP_RELU, [override]).model, key) == expected


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("1", 1), ("10", 10)],
                         ids=["true", "false", "one", "ten"])
def test_monitor_histograms_take_a_bool_or_windows_per_histogram(text, value):
    got = load_config(None, [f"monitor.histograms={text}"]).monitor.histograms
    assert got == value and type(got) is type(value)
    assert load_config(None).monitor.histograms == 25          # gradflow train: 20 histograms over 500 epochs


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("1", 1.0), ("0.5", 0.5)], ids=["sci", "int", "float"])
def test_floats_accept_ints_and_scientific_notation(text, value):
    lr = load_config(None, [f"optimizer.lr={text}"]).optimizer.lr
    assert lr == value and isinstance(lr, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.depht=3"], "model.depht: unknown key (did you mean model.depth?); accepted: depth"),
        (["model.output.colour=red"], "model.output.colour: unknown key"),
        (["monitor.flow_images=-1"], "monitor.flow_images: must be >= 0"),
        (["model.depth=abc"], "model.depth: expected int"),
        (["model.depth=2.5"], "model.depth: expected int"),
        (["model.depth=true"], "model.depth: expected int, got True (bool)"),
        (["optimizer.nesterov=1"], "optimizer.nesterov: expected bool"),
        (["optimizer.lr=true"], "optimizer.lr: expected float"),
        (["model.activation=foo"], "model.activation: unknown activation 'foo'; accepted: "),
        (["model.activation=[relu,relu,relu,relu,foo]"], "model.activation[4]: unknown activation 'foo'"),
        (["model.initializer=foo"], "model.initializer: unknown initializer 'foo'; accepted: "),
        (["model.initializer={name: random_uniform, stddev: 1}"],
         "model.initializer.stddev: unknown parameter of random_uniform; accepted: minval, maxval"),
        (["model.initializer={minval: 1}"], "model.initializer: an initializer mapping needs name"),
        (["model.output.activation=tanh"], "model.output.activation: unknown output activation 'tanh'; accepted: sigmoid"),
        (["optimizer.name=rmsprop"], "optimizer.name: unknown optimizer 'rmsprop'; accepted: adam, sgd"),
        (["data.name=mnist"], "data.name: unknown dataset 'mnist'; accepted: circles, first_token, moons"),
        (["model.depth=0"], "model.depth: must be > 0, got 0"),
        (["model.width=-5"], "model.width: must be > 0, got -5"),
        (["model.width=[5,5,0,5,5]"], "model.width[2]: must be > 0, got 0"),
        (["train.batch_size=0"], "train.batch_size: must be > 0"),
        (["train.epochs=-1"], "train.epochs: must be > 0"),
        (["optimizer.lr=0"], "optimizer.lr: must be > 0"),
        (["data.n_train=1000"], "data.n_train: must be less than data.n_samples"),
        (["model.width=[5,5]"], "model.width: per-layer list has 2 entries; model.depth is 5"),
        (["model.depth.x=1"], "model.depth: has no sub-keys"),
        (["model=3"], "model: expected a mapping"),
        (["train.on_nonfinite=ignore"], "train.on_nonfinite: unknown value 'ignore'; accepted: continue, stop"),
        (["train.epochs=[1"], "train.epochs: YAML syntax error"),
        (["depth"], "'depth': overrides must look like key=value"),
        (["monitor.histograms=0"], "monitor.histograms: must be true (every window), false (none) or a number of "
                                   "windows per histogram >= 1, got 0"),
        (["monitor.histograms=-2"], "monitor.histograms: must be true"),
        (["monitor.histograms=often"], "monitor.histograms: expected bool or int, got 'often' (str)"),
        (["monitor.histograms=2.5"], "monitor.histograms: expected bool or int, got 2.5 (float)"),
        (["monitor.histogram_every=0"], "monitor.histogram_every: must be >= 1 (1 = every step), got 0"),
        (["monitor.histogram_every=2.5"], "monitor.histogram_every: expected int, got 2.5 (float)"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_bad_input_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(DEEP_RELU, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  depth: 3\n   width: 4\n", "YAML syntax error at line 3"),
        ("- 1\n- 2\n", "expected a mapping of sections"),
        ("trian:\n  epochs: 3\n", "trian: unknown key (did you mean train?); accepted: name, data, model, optimizer, train, monitor"),
        ("train:\n  epochs: '3'\n", "train.epochs: expected int, got '3' (str)"),
    ],
    ids=["yaml-syntax", "not-a-mapping", "unknown-section", "quoted-int"],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert message in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found;") as info:
        load_config(ROOT / "configs" / "nope.yaml")
    assert "current directory" not in str(info.value)      # an absolute path needs no word on where


def test_a_relative_path_not_found_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """Run outside the checkout, ``configs/deep_relu.yaml`` is not found: the message says the
    directory it was read from and where the examples are, one line."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("configs/deep_relu.yaml")
    message = str(info.value)
    assert message.startswith("configs/deep_relu.yaml: config file not found (a relative path is read from the "
                              f"current directory, {tmp_path})")
    assert "configs/ folder of gradflow's repository" in message and "\n" not in message


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    assert load_config(ROOT / "configs" / f"{name}.yaml").name == name


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 30), epochs=st.integers(1, 10_000), lr=st.floats(1e-6, 10.0), nesterov=st.booleans())
def test_resolved_config_round_trips_through_yaml(tmp_path_factory, depth, epochs, lr, nesterov):
    cfg = load_config(DEEP_RELU, [f"model.depth={depth}", f"train.epochs={epochs}", f"optimizer.lr={lr!r}",
                                  f"optimizer.nesterov={nesterov}"])
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert load_config(path) == cfg
