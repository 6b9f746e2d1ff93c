"""Time gradflow's trainer (monitor off) against a bare PyTorch loop on the tutorial's models.

Both run side by side in one process, alternating, with the same seed, model, data and
thread count. The bare loop is what a careful user would write: data as tensors, batches
indexed from a per-epoch permutation, no host work per step, a validation forward per epoch.
Target: gradflow / bare <= 1.1.

Examples (from the repository root):

    python benchmarks/tutorial_speed.py                      # 500 epochs, 1 repeat, 3 configs
    python benchmarks/tutorial_speed.py --epochs 50 --repeats 3
    python benchmarks/tutorial_speed.py --configs deep_relu --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradflow.experiments.config import Config, load_config  # noqa: E402
from gradflow.experiments.data import Dataset, load_dataset  # noqa: E402
from gradflow.experiments.models import build_model  # noqa: E402
from gradflow.experiments.optimizers import make_optimizer  # noqa: E402
from gradflow.experiments.train import fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(cfg: Config, data: Dataset) -> float:
    """The reference: a plain PyTorch loop doing the same epochs; returns seconds."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    body = model[:-1]
    opt = make_optimizer(model.parameters(), cfg.optimizer)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    x, y, x_val, y_val = data.x_train, data.y_train, data.x_test, data.y_test
    n, bs = x.shape[0], cfg.train.batch_size
    t0 = time.perf_counter()
    for _ in range(cfg.train.epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            loss = F.binary_cross_entropy_with_logits(body(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.inference_mode():
            F.binary_cross_entropy_with_logits(body(x_val), y_val)
    return time.perf_counter() - t0


def gradflow_run(cfg: Config, data: Dataset) -> float:
    """gradflow's trainer with no callbacks and no progress bar; returns seconds."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    t0 = time.perf_counter()
    fit(model, data, cfg.optimizer, cfg.train, device="cpu", callbacks=[], progress=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=1, help="alternating pairs per config (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both loops")
    parser.add_argument("--configs", nargs="+", default=["shallow_tanh", "deep_tanh", "deep_relu"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.epochs} epochs, {args.repeats} repeat(s)")
    print(f"{'config':<14}{'bare s/run':>12}{'gradflow s/run':>16}{'bare ms/step':>14}{'gradflow ms/step':>18}{'ratio':>8}")
    ratios = []
    for name in args.configs:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"train.epochs={args.epochs}"])
        data = load_dataset(cfg.data)
        steps = args.epochs * -(-data.x_train.shape[0] // cfg.train.batch_size)
        warm = load_config(ROOT / "configs" / f"{name}.yaml", ["train.epochs=5"])
        bare_loop(warm, data), gradflow_run(warm, data)  # warm-up: first calls pay one-off costs
        bare, ours = [], []
        for r in range(args.repeats):  # alternate, swapping who goes first, so load drift hits both alike
            if r % 2:
                ours.append(gradflow_run(cfg, data))
                bare.append(bare_loop(cfg, data))
            else:
                bare.append(bare_loop(cfg, data))
                ours.append(gradflow_run(cfg, data))
        b, g = statistics.median(bare), statistics.median(ours)
        ratio = statistics.median(o / r for o, r in zip(ours, bare))  # paired: cancels load drift
        ratios.append(ratio)
        print(f"{name:<14}{b:>12.2f}{g:>16.2f}{1e3 * b / steps:>14.3f}{1e3 * g / steps:>18.3f}{ratio:>8.3f}")
    print(f"gradflow / bare (median over configs): {statistics.median(ratios):.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
