"""Screenshots of a real TensorBoard server, taken with headless Chromium, for docs/tensorboard.md.

    python scripts/tensorboard_screenshots.py                 # trains deep_tanh and deep_relu, 100 epochs
    python scripts/tensorboard_screenshots.py --logdir runs   # shoots runs you already have

Chromium comes from Debian's packages (``apt-get install -y chromium``). The server listens on
127.0.0.1 at a free port and is stopped at the end. tests/test_tensorboard.py takes the same
screenshots of its own runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABS = {"histograms": (1400, 1000), "custom_scalars": (1400, 2300), "images": (1400, 700)}   # tab -> window size
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    """The Chromium executable, or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def start_tensorboard(logdir: Path, port: int, timeout: float = 180) -> subprocess.Popen:
    """A TensorBoard server on 127.0.0.1:``port`` that has loaded every run of ``logdir`` to its
    end (its tags unchanged over 3 s; TensorBoard loads event files in the background and
    serves what it has so far). RuntimeError after ``timeout`` seconds."""
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = {str(p.parent.relative_to(logdir)) for p in logdir.rglob("events.out.tfevents.*")}
    base, seen, stable_since = f"http://127.0.0.1:{port}", None, None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = [_get(f"{base}/data/plugin/{plugin}/tags") for plugin in ("histograms", "scalars", "images")]
            state += [_get(f"{base}/data/plugin/scalars/scalars?run={run}&tag=epoch/loss") for run in sorted(runs)]
        except OSError:
            state = None
        if state is not None and state == seen and all(run.encode() in state[0] for run in runs):
            if time.monotonic() - stable_since >= 3:
                return server
        else:
            seen, stable_since = state, time.monotonic()
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"TensorBoard did not load {logdir} on port {port} within {timeout:.0f} s")


def screenshot(url: str, path: Path, size: tuple[int, int] = (1400, 1000), wait_ms: int = 15000) -> Path:
    """A PNG of ``url`` as headless Chromium draws it after ``wait_ms`` of page time."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=120)
    return path


def shoot(logdir: Path, out: Path, prefix: str = "tensorboard") -> list[Path]:
    """Screenshots of the Histograms, Custom Scalars and Images tabs of ``logdir``'s runs."""
    port = free_port()
    server = start_tensorboard(logdir, port)
    try:
        return [screenshot(f"http://127.0.0.1:{port}/#{tab}", out / f"{prefix}-{tab}.png", size)
                for tab, size in TABS.items()]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, help="runs to show (default: train deep_tanh and deep_relu)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    if chromium() is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    logdir = args.logdir or Path(tempfile.mkdtemp()) / "runs"
    if args.logdir is None:
        for config in ("deep_tanh", "deep_relu"):
            subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), str(ROOT / "configs" / f"{config}.yaml"),
                            f"train.epochs={args.epochs}", "--logdir", str(logdir), "--quiet"],
                           check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for path in shoot(logdir, args.out):
        print(path)


if __name__ == "__main__":
    main()
