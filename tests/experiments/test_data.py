"""Data: exactly the tutorial's circles (sklearn's own output), the registry, and the cache."""

import numpy as np
import pytest
import torch
from sklearn.datasets import make_circles, make_moons
from sklearn.preprocessing import MinMaxScaler

from gradflow.experiments.config import DataConfig
from gradflow.experiments.data import DATASETS, cache_dir, load_dataset


def sklearn_reference(make, **kwargs):
    x, y = make(n_samples=1000, noise=0.1, random_state=1, **kwargs)
    x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x)
    return x[:500], y[:500], x[500:], y[500:]


@pytest.mark.parametrize(
    ("name", "make"),
    [("circles", make_circles), ("moons", make_moons)],
    ids=["circles", "moons"],
)
def test_matches_sklearn_exactly(name, make):
    ds = load_dataset(DataConfig(name=name))
    x_tr, y_tr, x_te, y_te = sklearn_reference(make)
    np.testing.assert_array_equal(ds.x_train.numpy(), x_tr.astype(np.float32))
    np.testing.assert_array_equal(ds.x_test.numpy(), x_te.astype(np.float32))
    np.testing.assert_array_equal(ds.y_train.numpy().ravel(), y_tr.astype(np.float32))
    np.testing.assert_array_equal(ds.y_test.numpy().ravel(), y_te.astype(np.float32))


def test_tutorial_circles_use_sklearn_default_factor():
    # The tutorial calls make_circles(n_samples=1000, noise=0.1, random_state=1): factor 0.8.
    ds = load_dataset(DataConfig())
    x_tr, *_ = sklearn_reference(make_circles)
    np.testing.assert_array_equal(ds.x_train.numpy(), x_tr.astype(np.float32))


def test_shapes_dtypes_and_scaling():
    ds = load_dataset(DataConfig())
    assert ds.x_train.shape == (500, 2) and ds.x_test.shape == (500, 2)
    assert ds.y_train.shape == (500, 1) and ds.y_test.shape == (500, 1)
    assert {t.dtype for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)} == {torch.float32}
    x = torch.cat([ds.x_train, ds.x_test])
    assert x.min().item() == pytest.approx(-1) and x.max().item() == pytest.approx(1)
    assert set(ds.y_train.unique().tolist()) == {0.0, 1.0}


def test_split_follows_n_train():
    ds = load_dataset(DataConfig(n_samples=300, n_train=200))
    assert (len(ds.x_train), len(ds.x_test)) == (200, 100)


def test_registry_accepts_a_new_dataset(monkeypatch):
    def blobs(n_samples, noise, random_state, factor):
        rng = np.random.default_rng(random_state)
        return rng.normal(size=(n_samples, 2)), (np.arange(n_samples) % 2)

    monkeypatch.setitem(DATASETS, "blobs", blobs)
    assert load_dataset(DataConfig(name="blobs")).x_train.shape == (500, 2)


def cached_files(name):
    return sorted((cache_dir() / "data").glob(f"{name}-*.npz"))


@pytest.mark.parametrize(("name", "make"), [("circles", make_circles), ("moons", make_moons)], ids=["circles", "moons"])
def test_cache_holds_exactly_what_sklearn_draws(monkeypatch, tmp_path, name, make):
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path))
    drawn = load_dataset(DataConfig(name=name, noise=0.2))            # a miss: sklearn draws, then stored
    assert len(cached_files(name)) == 1
    stored = load_dataset(DataConfig(name=name, noise=0.2))           # a hit
    x, y = make(n_samples=1000, noise=0.2, random_state=1)
    x = MinMaxScaler(feature_range=(-1, 1)).fit_transform(x)
    for ds in (drawn, stored):
        np.testing.assert_array_equal(torch.cat([ds.x_train, ds.x_test]).numpy(), x.astype(np.float32))
        np.testing.assert_array_equal(torch.cat([ds.y_train, ds.y_test]).numpy().ravel(), y.astype(np.float32))


def test_cache_keys_every_value_and_reads_a_broken_file_as_a_miss(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path))
    load_dataset(DataConfig())
    load_dataset(DataConfig(random_state=2))
    load_dataset(DataConfig(factor=0.5))
    assert len(cached_files("circles")) == 3
    for path in cached_files("circles"):
        path.write_bytes(b"not an npz")
    x_tr, *_ = sklearn_reference(make_circles)
    np.testing.assert_array_equal(load_dataset(DataConfig()).x_train.numpy(), x_tr.astype(np.float32))
    assert load_dataset(DataConfig()).x_train.shape == (500, 2)   # the broken file was replaced


def test_cache_off_and_plugged_in_datasets_write_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", "off")
    assert cache_dir() is None
    load_dataset(DataConfig())
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(DATASETS, "circles", lambda n, noise, seed, factor: make_circles(n, noise=noise, random_state=seed))
    load_dataset(DataConfig())           # not the built-in builder: drawn every time, never cached
    assert list(tmp_path.iterdir()) == []


def test_cache_does_not_hide_an_unwritable_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(blocker))
    x_tr, *_ = sklearn_reference(make_circles)
    np.testing.assert_array_equal(load_dataset(DataConfig()).x_train.numpy(), x_tr.astype(np.float32))

