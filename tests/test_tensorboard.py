"""A real TensorBoard server on 127.0.0.1 reads the gradient histograms of real CLI runs (deep ReLU
and deep tanh, with ``gradflow train``'s defaults: one histogram per 25 epochs, the last flushed
at the end of the run)."""

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


EPOCHS = 3


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    """Two runs side by side, as a user compares them: deep ReLU and deep tanh."""
    logdir = tmp_path_factory.mktemp("runs")
    for config in ("deep_relu", "deep_tanh"):
        completed = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train.py"), str(ROOT / "configs" / f"{config}.yaml"),
             f"train.epochs={EPOCHS}", "--logdir", str(logdir), "--quiet", "--device", "cpu"],
            capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert completed.returncode == 0, completed.stderr
    return logdir


def run_named(logdir: Path, config: str) -> str:
    (run,) = [p.name for p in logdir.iterdir() if p.is_dir() and p.name.startswith(config)]
    return run


@pytest.fixture(scope="module")
def relu(logdir) -> str:
    return run_named(logdir, "deep_relu")


@pytest.fixture(scope="module")
def tanh(logdir) -> str:
    return run_named(logdir, "deep_tanh")


@pytest.fixture(scope="module")
def tensorboard(logdir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                tags = get_json(f"{base}/data/plugin/histograms/tags")
                if len(tags) == 2 and all(tags.values()):
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


def histogram_points(tensorboard: str, run: str, tag: str) -> list:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return get_json(f"{tensorboard}/data/plugin/histograms/histograms?{query}")


def test_every_dense_layer_has_gradient_and_weight_histograms(tensorboard, relu):
    tags = get_json(f"{tensorboard}/data/plugin/histograms/tags")[relu]
    for k in range(1, 7):                                 # five hidden layers and the output layer
        assert f"grad/dense_{k}/weight" in tags
        assert f"1_grad_log10/dense_{k}/weight" in tags
        assert f"weight/dense_{k}/weight" in tags


def test_the_first_histogram_is_the_first_window_alone_then_pooling(tensorboard, relu):
    """25 epochs per histogram by default, but the first window gets one of its own (epoch 0,
    where vanishing is worst); a 3-epoch run's second histogram is written when the monitor is
    removed, at the last epoch, and holds every value of epochs 1-2."""
    first, last = histogram_points(tensorboard, relu, "grad/dense_1/weight")
    assert [first[1], last[1]] == [0, EPOCHS - 1]
    for (_, _, buckets), epochs in ((first, 1), (last, EPOCHS - 1)):
        assert buckets and all(len(bucket) == 3 for bucket in buckets)
        assert sum(count for _, _, count in buckets) == pytest.approx(2 * 5 * 16 * epochs)   # weights x steps x epochs
    scalars = get_json(f"{tensorboard}/data/plugin/scalars/scalars?"
                       + urllib.parse.urlencode({"run": relu, "tag": "grad/dense_1/weight/norm"}))
    assert [step for _, step, _ in scalars] == list(range(EPOCHS))                       # scalars: every epoch


def test_log10_gradients_sort_first(tensorboard, relu):
    """TensorBoard's Histograms and Distributions tabs list sections by name: the log10 |g|
    section, where tanh and ReLU differ at a glance, comes before activation, grad and weight."""
    tags = get_json(f"{tensorboard}/data/plugin/histograms/tags")[relu]
    sections = sorted({tag.partition("/")[0] for tag in tags})
    assert sections == ["1_grad_log10", "activation", "grad", "weight"]


def test_the_gradient_flow_picture_is_in_the_images_tab(tensorboard, relu):
    """At the end (monitor.flow_images=50 windows is longer than the run; then every 50)."""
    assert "gradient_flow" in get_json(f"{tensorboard}/data/plugin/images/tags")[relu]
    query = urllib.parse.urlencode({"run": relu, "tag": "gradient_flow"})
    images = get_json(f"{tensorboard}/data/plugin/images/images?{query}")
    assert [image["step"] for image in images] == [EPOCHS - 1]
    with urllib.request.urlopen(f"{tensorboard}/data/plugin/images/individualImage?{images[0]['query']}",
                                timeout=5) as response:
        assert response.read()[:4] == b"\x89PNG"


def test_tanh_activations_are_binned_evenly_over_minus_one_to_one(tensorboard, tanh):
    """64 equal bins over [-1, 1] (each 1/32 wide), so the outputs piling up near +-1 (saturation)
    get a bin of their own instead of one octave bin for all of 0.5-1."""
    points = histogram_points(tensorboard, tanh, "activation/tanh_5")     # epoch 0, then epochs 1-2
    for _, _, buckets in points:
        assert buckets[0][0] >= -1.0 and buckets[-1][1] <= 1.0
        widths = [right - left for left, right, count in buckets if count]
        assert widths and all(width == pytest.approx(1 / 32) for width in widths)
    total = sum(count for _, _, buckets in points for _, _, count in buckets)
    assert total == pytest.approx(500 * 5 * EPOCHS)                                   # samples x units x epochs


def test_epoch_and_gradient_scalars_are_served(tensorboard, relu):
    tags = get_json(f"{tensorboard}/data/plugin/scalars/tags")[relu]
    for name in ("epoch/loss", "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy",
                 "grad/dense_1/weight/mean_abs", "grad/dense_1/weight/norm", "grad/dense_1/weight/max_abs",
                 "grad/dense_1/weight/nonfinite", "weight/dense_1/weight/l1"):
        assert name in tags, name


def test_the_diagnosis_text_is_served(tensorboard, relu):
    tags = get_json(f"{tensorboard}/data/plugin/text/tags")[relu]
    assert "diagnosis/text_summary" in tags             # add_text("diagnosis", ...) files it here
    query = urllib.parse.urlencode({"run": relu, "tag": "diagnosis/text_summary"})
    (entry,) = get_json(f"{tensorboard}/data/plugin/text/text?{query}")
    assert "<strong>Verdict: " in entry["text"] and "Advice:" in entry["text"]    # Markdown, rendered
    assert "<table>" in entry["text"]                                                  # the evidence table


def test_no_one_point_diagnosis_charts(tensorboard, relu):
    tags = get_json(f"{tensorboard}/data/plugin/scalars/tags")[relu]
    assert not [tag for tag in tags if tag.startswith("diagnosis")]


def test_custom_scalars_open_on_accuracy_then_gradient_size_per_layer(tensorboard, relu):
    """The Custom Scalars tab: accuracy and loss first, then every layer's gradient size in one
    chart, each chart's regexes matching tags the run really wrote."""
    import re

    layout = get_json(f"{tensorboard}/data/plugin/custom_scalars/layout")
    categories = layout["category"]
    assert categories[0]["title"].endswith("accuracy and loss")
    assert "gradient size per layer" in categories[1]["title"]
    scalars = get_json(f"{tensorboard}/data/plugin/scalars/tags")[relu]
    matched = {}
    for category in categories:
        for chart in category["chart"]:
            patterns = chart["multiline"]["tag"]
            matched[chart["title"]] = [t for t in scalars if any(re.search(p, t) for p in patterns)]
    first = categories[0]["chart"][0]["title"]
    assert sorted(matched[first]) == ["epoch/accuracy", "epoch/val_accuracy"]
    per_layer = categories[1]["chart"][0]["title"]
    assert sorted(matched[per_layer]) == [f"grad/dense_{k}/weight/relative" for k in range(1, 7)]
    # the layout cannot set a log axis: the title says how
    assert "log y" in per_layer and "||g|| / ||w||" in per_layer and "diagnose" in per_layer
    one_each = [chart["title"] for chart in categories[2]["chart"]]           # layer by layer, input first
    assert [matched[title] for title in one_each] == [[f"grad/dense_{k}/weight/relative"] for k in range(1, 7)]
    assert all(matched.values()), matched                 # no empty chart on a ReLU run


@pytest.mark.slow   # 10-23 s: three Chromium page loads of 15 s page time each
def test_screenshots_of_the_real_server(logdir, tmp_path):
    """Headless Chromium draws the Histograms, Custom Scalars and Images tabs of a running server
    (scripts/tensorboard_screenshots.py, which also makes docs/img/tensorboard-*.png)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import tensorboard_screenshots as shots

    if shots.chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    import struct

    for path in shots.shoot(logdir, tmp_path):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", header[16:24])
        assert width == 1400 and height >= 700 and path.stat().st_size > 20_000, path   # a drawn page, not a blank one
