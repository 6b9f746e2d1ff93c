"""Advice: what to do about a verdict, in plain words, by architecture family.

``ADVICE`` is the advice per verdict for the tutorial's MLPs (tanh or sigmoid with U(0, 1)
weights: Xavier/Glorot init, Glorot & Bengio 2010; ReLU with He init, He et al. 2015; the
depth and seed facts from DESIGN.md). ``FAMILY_ADVICE`` replaces it where a CNN, transformer or
recurrent net needs other advice (sources beside it). ``architecture_family`` tells the family
from the model's modules when given, else from layer kinds and names.

Example:
    >>> recommend(["vanishing"], "transformer").split(".")[0]
    'Gradients shrink on their way to the first blocks'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradflow.analysis.rules import MIN_WINDOWS

ADVICE = {
    "healthy": "Nothing to fix: gradients of a useful size reach every layer and the weights move at a "
               "healthy rate.",
    "vanishing": "Gradients shrink on their way to the first layers, so those layers barely learn. With tanh "
                 "or sigmoid, use ReLU with He initialization (he_uniform), or keep tanh and use Xavier "
                 "(glorot_uniform) initialization; fewer layers, batch normalization or residual connections "
                 "also help.",
    "exploding": "Updates are far too large: lower the learning rate (try 10x smaller), clip the gradient norm "
                 "(torch.nn.utils.clip_grad_norm_), and check that the initial weights are not too large.",
    "saturated": "Units sit in the flat tails of tanh/sigmoid where the derivative is almost zero. Weights "
                 "drawn from U(0, 1) are all positive and too large for tanh: use Xavier (glorot_uniform) "
                 "initialization for tanh, or ReLU with He initialization; normalized inputs help too.",
    "dead-units": "Whole ReLU layers output zero for every input and pass no gradient back. Use fewer layers "
                  "(ReLU with He init learns at depth 5; at depth 20 and width 5 most seeds die), a smaller "
                  "learning rate, LeakyReLU, batch normalization or residual connections, or another seed.",
    "stalled": "The loss barely fell after the early part. A deep net can sit on a plateau before it learns "
               "(a deep ReLU seed at 30 epochs does, and learns by 60), so on a short run train longer first; "
               "if the loss still does not fall and nothing else is flagged, try another learning rate{switch}.",
    "oscillating": "The loss swings up and down instead of settling: the learning rate is near the edge of "
                   "stability. Lower it (try 3-10x smaller) or decay it, or use a larger batch{momentum}.",
    "output-mismatch": "The model's output does not fit the loss: NLLLoss wants log-probabilities and BCELoss "
                       "probabilities. End the model with LogSoftmax (or drop it and use CrossEntropyLoss on the "
                       "raw logits) / Sigmoid (or use BCEWithLogitsLoss); a ReLU output gives log(0).",
    "tiny-gradient": "The gradient is tiny against the weights in every layer alike, so the steps are too small to "
                     "learn: check the loss scale (a sum divided by a huge count, a loss multiplied by a small "
                     "factor), raise the learning rate, or use an adaptive optimizer (Adam) that rescales it.",
}

# How the advice names the optimizer actually used (``optimizer_name``): a switch to Adam is
# offered to SGD users only; momentum to those without it.
_SWITCH = {"SGD": ", or Adam instead of SGD", None: ", or Adam if you use plain SGD"}


ADVICE["insufficient"] = ("Not enough evidence to call this run healthy: train longer and log more windows "
                          f"(at least {MIN_WINDOWS}), then diagnose again.")

# Advice by architecture family, replacing the MLP advice for the verdicts where it differs.
# Sources: residual connections, He et al. 2016 ("Deep Residual Learning"); batch
# normalisation, Ioffe & Szegedy 2015; He (Kaiming) initialisation, He et al. 2015; pre-LayerNorm
# and learning-rate warm-up for transformers, Xiong et al. 2020 ("On Layer Normalization in the
# Transformer Architecture") and Vaswani et al. 2017; scaled init of residual projections,
# Radford et al. 2019 (GPT-2); gradient clipping for recurrent nets, Pascanu et al. 2013 ("On the
# difficulty of training recurrent neural networks"); forget-gate bias 1, Jozefowicz et al. 2015;
# LSTM/GRU over plain RNNs, Hochreiter & Schmidhuber 1997.
FAMILY_ADVICE = {
    ("cnn", "vanishing"): "Gradients shrink on their way to the first convolutions. Add batch normalization after "
                          "each convolution and residual (skip) connections (ResNet basic blocks), use ReLU with "
                          "He (kaiming_normal_, fan_out) initialization instead of sigmoid/tanh.",
    ("cnn", "exploding"): "Updates are far too large: lower the learning rate (10x), use a warm-up of a few hundred "
                          "steps, and clip the gradient norm (torch.nn.utils.clip_grad_norm_); with BatchNorm, "
                          "weight decay keeps the weight norms, and so the effective step, in check.",
    ("transformer", "vanishing"): "Gradients shrink on their way to the first blocks. Use pre-LayerNorm blocks "
                                  "(x + f(LN(x))), keep the residual stream free of other operations, scale the "
                                  "init of residual projections by 1/sqrt(2 * layers) (GPT-2), and warm up the "
                                  "learning rate.",
    ("transformer", "exploding"): "Updates are far too large: lower the learning rate, warm it up linearly over the "
                                  "first few hundred to thousand steps, clip the gradient norm at 1.0 "
                                  "(torch.nn.utils.clip_grad_norm_), and prefer pre-LayerNorm blocks.",
    ("recurrent", "vanishing"): "Gradients shrink through time and down the stack. Use fewer stacked layers (1-2) "
                                "or residual connections between them, initialize the forget-gate bias to 1 "
                                "(not negative), prefer LSTM/GRU over plain RNN cells, and clip the gradient norm "
                                "(torch.nn.utils.clip_grad_norm_) so that a larger learning rate stays safe.",
    ("recurrent", "stalled"): "The loss barely fell after the early part. A recurrent net that must carry information "
                              "over many steps can sit at chance until its gradient reaches far enough back: look at "
                              "the gradient through time ({time_plot}); train longer, try another learning rate, "
                              "clip the gradient norm, or use shorter sequences first.",
    ("recurrent", "exploding"): "Gradients blow up through time: clip the gradient norm "
                                "(torch.nn.utils.clip_grad_norm_, max_norm 0.25-5, as in Pascanu et al. 2013) and "
                                "lower the learning rate; if the norm before clipping stays far above the clip "
                                "value, the clipping hides the explosion: shrink the recurrent weights "
                                "(orthogonal init scaled to spectral radius 1), or use an LSTM/GRU.",
    ("cnn", "dead-units"): "Most units of a layer output zero for every input and pass no gradient back, "
                           "typically after a step too large: lower the learning rate (or warm it up), keep "
                           "batch normalization before each ReLU and He (kaiming_normal_) initialization, or "
                           "use LeakyReLU.",
    ("transformer", "dead-units"): "Most units of an MLP layer output zero for every input: lower the learning "
                                   "rate and warm it up, or use GELU instead of ReLU in the MLP blocks.",
    ("recurrent", "dead-units"): "Most units of a ReLU layer are dead: lower the learning rate and clip the "
                                 "gradient norm (torch.nn.utils.clip_grad_norm_).",
    ("cnn", "saturated"): "Units sit in the flat tails of sigmoid/tanh: use ReLU with He initialization and "
                          "batch normalization between the convolutions.",
    ("transformer", "saturated"): "Units sit in the flat tails of a bounded activation: use GELU in the MLP "
                                  "blocks, pre-LayerNorm, and a smaller initialization.",
    ("recurrent", "saturated"): "Units sit in the flat tails of tanh/sigmoid: use LSTM/GRU cells, orthogonal "
                                "recurrent init, and clip the gradient norm.",
    ("transformer", "stalled"): "The loss barely fell after the early part: warm the learning rate up, use "
                                "pre-LayerNorm blocks (post-LN without warm-up often stalls, Xiong et al. 2020), "
                                "and try another learning rate{switch}.",
}


# Where a run's windows came from: ``loop`` (the user's own loop: diagnose_monitor, or diagnose on
# windows the user recorded) or ``run`` (a ``gradflow train`` run directory). The advice names
# only what the user has there.
CONTEXTS = ("loop", "run")

# What the advice points at, by context: the gradient through time (``{time_plot}``) and chrono
# initialisation of an LSTM/GRU (``{chrono}``, Tallec & Ollivier 2018).
POINTERS = {
    "loop": {"time_plot": "the profiled windows' Window.time ([w.time for w in monitor.history if w.time]; a window "
                          "with no profiled step has none), its TensorBoard scalars time/<module>/l<k>/reach, or the figure "
                          "gradflow.analysis.time_plots.plot_through_time(monitor.history, 'through_time.png') draws",
             "chrono": "gradflow.experiments.models.chrono_bias(lstm, 5.0) sets it on an nn.LSTM/nn.GRU; "
                       "docs/through_time.md"},
    "run": {"time_plot": "through_time.png in the run directory", "chrono": "gradflow's model.chrono"},
}

# Said after the advice when non-finite values were counted but no window named their source,
# because the first-non-finite part was off (docs/nonfinite.md): how to turn it on, by context.
NONFINITE_HINT = {
    "loop": "To name the layer and step where the first NaN/inf came from, attach the monitor with "
            "GradientMonitor(model, writer, nonfinite=True) (docs/nonfinite.md).",
    "run": "To name the layer and step where the first NaN/inf came from, train that seed alone (gradflow train "
           "CONFIG train.seed=N, without --seeds): seeds trained batched do not look for it.",
}


def nonfinite_hint(checks: Mapping[str, Mapping[str, Any]], source: Any, context: str = "loop",
                   part: bool | None = None) -> str:
    """``NONFINITE_HINT[context]`` when ``exploding`` fired on non-finite values (``value`` of its
    non-finite mechanism, ``rules._nonfinite``) with no ``source`` found and the first-non-finite
    part not known to be on (``part``: True on, False off, None unknown); else ''. In a ``run``
    the part is on unless the seeds trained batched, so an unknown part says nothing there."""
    exploding = checks.get("exploding", {})
    counted = exploding.get("fired") and "non-finite" in exploding.get("why", "")
    if not counted or source is not None or part or (context == "run" and part is None):
        return ""
    return NONFINITE_HINT[context]


def optimizer_name(optimizer: Any) -> str | None:
    """The class name of an optimizer, an optimizer class or a name (``sgd`` -> ``SGD``,
    ``adamw`` -> ``AdamW``); None when not given.

    Example:
        >>> import torch
        >>> optimizer_name(torch.optim.SGD), optimizer_name("adam"), optimizer_name(None)
        ('SGD', 'Adam', None)
    """
    if optimizer is None:
        return None
    if isinstance(optimizer, str):
        return {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}.get(optimizer.lower(), optimizer)
    return optimizer.__name__ if isinstance(optimizer, type) else type(optimizer).__name__


def recommend(verdicts: Sequence[str], family: str = "mlp", optimizer: str | None = None,
              failing: str | None = None, context: str = "loop") -> str:
    """Plain-words advice for a set of verdicts, most specific first, for an architecture
    ``family`` (``mlp``, ``cnn``, ``transformer``, ``recurrent``; see FAMILY_ADVICE's sources)
    and the ``optimizer`` class actually used (``SGD``, ``Adam``, ...; None: unknown).
    ``failing``: ``recurrent`` when the failing layer is recurrent, whatever the family (an
    LSTM inside a transformer gets recurrent advice for its own failure). ``context``: ``loop``
    or ``run`` (``CONTEXTS``): what the advice points at (``POINTERS``).

    Example:
        >>> recommend(["healthy"]).startswith("Nothing to fix")
        True
        >>> "clip" in recommend(["exploding"], "recurrent")
        True
        >>> "Adam" in recommend(["stalled"], "mlp", "Adam")
        False
    """
    texts = []
    for verdict in verdicts:
        text = FAMILY_ADVICE.get((failing or family, verdict)) or FAMILY_ADVICE.get((family, verdict)) or ADVICE[verdict]
        texts.append(text.format(switch=_SWITCH.get(optimizer, "") if optimizer in _SWITCH or optimizer is None else "",
                                 momentum=", or less momentum" if optimizer == "SGD" else "", **POINTERS[context]))
    return " ".join(texts) or ADVICE["healthy"]


def architecture_family(layers: Mapping[str, Mapping[str, Any]], model: Any = None) -> str:
    """``recurrent``, ``transformer``, ``cnn`` or ``mlp``, from the model's modules when given,
    else from layer kinds and names.

    Example:
        >>> architecture_family({"lstm.l0": {"kind": "recurrent"}, "head": {"kind": "weight"}})
        'recurrent'
    """
    names = " ".join(layers).lower()
    if model is not None:
        types = " ".join(type(m).__name__.lower() for m in model.modules())
        names += " " + types
    if any(row.get("kind") == "recurrent" for row in layers.values()) or any(
            word in names for word in ("lstm", "gru", "rnn")):
        return "recurrent"
    if any(word in names for word in ("attn", "attention", "transformer")):
        return "transformer"
    if "conv" in names:
        return "cnn"
    return "mlp"
