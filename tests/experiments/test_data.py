"""Data: exactly the tutorial's circles (sklearn's own output), and the registry."""

import numpy as np
import pytest
import torch
from sklearn.datasets import make_circles, make_moons
from sklearn.preprocessing import MinMaxScaler

from gradflow.experiments.config import DataConfig
from gradflow.experiments.data import DATASETS, load_dataset


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
