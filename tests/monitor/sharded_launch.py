"""Start a multi-process gloo run of tests/monitor/sharded_run.py: one process per rank, torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), a timeout after which
every rank is killed, and each rank's results read back from its JSON files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("sharded_run.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, world: int, cases: list[str], timeout: float = 240, env: dict | None = None,
           script: Path = SCRIPT) -> tuple[dict[str, list[dict]], list[str]]:
    """Run ``cases`` on ``world`` ranks; returns ({case: [rank 0's result, ...]}, each rank's stderr tail).
    Every rank is killed at ``timeout`` seconds: a hang fails the test instead of blocking it."""
    port = free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1", "GRADFLOW_COLLECTIVE_TIMEOUT": "60", "GRADFLOW_ATTACH_TIMEOUT": "5",
            "PYTHONWARNINGS": "ignore", **(env or {})}
    procs = [subprocess.Popen([sys.executable, str(script), str(out), *cases], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    errors = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            errors.append(err[-3000:])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise AssertionError(f"the {world}-rank run of {cases} did not finish in {timeout} s (a hang)") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = {}
    for case in cases:
        files = [out / f"{case}.rank{r}.json" for r in range(world)]
        results[case] = [json.loads(f.read_text()) if f.exists() else None for f in files]
    return results, errors
