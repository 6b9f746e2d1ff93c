"""Calibrate gradflow's diagnosis on standard architectures: train each a short time over seeds
with a GradientMonitor, diagnose, and tabulate the verdicts.

Runs (from the repository root):

    python benchmarks/calibrate_architectures.py                          # every run, 3 seeds
    python benchmarks/calibrate_architectures.py --runs resnet lstm1 --seeds 1
    python benchmarks/calibrate_architectures.py --keep /tmp/arch         # keep windows + losses (pickles)
    python benchmarks/calibrate_architectures.py --reuse /tmp/arch        # re-diagnose kept runs, no training

Prints a Markdown table: run, seed, loss start -> end (means over the first and last window),
verdict, evidence (the fired checks' reasons), and per run how many seeds met the expectation.
Models and data come from gradflow.experiments.zoo; every run is CPU-sized (tens of steps).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from gradflow import GradientMonitor  # noqa: E402
from gradflow.analysis.diagnose import diagnose  # noqa: E402
from gradflow.experiments import zoo  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import calibrate_models as cm  # noqa: E402


@dataclass
class Spec:
    """One calibration run: how to build it, how long, and what the verdict should be."""

    build: Callable[[int], tuple[nn.Module, torch.optim.Optimizer, Callable[[int], tuple], str]]
    steps: int = 60          # optimizer steps
    window: int = 5          # steps per monitor window
    expect: str = "healthy"  # "healthy" (exactly) or a verdict that must appear
    clip: float | None = None   # clip_grad_norm_(max_norm) before each step
    warmup: int = 0             # linear learning-rate warm-up over this many steps
    spike: tuple[int, float] | None = None   # (step, factor): that one step at factor x the learning rate
    loss_scale: float = 1.0     # the loss is multiplied by this before backward


def _images(seed: int, n: int = 512, size: int = 16, batch: int = 32):
    x, y = zoo.image_task(n, size=size, seed=seed)
    return lambda step: (x[(step * batch) % n:(step * batch) % n + batch], y[(step * batch) % n:(step * batch) % n + batch])


def _tokens(seed: int, vocab: int, length: int = 32, n: int = 512, batch: int = 16):
    data = zoo.markov_tokens(n, length, vocab, seed=seed)
    return lambda step: (data[(step * batch) % n:(step * batch) % n + batch, :-1],
                         data[(step * batch) % n:(step * batch) % n + batch, 1:])


def resnet(seed: int, lr: float = 0.05):
    torch.manual_seed(seed)
    model = zoo.resnet_cnn(blocks=4, channels=16)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), _images(seed), "class"


def resnet34(seed: int):
    """The issue's ResNet-34 (torchvision's layout, random init), SGD lr 0.005, momentum 0.9,
    32x32 images in batches of 16."""
    torch.manual_seed(seed)
    model = zoo.resnet34()
    return (model, torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9),
            _images(seed, n=320, size=32, batch=16), "class")


def resnet_lr(seed: int):
    return resnet(seed, lr=50.0)


def gpt2(seed: int):
    model = zoo.hf_gpt2(vocab=50257, width=128, layers=4, heads=4, context=32, seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), _tokens(seed, 50257, batch=4), "lm"


def nanogpt(seed: int):
    torch.manual_seed(seed)
    model = zoo.nanogpt(vocab=256, width=64, layers=4, heads=4, context=32)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3), _tokens(seed, 256), "lm"


def encoder_lm(seed: int):
    torch.manual_seed(seed)
    model = zoo.transformer_lm(vocab=256, width=64, layers=2, heads=4, context=32)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), _tokens(seed, 256), "lm"


def lstm1(seed: int):
    torch.manual_seed(seed)
    model = zoo.lstm_lm(vocab=256, width=64, layers=1)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), _tokens(seed, 256), "lm"


def lstm_deep(seed: int):
    """Six stacked LSTM layers, forget gates shut (bias -6): the gradient through time and
    down the stack vanishes; plain SGD as in the pre-clipping literature."""
    torch.manual_seed(seed)
    model = zoo.lstm_lm(vocab=256, width=64, layers=6, forget_bias=-6.0)
    return model, torch.optim.SGD(model.parameters(), lr=1.0), _tokens(seed, 256), "lm"


def sigmoid_mlp(seed: int):
    torch.manual_seed(seed)
    model = zoo.sigmoid_mlp(depth=10, width=64, inputs=3 * 16 * 16)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), _images(seed), "class"


def dead_relu(seed: int):
    """A ReLU MLP whose hidden biases start at -5: every unit is off for every input."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = 3 * 16 * 16
    for _ in range(4):
        linear = nn.Linear(fan_in, 64)
        nn.init.constant_(linear.bias, -5.0)
        layers += [linear, nn.ReLU()]
        fan_in = 64
    model = nn.Sequential(*layers, nn.Linear(fan_in, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), _images(seed), "class"



# -- issue 23: modern architectures and the classic pathologies (calibrate_models.py) --------


def _fields(seed: int, n: int = 256, batch: int = 16):
    x, y = cm.fields(n, seed=seed)
    return lambda step: (x[(step * batch) % n:(step * batch) % n + batch], y[(step * batch) % n:(step * batch) % n + batch])


def _sequences(seed: int, length: int, n: int = 512, batch: int = 32):
    x, y = cm.first_token(n, length, seed=seed)
    return lambda step: (x[(step * batch) % n:(step * batch) % n + batch], y[(step * batch) % n:(step * batch) % n + batch])


def unet(variant: str):
    def build(seed: int):
        torch.manual_seed(seed)
        model = cm.unet(variant)
        return model, torch.optim.Adam(model.parameters(), lr=3e-3), _fields(seed), "mse"
    return build


def vit(pool: str, head: str = "head"):
    def build(seed: int):
        torch.manual_seed(seed)
        model = cm.ViT(pool=pool, head_name=head)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), _images(seed), "class"
    return build


