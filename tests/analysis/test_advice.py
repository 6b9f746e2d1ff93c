"""Advice: plain words per verdict, and by architecture family."""

import pytest

from gradflow.analysis.advice import architecture_family, recommend


@pytest.mark.parametrize("verdicts, words", [
    (["healthy"], "Nothing to fix"),
    (["vanishing", "saturated"], "He initialization"),
    (["exploding"], "learning rate"),
    (["dead-units"], "fewer layers"),
], ids=["healthy", "tanh", "exploding", "dead"])
def test_recommendation_in_plain_words(verdicts, words):
    assert words in recommend(verdicts)


@pytest.mark.parametrize("family, word", [("cnn", "batch normalization"), ("transformer", "warm"),
                                          ("recurrent", "clip"), ("mlp", "He initialization")],
                         ids=["cnn", "transformer", "recurrent", "mlp"])
def test_advice_by_family(family, word):
    assert word in recommend(["vanishing", "exploding"], family)


def test_family_from_layer_kinds_and_names():
    assert architecture_family({"lstm.l0": {"kind": "recurrent"}, "head": {"kind": "weight"}}) == "recurrent"
    assert architecture_family({"h.0.attn.c_attn": {"kind": "weight"}}) == "transformer"
    assert architecture_family({"conv1": {"kind": "weight"}, "fc": {"kind": "weight"}}) == "cnn"
    assert architecture_family({"dense_1": {"kind": "weight"}}) == "mlp"


def test_advice_fits_the_optimizer_and_the_failing_layer():
    assert "Adam" not in recommend(["stalled"], "mlp", "Adam")
    assert "Adam instead of SGD" in recommend(["stalled"], "mlp", "SGD")
    assert "fewer layers" not in recommend(["dead-units"], "cnn", "SGD")
    assert "Pascanu" in recommend(["exploding"], "transformer", "Adam", failing="recurrent")
