"""Per-gate statistics of nn.LSTM / nn.GRU against an oracle: each gate's rows sliced by hand
from ``p.grad`` at every step (gates.py)."""

import math

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.monitor.gates import GRU_GATES, LSTM_GATES
from gradflow.monitor.sinks import ScalarSink

CASES = {
    "lstm": (lambda: nn.LSTM(3, 5, num_layers=2), LSTM_GATES),
    "gru": (lambda: nn.GRU(3, 5, num_layers=2), GRU_GATES),
    "lstm_bidirectional_proj": (lambda: nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2), LSTM_GATES),
    "gru_bidirectional": (lambda: nn.GRU(3, 4, bidirectional=True), GRU_GATES),
}


def _gated(name: str) -> bool:
    return name.startswith(("weight_ih_l", "weight_hh_l"))


def _oracle_step(rnn: nn.Module, gates: tuple[str, ...], norms: dict) -> None:
    """Slice each gate's rows by hand (rows [g*H, (g+1)*H)) and take their L2 norm."""
    for name, p in rnn.named_parameters():
        if _gated(name) and p.grad is not None:
            rows = p.shape[0] // len(gates)
            for g, gate in enumerate(gates):
                norms.setdefault((name, gate), []).append(p.grad[g * rows:(g + 1) * rows].double().norm().item())


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gate_norms_match_hand_slices(case, one_thread):
    build, gates = CASES[case]
    torch.manual_seed(0)
    rnn = build()
    optimizer = torch.optim.SGD(rnn.parameters(), lr=0.1)
    scalars = {}
    with _quiet():
        with GradientMonitor(rnn, ScalarSink(lambda values, step: scalars.update(values))) as monitor:
            norms: dict = {}
            for _ in range(3):
                optimizer.zero_grad()
                out, _ = rnn(torch.randn(7, 4, 3))
                out.pow(2).sum().backward()
                _oracle_step(rnn, gates, norms)
                optimizer.step()
            monitor.log(0)
    window = monitor.history[-1]
    gated = [name for name, _ in rnn.named_parameters() if _gated(name)]
    assert sorted(window.gates) == sorted(gated)
    worst = 0.0
    for name, p in rnn.named_parameters():
        if not _gated(name):
            continue
        rows = p.shape[0] // len(gates)
        assert list(window.gates[name]) == list(gates)
        for g, gate in enumerate(gates):
            row = window.gates[name][gate]
            expected = sum(norms[(name, gate)]) / 3
            weight = p.detach()[g * rows:(g + 1) * rows].double().norm().item()
            assert row["steps"] == 3
            assert row["norm"] == pytest.approx(expected, rel=1e-5)
            assert row["weight_norm"] == pytest.approx(weight, rel=1e-5)
            assert scalars[f"grad/{name}/{gate}/norm"] == row["norm"]
            assert scalars[f"weight/{name}/{gate}/norm"] == row["weight_norm"]
            worst = max(worst, abs(row["norm"] - expected) / expected, abs(row["weight_norm"] - weight) / weight)
    print(f"\n{case}: largest relative error against the hand slices {worst:.2e}")


def test_gates_of_a_layer_inside_a_model_follow_the_mask(one_thread):
    """A frozen second layer (no gradient) records no gate rows; the first layer's match."""
    torch.manual_seed(1)
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 3))
    model.add_module("lstm", nn.LSTM(3, 4, num_layers=2, batch_first=True))
    for name, p in model.lstm.named_parameters():
        p.requires_grad_(name.endswith("l0"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    norms: dict = {}
    with _quiet(), GradientMonitor(model, None) as monitor:
        for _ in range(2):
            optimizer.zero_grad()
            out, _ = model.lstm(model.embed(torch.randint(0, 10, (2, 5))))
            out.sum().backward()
            _oracle_step(model.lstm, LSTM_GATES, norms)
            optimizer.step()
        monitor.log(0)
    window = monitor.history[-1]
    assert sorted(window.gates) == ["lstm.weight_hh_l0", "lstm.weight_ih_l0"]
    for name in window.gates:
        for gate in LSTM_GATES:
            expected = sum(norms[(name.partition(".")[2], gate)]) / 2
            assert window.gates[name][gate]["norm"] == pytest.approx(expected, rel=1e-5)
    assert window.kinds["lstm.weight_ih_l0"] == "recurrent" and window.kinds["embed.weight"] == "embedding"


def test_no_gates_without_gated_weights_or_with_members(one_thread):
    """A plain nn.RNN has no gates; a batched model (members > 1) stacks parameters on a member
    dimension a stock nn.LSTM lacks, so gate rows are recorded for members == 1 only."""
    rnn = nn.RNN(3, 4)
    with GradientMonitor(rnn, None) as monitor:
        rnn(torch.randn(2, 1, 3))[0].sum().backward()
        monitor.record()
        monitor.log(0)
    assert monitor.history[-1].gates == {} and "gates" not in monitor.parts
    stacked = nn.Linear(3, 3)                    # three members of Linear(3, 1), stacked
    with GradientMonitor(stacked, None, members=3) as monitor:
        assert "gates" not in monitor.parts


class _quiet:
    """Silence torch's 'LSTM with projections is not supported with oneDNN' notice."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", UserWarning)
        return self

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def test_gate_norm_adds_up_to_the_parameter_norm(one_thread):
    """One step: the gates' squared norms sum to the parameter's squared norm (the row's ``norm``)."""
    torch.manual_seed(2)
    lstm = nn.LSTM(2, 3)
    with GradientMonitor(lstm, None) as monitor:
        lstm(torch.randn(4, 1, 2))[0].sum().backward()
        monitor.record()
        monitor.log(0)
    window = monitor.history[-1]
    for name, entry in window.gates.items():
        total = math.sqrt(sum(row["norm"] ** 2 for row in entry.values()))
        assert total == pytest.approx(window.gradients[name]["norm"], rel=1e-5)