def mixer(seed: int):
    torch.manual_seed(seed)
    model = cm.Mixer()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), _images(seed), "class"


def token_transformer(pre: bool, depth: int, lr: float):
    def build(seed: int):
        torch.manual_seed(seed)
        model = cm.TokenTransformer(vocab=256, width=32, depth=depth, pre=pre)
        return model, torch.optim.Adam(model.parameters(), lr=lr), _tokens(seed, 256), "lm"
    return build


def plain_cnn(seed: int):
    torch.manual_seed(seed)
    model = cm.plain_cnn(depth=10, channels=16)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), _images(seed), "class"


def lora(seed: int):
    torch.manual_seed(seed)
    model = cm.lora_mlp()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.Adam(trainable, lr=3e-3), _images(seed), "class"


def recurrent(cell: str, length: int, lr: float, scale: float | None = None, nonlinearity: str = "tanh",
              optimizer: str = "adam"):
    def build(seed: int):
        torch.manual_seed(seed)
        model = cm.RecurrentClassifier(cell, recurrent_scale=scale, nonlinearity=nonlinearity)
        opt = (torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam"
               else torch.optim.SGD(model.parameters(), lr=lr))
        return model, opt, _sequences(seed, length), "class"
    return build


def glorot_sigmoid(seed: int):
    """Glorot & Bengio 2010's sigmoid net (4 layers of 100, standard init), plain SGD at lr 1:
    the top hidden layer is driven toward 0 while the loss plateaus (their Fig. 2)."""
    torch.manual_seed(seed)
    model = cm.sigmoid_net(depth=4, width=100)
    return model, torch.optim.SGD(model.parameters(), lr=1.0), _images(seed), "class"


def relu30(init: str):
    def build(seed: int):
        torch.manual_seed(seed)
        model = cm.relu_net(depth=30, init=init)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), _images(seed), "class"
    return build


