"""gradients.csv's ``kind`` column and gate rows: written from the monitor's knowledge of each
parameter's module, read back by ``gradflow diagnose RUN_DIR``; tables without them still read
(kinds by name)."""

import csv

import pytest
import torch
from torch import nn

from gradflow import GradientMonitor
from gradflow.analysis.diagnose import diagnose_run
from gradflow.analysis.windows import load_windows
from gradflow.experiments.recording import MonitorCallback


class Net(nn.Module):
    """An embedding, an LSTM and a BatchNorm inside an nn.Sequential (named ``1``: no name tells it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 4)
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(self.lstm(self.embed(x))[0][:, -1])


def _record(run_dir, windows=6):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with GradientMonitor(model) as monitor:
        recorder = MonitorCallback(monitor, run_dir)
        for epoch in range(windows):
            for _ in range(3):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(torch.randint(0, 12, (8, 5))), torch.randint(0, 3, (8,)))
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            recorder.epoch_end(epoch, {})
        recorder.close()
    with open(run_dir / "history.csv", "w", newline="") as f:
        csv.writer(f).writerows([["epoch", "loss"]] + [[i, v] for i, v in enumerate(losses)])
    return monitor


def _rows(run_dir):
    with open(run_dir / "gradients.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_kind_column_and_gate_rows_round_trip(tmp_path, one_thread):
    monitor = _record(tmp_path)
    rows = [r for r in _rows(tmp_path) if r["window"] == "0"]
    kinds = {r["parameter"]: r["kind"] for r in rows}
    assert kinds["embed.weight"] == "embedding" and kinds["lstm.weight_hh_l0"] == "recurrent"
    assert kinds["body.0.weight"] == "linear" and kinds["body.1.weight"] == "norm"
    assert kinds["lstm.weight_hh_l0.forget"] == "gate"
    names = [r["parameter"] for r in rows]            # each gate row right after its parameter's row
    assert names[names.index("lstm.weight_ih_l0") + 1:][:4] == [f"lstm.weight_ih_l0.{g}" for g in
                                                                ("input", "forget", "cell", "output")]
    loaded = load_windows(tmp_path)
    for saved, read in zip(monitor.history, loaded):
        assert read.kinds == saved.kinds
        assert list(read.gradients) == list(saved.gradients)       # gate rows are not parameters
        for name, entry in saved.gates.items():
            for gate, row in entry.items():
                assert read.gates[name][gate] == pytest.approx(row, rel=1e-12)


def test_diagnose_run_tells_norm_layers_by_kind(tmp_path, one_thread):
    _record(tmp_path)
    layers = diagnose_run(tmp_path).evidence["layers"]
    assert layers["body.1"]["kind"] == "norm" and layers["body.1"]["role"] == "norm"
    assert layers["embed"]["kind"] == "embedding" and layers["lstm.l0"]["kind"] == "recurrent"
    assert set(layers["lstm.l0"]["gates"]) == {"input", "forget", "cell", "output"}
    notes = " ".join(diagnose_run(tmp_path).evidence["notes"])
    assert "normalisation layers shown, not judged" in notes and "told apart by name" not in notes


def _drop_kind_column(run_dir) -> list[str]:
    """Rewrite gradients.csv as tables were written before the kind column (no kind, no gate
    rows); returns its columns."""
    rows = [r for r in _rows(run_dir) if r["kind"] != "gate"]
    columns = [c for c in rows[0] if c != "kind"]
    with open(run_dir / "gradients.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return columns


def test_old_tables_without_the_column_still_read(tmp_path, one_thread):
    """A table written before the kind column (no kind, no gate rows): kinds by name, so the
    BatchNorm inside the Sequential (``body.1``) counts as a weight layer, as it used to."""
    _record(tmp_path)
    _drop_kind_column(tmp_path)
    windows = load_windows(tmp_path)
    assert windows[0].kinds == {} and windows[0].gates == {}
    diagnosis = diagnose_run(tmp_path)
    layers = diagnosis.evidence["layers"]
    assert layers["body.1"]["kind"] == "weight"                  # by name: "1" says nothing
    assert layers["embed"]["kind"] == "embedding" and layers["lstm.l0"]["kind"] == "recurrent"
    assert "gates" not in layers["lstm.l0"]


def test_resuming_an_old_table_keeps_its_shape(tmp_path, one_thread):
    """Appending to a table without the kind column writes rows of its shape and no gate rows."""
    monitor = _record(tmp_path, windows=2)
    columns = _drop_kind_column(tmp_path)
    from gradflow.experiments.recording import _Tables
    tables = _Tables(tmp_path, append=True)
    tables.append(2, monitor.history[-1])
    tables.close()
    with open(tmp_path / "gradients.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert {len(line) for line in lines} == {len(columns)}
    assert [w.step for w in load_windows(tmp_path)] == [0, 1, 1]
