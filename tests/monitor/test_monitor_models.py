"""The monitor on models other than the tutorial's MLP, each checked against the p.grad oracle."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
from monitor_oracle import GradientOracle, assert_matches_oracle
from torch import nn

from gradflow import GradientMonitor


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.pool(self.relu(self.norm(self.conv(x)))).flatten(1))


class TiedLanguageModel(nn.Module):
    """Embedding, LayerNorm and an output layer that shares the embedding's weight."""

    def __init__(self, vocabulary: int = 50, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.act = nn.GELU()
        self.out = nn.Linear(width, vocabulary, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.act(self.mix(self.norm(self.embed(tokens)))))


def run_steps(model, batches, loss_fn, oracle, steps=4):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        x, y = batches(step)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        oracle.capture()
        optimizer.step()


def test_cnn_with_batchnorm_and_pooling():
    torch.manual_seed(0)
    model = SmallCNN()
    oracle = GradientOracle(model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    def batches(step):
        return torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 3, (6,), generator=generator)

    with GradientMonitor(model) as monitor:
        run_steps(model, batches, nn.functional.cross_entropy, oracle)
        logged = monitor.log(0)
    assert_matches_oracle(logged, oracle)
    assert {"conv.weight", "norm.weight", "norm.bias", "head.weight"} <= set(logged)
    relu = monitor.history[0].activations["relu"]
    assert 0.0 <= relu["dead_fraction"] <= 1.0       # units are the 8 channels


def test_embedding_layernorm_and_tied_weights():
    torch.manual_seed(0)
    model = TiedLanguageModel()
    oracle = GradientOracle(model.named_parameters())
    generator = torch.Generator().manual_seed(2)
    def batches(step):
        return torch.randint(0, 50, (4, 7), generator=generator), torch.randint(0, 50, (4 * 7,), generator=generator)

    def loss_fn(logits, y):
        return nn.functional.cross_entropy(logits.reshape(-1, 50), y)

    with GradientMonitor(model) as monitor:
        run_steps(model, batches, loss_fn, oracle)
        logged = monitor.log(0)
    assert_matches_oracle(logged, oracle)
    assert "embed.weight" in logged and "out.weight" not in logged   # the tied weight, once
    assert "act" in monitor.history[0].activations


def test_compiled_model_records_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend="aot_eager")
    oracle = GradientOracle(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientMonitor(compiled) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            compiled(torch.randn(5, 4)).pow(2).mean().backward()
            oracle.capture()
            optimizer.step()
        logged = monitor.log(0)
    assert set(logged) == {"0.weight", "0.bias", "2.weight", "2.bias"}   # names without _orig_mod
    assert_matches_oracle(logged, oracle)


# -- DistributedDataParallel: two gloo processes on the CPU -------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, inputs, targets, state, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _ddp_model()
        model.load_state_dict(state)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        with GradientMonitor(ddp) as monitor:
            for x, y in zip(inputs, targets):
                shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
                optimizer.zero_grad()
                nn.functional.mse_loss(ddp(x[shard]), y[shard]).backward()
                optimizer.step()
            queue.put((rank, monitor.log(0)))
    finally:
        dist.destroy_process_group()


def _ddp_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))


@pytest.mark.skipif(sys.platform != "linux", reason="gloo process groups are tested on Linux")
def test_ddp_statistics_equal_one_process_on_the_full_batch():
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    inputs = [torch.randn(8, 3) for _ in range(3)]
    targets = [torch.randn(8, 1) for _ in range(3)]
    reference = _ddp_model()
    state = {k: v.clone() for k, v in reference.state_dict().items()}

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    oracle = GradientOracle(reference.named_parameters())
    with GradientMonitor(reference) as monitor:
        for x, y in zip(inputs, targets):
            optimizer.zero_grad()
            nn.functional.mse_loss(reference(x), y).backward()
            oracle.capture()
            optimizer.step()
        single = monitor.log(0)
    assert_matches_oracle(single, oracle)

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    processes = [context.Process(target=_ddp_worker, args=(rank, 2, port, inputs, targets, state, queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    results = dict(queue.get() for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for rank in range(2):
        assert set(results[rank]) == set(single)
        for name, row in single.items():
            for key in ("mean", "mean_abs", "norm", "max_abs"):
                assert results[rank][name][key] == pytest.approx(row[key], rel=1e-5, abs=1e-8), (rank, name, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_between_log_calls_on_cuda():
    torch.manual_seed(0)
    # small and large parameters and outputs (>= 65,536 elements), so every reduction path runs
    model = nn.Sequential(nn.Linear(4, 512), nn.ReLU(), nn.Linear(512, 256), nn.Tanh(), nn.Linear(256, 1)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(256, 4, device="cuda"), torch.randn(256, 1, device="cuda")
    with GradientMonitor(model) as monitor:
        for _ in range(2):                           # plans are built (and cached) on first sight
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        monitor.log(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                optimizer.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert monitor.log(1)["0.weight"]["steps"] == 5