def relu_mlp(seed: int):
    """A 4-layer ReLU MLP of width 64, He init, SGD 0.05 (the 1000x-lr spike's base run)."""
    torch.manual_seed(seed)
    model = cm.relu_net(depth=4, width=64)
    return model, torch.optim.SGD(model.parameters(), lr=0.05), _images(seed), "class"


RUNS: dict[str, Spec] = {
    "resnet": Spec(resnet),
    "resnet34": Spec(resnet34, steps=40, window=4),
    "gpt2": Spec(gpt2, steps=30, window=3),
    "nanogpt": Spec(nanogpt),
    "encoder_lm": Spec(encoder_lm),
    "lstm1": Spec(lstm1),
    "resnet_lr50": Spec(resnet_lr, expect="exploding"),
    "sigmoid_mlp": Spec(sigmoid_mlp, expect="vanishing"),
    "lstm_deep": Spec(lstm_deep, expect="vanishing"),
    "dead_relu": Spec(dead_relu, expect="dead-units"),
    # issue 23: learning runs of other architectures
    "unet_plain": Spec(unet("plain")),
    "unet_he": Spec(unet("he")),
    "unet_bn": Spec(unet("bn")),
    "vit_cls": Spec(vit("cls")),
    "vit_pool": Spec(vit("mean")),
    "vit_to_logits": Spec(vit("cls", "to_logits")),
    "mixer": Spec(mixer),
    "preln12": Spec(token_transformer(True, 12, 1e-3)),
    "postln_warmup": Spec(token_transformer(False, 6, 1e-3), warmup=30, clip=1.0),
    "plain_cnn_bn": Spec(plain_cnn),
    "lora": Spec(lora),
    "rnn_long": Spec(recurrent("rnn", 10, 1e-2), steps=150, clip=1.0),
    "lstm_long": Spec(recurrent("lstm", 20, 1e-2), steps=150, clip=0.25),
    # the classic pathologies
    "glorot_sigmoid": Spec(glorot_sigmoid, steps=300, window=10, expect="saturated"),
    "relu30_xavier": Spec(relu30("xavier"), expect="vanishing"),
    "relu30_he": Spec(relu30("he")),
    "postln_nowarmup": Spec(token_transformer(False, 12, 1e-2), expect="-"),
    "rnn_explode": Spec(recurrent("rnn", 50, 0.01, scale=3.0, optimizer="sgd"), expect="exploding"),
    "rnn_explode_clip": Spec(recurrent("rnn", 50, 0.01, scale=3.0, optimizer="sgd"), clip=1.0, expect="exploding"),
    # The 1000x step blows the net up: its units die over steps 11-13 (finite outputs, 77-94% of
    # layer 2 by a hook's count) and every output is NaN from step 14 or 15; the taps (every 10th
    # step) see no step between, so the evidence is the explosion (docs/calibration.md).
    "lr1000_step": Spec(relu_mlp, spike=(10, 1000.0), expect="exploding"),
    "tiny_loss": Spec(relu_mlp, loss_scale=1e-6, expect="tiny-gradient"),
}


def train(spec: Spec, seed: int) -> tuple[list, list[float], list[str] | None, nn.Module]:
    """Train one run; returns (monitor windows, mean loss per window, forward order if the
    monitor has one, the model)."""
    model, optimizer, batch, kind = spec.build(seed)
    base = [group["lr"] for group in optimizer.param_groups]
    losses, running = [], []
    with GradientMonitor(model, None, histograms=False) as monitor:
        for step in range(spec.steps):
            scale = min(1.0, (step + 1) / spec.warmup) if spec.warmup else 1.0
            if spec.spike and step == spec.spike[0]:
                scale *= spec.spike[1]
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * scale
            x, y = batch(step)
            out = zoo.lm_logits(model, x)
            if kind == "mse":
                loss = F.mse_loss(out, y)
            else:
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            (loss * spec.loss_scale).backward()
            if spec.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
            optimizer.step()
            running.append(loss.item())
            if (step + 1) % spec.window == 0:
                monitor.log(step)
                losses.append(sum(running) / len(running))
                running = []
        order = list(getattr(monitor, "forward_order", None) or []) or None
        return monitor.history, losses, order, model


