"""A real TensorBoard server on 127.0.0.1 reads the gradient histograms of a real CLI run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("runs")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), str(ROOT / "configs" / "deep_relu.yaml"),
         "train.epochs=3", "--logdir", str(logdir), "--quiet", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def tensorboard(run_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                tags = get_json(f"{base}/data/plugin/histograms/tags")
                if tags.get(".", {}):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"TensorBoard did not serve histograms: {server.stderr.read() if server.poll() is not None else 'timeout'}")
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_dense_layer_has_gradient_and_weight_histograms(tensorboard):
    tags = get_json(f"{tensorboard}/data/plugin/histograms/tags")["."]
    for k in range(1, 7):                                 # five hidden layers and the output layer
        assert f"grad/dense_{k}/weight" in tags
        assert f"grad_log10/dense_{k}/weight" in tags
        assert f"weight/dense_{k}/weight" in tags


def test_histograms_have_one_point_per_epoch_with_buckets(tensorboard):
    query = urllib.parse.urlencode({"run": ".", "tag": "grad/dense_1/weight"})
    points = get_json(f"{tensorboard}/data/plugin/histograms/histograms?{query}")
    assert [step for _, step, _ in points] == [0, 1, 2]
    for _, _, buckets in points:
        assert buckets and all(len(bucket) == 3 for bucket in buckets)
        assert sum(count for _, _, count in buckets) == pytest.approx(2 * 5 * 16)   # weights x steps


def test_epoch_and_gradient_scalars_are_served(tensorboard):
    tags = get_json(f"{tensorboard}/data/plugin/scalars/tags")["."]
    for name in ("epoch/loss", "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy",
                 "grad/dense_1/weight/mean_abs", "grad/dense_1/weight/norm", "grad/dense_1/weight/max_abs",
                 "grad/dense_1/weight/nonfinite", "weight/dense_1/weight/l1"):
        assert name in tags, name


def test_the_diagnosis_text_is_served(tensorboard):
    tags = get_json(f"{tensorboard}/data/plugin/text/tags")["."]
    assert "diagnosis/text_summary" in tags             # add_text("diagnosis", ...) files it here
    query = urllib.parse.urlencode({"run": ".", "tag": "diagnosis/text_summary"})
    (entry,) = get_json(f"{tensorboard}/data/plugin/text/text?{query}")
    assert "<strong>Verdict: " in entry["text"] and "Advice:" in entry["text"]    # Markdown, rendered
    assert "<table>" in entry["text"]                                                  # the evidence table


def test_no_one_point_diagnosis_charts(tensorboard):
    tags = get_json(f"{tensorboard}/data/plugin/scalars/tags")["."]
    assert not [tag for tag in tags if tag.startswith("diagnosis")]


def test_custom_scalars_open_on_accuracy_then_gradient_size_per_layer(tensorboard):
    """The Custom Scalars tab: accuracy and loss first, then every layer's gradient size in one
    chart, each chart's regexes matching tags the run really wrote."""
    import re

    layout = get_json(f"{tensorboard}/data/plugin/custom_scalars/layout")
    categories = layout["category"]
    assert categories[0]["title"].endswith("accuracy and loss")
    assert "gradient size per layer" in categories[1]["title"]
    scalars = get_json(f"{tensorboard}/data/plugin/scalars/tags")["."]
    matched = {}
    for category in categories:
        for chart in category["chart"]:
            patterns = chart["multiline"]["tag"]
            matched[chart["title"]] = [t for t in scalars if any(re.search(p, t) for p in patterns)]
    first = categories[0]["chart"][0]["title"]
    assert sorted(matched[first]) == ["epoch/accuracy", "epoch/val_accuracy"]
    per_layer = categories[1]["chart"][0]["title"]
    assert sorted(matched[per_layer]) == [f"grad/dense_{k}/weight/mean_abs" for k in range(1, 7)]
    assert all(matched.values()), matched                 # no empty chart on a ReLU run