def margins(diagnosis) -> str:
    """What the vanishing and exploding rules read: weakest hidden layer / head (early), the
    input end / head, the largest judged update per step, the normalised convs' largest update
    (max -> last window) and the weakest projection shortcut / head (shown, not judged)."""
    layers = diagnosis.evidence["layers"]

    def ratio(value: float) -> str:
        return "n/a" if value != value else (f"1/{1 / value:.3g}" if 0 < value < 1 else f"{value:.3g}")

    hidden = [(name, r) for name, r in layers.items() if r.get("role") == "hidden"]
    weakest = min(hidden, key=lambda item: item[1]["ratio_early"] if item[1]["ratio_early"] == item[1]["ratio_early"]
                  else float("inf"), default=(None, None))
    judged = [r.get("update_ratio_last") if r.get("normalised") else r["update_ratio_max"] for r in layers.values()]
    judged = [v for v in judged if v == v]
    normalised = [(r["update_ratio_max"], r["update_ratio_last"]) for r in layers.values() if r.get("normalised")]
    top = max(normalised, default=None)
    shortcuts = [r["ratio_early"] for r in layers.values() if r.get("role") == "shortcut"]
    return " | ".join([
        f"{weakest[0]} {ratio(weakest[1]['ratio_early'])}" if weakest[0] else "n/a",
        ratio(hidden[0][1]["ratio_early"]) if hidden else "n/a",
        f"{max(judged):.3g}" if judged else "n/a",
        f"{top[0]:.3g} -> {top[1]:.3g}" if top else "-",
        ratio(min(shortcuts)) if shortcuts else "-"])


def met(expect: str, verdicts: list[str]) -> bool:
    """``healthy``: exactly; ``-``: no expectation (the outcome is measured); else the verdict
    must be among them."""
    return verdicts == ["healthy"] if expect == "healthy" else expect == "-" or expect in verdicts


def judge(windows, losses, order, model=None):
    try:
        return diagnose(windows, losses, order=order, model=model)
    except TypeError:                      # a diagnose without the order and model arguments
        return diagnose(windows, losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="pickle each run's windows and losses here")
    parser.add_argument("--reuse", type=Path, help="diagnose runs pickled earlier; no training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="print each run's full report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | seed | loss start -> end | verdict | expected | weakest hidden / head | input end / head "
          "| update max (judged) | normalised conv update max -> last | shortcut / head | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    tally: dict[str, list[bool]] = {}
    for name in args.runs:
        spec = RUNS[name]
        for seed in range(args.seeds):
            started = time.perf_counter()
            path = (args.reuse or args.keep or Path(".")) / f"{name}-seed{seed}.pkl"
            if args.reuse:
                with open(path, "rb") as f:
                    windows, losses, order, *model = pickle.load(f)
                model = model[0] if model else None
            else:
                windows, losses, order, model = train(spec, seed)
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    with open(path, "wb") as f:
                        pickle.dump((windows, losses, order, model), f)
            diagnosis = judge(windows, losses, order, model)
            ok = met(spec.expect, diagnosis.verdicts)
            tally.setdefault(name, []).append(ok)
            print(f"| {name} | {seed} | {losses[0]:.3g} -> {losses[-1]:.3g} | {', '.join(diagnosis.verdicts)} | "
                  f"{spec.expect}{'' if ok else ' (MISS)'} | {margins(diagnosis)} | {time.perf_counter() - started:.1f} |",
                  flush=True)
            if not ok:
                print(diagnosis.line())
            if args.report:
                print(diagnosis.report())
    print()
    for name, oks in tally.items():
        print(f"{name}: {sum(oks)}/{len(oks)} as expected ({RUNS[name].expect})")


if __name__ == "__main__":
    main()
