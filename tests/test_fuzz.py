"""Input fuzzing: every malformed config or override is one line on stderr, exit 2, nothing written.

Three layers, cheapest first:

- in process (hypothesis, a few hundred examples): ``load_config`` raises ``ConfigError`` whose
  message is one line, and the validation path writes nothing: an audit hook watches every
  open-for-write, mkdir, rename and remove while it runs;
- through the CLI in a forked process (hypothesis, a couple of dozen examples): the process
  runs ``gradflow.cli.main`` exactly as ``scripts/train.py`` does, with its own stdout/stderr
  file descriptors; exit status 2, exactly one stderr line, no ``Traceback``, no run directory.
  Forking a process that has already imported torch costs milliseconds, where a fresh
  interpreter costs seconds of torch import each on a loaded CI box;
- through real ``scripts/train.py`` subprocesses for the file cases (binary, non-UTF-8, empty,
  deeply nested): the full path a user takes, interpreter start-up included.

Run ``pytest tests/test_fuzz.py --hypothesis-show-statistics`` to see how many examples of
each kind were tried (the README's Reliability table quotes them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import traceback
import typing
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gradflow.cli import main as cli_main
from gradflow.errors import ConfigError
from gradflow.experiments import config as C
from gradflow.experiments.config import Config, load_config
from gradflow.experiments.data import DATASETS
from gradflow.experiments.models import ACTIVATIONS, INITIALIZERS
from gradflow.experiments.optimizers import OPTIMIZERS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
DEEP_RELU = ROOT / "configs" / "deep_relu.yaml"
IN_PROCESS_EXAMPLES = 250
CLI_EXAMPLES = 24


# --- the schema, read from the config's dataclasses so the fuzzer follows new keys ------------

def _leaves(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", tp


LEAVES = dict(_leaves())
SECTIONS = sorted({key.rpartition(".")[0] for key in LEAVES if "." in key})
KEYS_OF = {section: {k.rpartition(".")[2] for k in LEAVES if k.rpartition(".")[0] == section} for section in ["", *SECTIONS]}
KEYS_OF[""] |= {s for s in SECTIONS if "." not in s}
KEYS_OF["model"] |= {"output"}
ALL_KEYS = set(LEAVES) | set(SECTIONS)
REGISTRIES = {
    "data.name": set(DATASETS),
    "model.activation": set(ACTIVATIONS),
    "model.initializer": set(INITIALIZERS),
    "model.output.activation": {"sigmoid"},
    "model.output.initializer": set(INITIALIZERS),
    "optimizer.name": set(OPTIMIZERS),
    "train.on_nonfinite": {"stop", "continue"},
}
# Valid overrides that leave every bad one below bad (no depth, width or data-size changes).
VALID = ["train.epochs=7", "optimizer.lr=0.1", "model.activation=relu", "data.noise=0.2",
         "monitor.histograms=false", "optimizer.momentum=0.5", "train.seed=3"]


def keys_of_type(*types: Any) -> list[str]:
    return sorted(k for k, tp in LEAVES.items() if tp in types)


def render(value: Any) -> str:
    """A Python value as YAML flow text (JSON is YAML): ``[1, "a"]``, ``{"k": null}``."""
    return json.dumps(value)


# --- values --------------------------------------------------------------------------------

safe_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
fractional = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
junk_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | safe_text
junk = st.recursive(junk_scalar, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(safe_text.filter(lambda k: k != "name"), inner, max_size=3), max_leaves=12)
lists = st.lists(junk, min_size=1, max_size=3)
mappings = st.dictionaries(safe_text.filter(lambda k: k != "name"), junk, min_size=1, max_size=3)

# What each declared type must never accept.
WRONG_FOR = {
    int: fractional | safe_text | st.booleans() | st.none() | lists | mappings,
    float: safe_text | st.booleans() | st.none() | lists | mappings,
    bool: st.integers() | fractional | safe_text | st.none() | lists | mappings,
    str: st.integers() | fractional | st.booleans() | st.none() | lists | mappings,
}
WRONG_FOR_UNION = {
    "model.width": fractional | safe_text | st.booleans() | st.none() | mappings | st.lists(safe_text, min_size=1),
    "model.activation": st.integers() | fractional | st.booleans() | st.none() | mappings | st.lists(st.integers(), min_size=1),
    "model.initializer": st.integers() | fractional | st.booleans() | st.none() | st.lists(st.integers(), min_size=1),
    "model.output.initializer": st.integers() | fractional | st.booleans() | st.none() | lists,
    "monitor.histograms": fractional | safe_text | st.none() | lists | mappings,      # takes a bool or an int
}


def _below(limit: int) -> st.SearchStrategy[int]:
    return st.integers(max_value=limit - 1).map(lambda v: max(v, -(10**30)))


def _above(limit: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=limit + 1, max_value=10**30) | st.just(10**100)


# Right type, impossible value: zero, negative and absurd sizes, out-of-range floats.
BAD_VALUES: dict[str, st.SearchStrategy] = {
    "data.n_samples": _below(1) | _above(C.MAX_N_SAMPLES),
    "data.n_train": _below(1) | st.integers(1000, 10**12),          # >= n_samples leaves no test set
    "data.random_state": _below(0) | _above(C.MAX_RANDOM_STATE - 1),
    "data.noise": st.floats(max_value=-1e-9, allow_infinity=False),
    "data.factor": st.floats(max_value=0.0, allow_infinity=False) | st.floats(min_value=1.0, allow_infinity=False),
    "model.depth": _below(1) | _above(C.MAX_DEPTH),
    "model.width": _below(1) | _above(C.MAX_WIDTH),
    "model.output.units": st.integers().filter(lambda v: v != 1),
    "optimizer.lr": st.floats(max_value=0.0, allow_infinity=False),
    "optimizer.epsilon": st.floats(max_value=0.0, allow_infinity=False),
    "optimizer.momentum": st.floats(max_value=-1e-9, allow_infinity=False) | st.floats(min_value=1.0, allow_infinity=False),
    "optimizer.beta_1": st.floats(min_value=1.0, allow_infinity=False),
    "optimizer.beta_2": st.floats(max_value=-1e-9, allow_infinity=False),
    "train.epochs": _below(1) | _above(C.MAX_EPOCHS),
    "train.batch_size": _below(1) | _above(C.MAX_BATCH_SIZE),
    "train.seed": _below(0) | st.integers(2**63, 2**70),
    "monitor.window_steps": _below(0),
    "monitor.histograms": _below(1),
}
NON_FINITE = [".nan", ".inf", "-.inf", "1e999", "-1e999", ".NaN"]
YAML_ERRORS = ["[1", "{a: 1", "a: b: c", "'x", '"x', "@x", "`x", "%x", "!!int x", "!!python/object:os.system ls",
               "*alias", "[1, 2]]", "{a: 1}}", "!!binary ###", "? [1, 2]", "[a, b", "!!float abc"]


@st.composite
def wrong_type(draw) -> str:
    key = draw(st.sampled_from(sorted(LEAVES)))
    strategy = WRONG_FOR_UNION[key] if key in WRONG_FOR_UNION else WRONG_FOR[LEAVES[key]]
    return f"{key}={render(draw(strategy))}"


@st.composite
def bad_value(draw) -> str:
    key = draw(st.sampled_from(sorted(BAD_VALUES)))
    return f"{key}={render(draw(BAD_VALUES[key]))}"


@st.composite
def non_finite(draw) -> str:
    key = draw(st.sampled_from(keys_of_type(float)))
    return f"{key}={draw(st.sampled_from(NON_FINITE))}"


@st.composite
def bad_registry_name(draw) -> str:
    key = draw(st.sampled_from(sorted(REGISTRIES)))
    name = draw(safe_text.filter(lambda s: s not in REGISTRIES[key]))
    return f"{key}={render(name)}"


@st.composite
def bad_run_name(draw) -> str:
    name = draw(st.just("") | st.builds("{}/{}".format, safe_text, safe_text) | st.builds("{}\\{}".format, safe_text, safe_text)
                | st.builds("{}{}".format, safe_text, st.characters(categories=["Cc"]))
                | st.text(min_size=C.MAX_NAME_LENGTH + 1, max_size=300))
    return f"name={render(name)}"


@st.composite
def unknown_key(draw) -> str:
    section = draw(st.sampled_from(["", *SECTIONS]))
    name = draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters=".="), min_size=1, max_size=20)
                .filter(lambda s: s.strip() and s.strip() not in KEYS_OF[section] and not s.startswith("-")))
    return f"{section + '.' if section else ''}{name}={render(draw(junk))}"


@st.composite
def nested_junk(draw) -> str:
    key = draw(st.sampled_from(sorted(ALL_KEYS)))
    inner = draw(st.lists(junk, max_size=3) | mappings)
    return f"{key}={render([inner])}" if draw(st.booleans()) else f"{key}={render({'junk': inner})}"


@st.composite
def deep_nesting(draw) -> str:
    key = draw(st.sampled_from(sorted(ALL_KEYS)))
    depth = draw(st.integers(20, 1500))  # PyYAML recurses out near 1000
    text = "[" * depth + "]" * depth if draw(st.booleans()) else "{a: " * depth + "1" + "}" * depth
    return f"{key}={text}"


@st.composite
def yaml_error(draw) -> str:
    key = draw(st.sampled_from(sorted(LEAVES)))
    text = draw(st.sampled_from(YAML_ERRORS) | st.builds("{}\x01{}".format, safe_text, safe_text))
    return f"{key}={text}"


@st.composite
def not_key_value(draw) -> str:
    return draw(safe_text.filter(lambda s: "=" not in s and not s.startswith("-")) | st.builds("={}".format, safe_text)
                | st.builds(" ={}".format, safe_text))


BAD_OVERRIDES = {
    "wrong type": wrong_type(), "impossible value": bad_value(), "non-finite float": non_finite(),
    "unknown registry name": bad_registry_name(), "bad run name": bad_run_name(), "unknown key": unknown_key(),
    "nested junk": nested_junk(), "deep nesting": deep_nesting(), "YAML syntax": yaml_error(),
    "not key=value": not_key_value(),
}


@st.composite
def bad_overrides(draw) -> list[str]:
    """Some valid overrides, then one bad one (last, so nothing overrides it back)."""
    kind = draw(st.sampled_from(sorted(BAD_OVERRIDES)))
    event(f"override: {kind}")
    return [*draw(st.lists(st.sampled_from(VALID), max_size=2)), draw(BAD_OVERRIDES[kind])]


# --- files ---------------------------------------------------------------------------------

VALID_TEXT = DEEP_RELU.read_bytes()


@st.composite
def bad_file(draw) -> bytes:
    kind = draw(st.sampled_from(["binary", "non-UTF-8", "empty", "deeply nested", "junk structure", "not a mapping"]))
    event(f"file: {kind}")
    if kind == "binary":  # a NUL byte is never allowed in a YAML stream
        data = draw(st.binary(max_size=200))
        at = draw(st.integers(0, len(data)))
        return data[:at] + b"\x00" + data[at:]
    if kind == "non-UTF-8":
        at = draw(st.integers(0, len(VALID_TEXT)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
        encoded = draw(st.sampled_from([VALID_TEXT[:at] + bad + VALID_TEXT[at:], VALID_TEXT.decode().encode("utf-16"),
                                        "name: caf\xe9\n".encode("latin-1")]))
        return encoded
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"   \n\t\n", b"# only a comment\n", b"---\n", b"~\n", b"null\n", b"---\n...\n"]))
    if kind == "deeply nested":
        depth = draw(st.integers(200, 3000))
        return b"model: " + b"[" * depth + b"]" * depth + b"\n"
    if kind == "junk structure":
        top = draw(st.dictionaries(safe_text.filter(lambda k: k not in KEYS_OF[""]), junk, min_size=1, max_size=4))
        return json.dumps(top).encode()
    return json.dumps(draw(junk_scalar.filter(lambda v: v is not None) | lists)).encode()


# --- the write guard ---------------------------------------------------------------------------

_WRITES: list | None = None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.symlink",
                 "os.link", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}


def _audit(name: str, args: tuple) -> None:
    if _WRITES is None:
        return
    if name == "open":
        _, mode, flags = args
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            _WRITES.append((name, args))
    elif name in _WRITE_EVENTS:
        _WRITES.append((name, args))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it does nothing outside no_writes()


@contextmanager
def no_writes() -> Iterator[list]:
    """Record every attempt to write to the file system inside the block."""
    global _WRITES
    _WRITES = []
    try:
        yield _WRITES
    finally:
        _WRITES = None


def test_write_guard_sees_writes(tmp_path):
    with no_writes() as writes:
        (tmp_path / "a").write_text("x")
        (tmp_path / "b").mkdir()
        (tmp_path / "a").read_text()  # reading is fine
    assert [name for name, _ in writes] == ["open", "os.mkdir"]


def assert_one_line_config_error(path: Path | None, overrides: list[str]) -> str:
    with no_writes() as writes, pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.strip() and len(message.splitlines()) == 1, message
    assert writes == []
    return message


# --- in process --------------------------------------------------------------------------------

FUZZ = settings(max_examples=IN_PROCESS_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(overrides=bad_overrides(), with_file=st.booleans())
def test_bad_overrides_raise_one_line_config_error(overrides, with_file):
    assert_one_line_config_error(DEEP_RELU if with_file else None, overrides)


@settings(max_examples=IN_PROCESS_EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=bad_file(), overrides=st.lists(st.sampled_from(VALID), max_size=2))
def test_bad_files_raise_one_line_config_error(data, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_bytes(data)
        assert_one_line_config_error(path, overrides)


# What the fuzzer found, kept as named regressions: each crashed (or was accepted) before.
FOUND = {
    "recursion-in-yaml": (["model.width=" + "[" * 5000 + "]" * 5000], "model.width: YAML nested too deeply"),
    "int-over-4300-digits": (["model.depth=" + "9" * 5000], "model.depth: unreadable value"),
    "newline-in-key": (['model={"x\\ny": 1}'], "model.'x\\ny': unknown key"),
    "int-too-big-for-float": (["optimizer.lr=" + "9" * 400], "optimizer.lr: expected a finite float"),
    "nan-learning-rate": (["optimizer.lr=.nan"], "optimizer.lr: expected a finite float, got nan"),
    "infinite-noise": (["data.noise=.inf"], "data.noise: expected a finite float"),
    "absurd-depth": (["model.depth=1000000000000"], "model.depth: must be at most 1,000"),
    "absurd-parameter-count": (["model.width=90000"], "parameters is more than the limit"),
    "absurd-n-samples": (["data.n_samples=10000000000000"], "data.n_samples: must be at most"),
    "random-state-beyond-sklearn": (["data.random_state=4294967296"], "data.random_state: must be an int in [0, 2**32)"),
    "uniform-min-above-max": (["model.initializer={name: random_uniform, minval: 1, maxval: 0}"], "minval must be <= maxval"),
    "negative-stddev": (["model.initializer={name: truncated_normal, stddev: -1}"], "stddev: must be > 0"),
    "nul-in-run-name": (['name="a\\0b"'], "name: must be 1-100 printable characters"),
    "run-name-too-long": (["name=" + "x" * 300], "name: must be 1-100 printable characters"),
    "int-constructor-error": (["model.depth=!!int x"], "model.depth: unreadable value"),
}


@pytest.mark.parametrize(("overrides", "message"), list(FOUND.values()), ids=list(FOUND))
def test_found_by_the_fuzzer(overrides, message):
    assert message in assert_one_line_config_error(DEEP_RELU, overrides)


# --- through the CLI ---------------------------------------------------------------------------

def run_cli_forked(args: list[str], cwd: Path, timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``gradflow.cli.main(["train", *args])`` in a forked process, as ``scripts/train.py``
    does: own fds 1 and 2, an uncaught exception prints a traceback and exits 1 (as Python
    does). Returns (exit status, stdout, stderr)."""
    out_path, err_path = cwd / ".stdout", cwd / ".stderr"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.chdir(cwd)
            for fd, target in ((1, out_path), (2, err_path)):
                os.dup2(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's own stdout
            sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
            code = cli_main(["train", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the interpreter would print
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    status = _wait(pid, timeout)
    out, err = (p.read_text(errors="replace") for p in (out_path, err_path))
    out_path.unlink()
    err_path.unlink()
    return status, out, err


def _wait(pid: int, timeout: float) -> int:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"the CLI ran for more than {timeout} s on bad input")


BAD_OPTIONS = [["--seed", "abc"], ["--seed", "-5"], ["--threads", "0"], ["--device", "tpu"], ["--bogus"], ["--seed"],
               ["--seed", str(2**64)], ["--logdir"]]


@st.composite
def cli_args(draw) -> tuple[bytes | None, list[str]]:
    """(config file bytes or None for deep_relu.yaml, overrides and options)."""
    kind = draw(st.sampled_from(["override", "file", "option"]))
    event(f"cli: {kind}")
    if kind == "file":
        return draw(bad_file()), []
    if kind == "option":
        return None, draw(st.sampled_from(BAD_OPTIONS))
    return None, draw(bad_overrides())


def assert_bad_input(status: int, out: str, err: str, tmp: Path) -> None:
    assert "Traceback" not in err, err
    assert status == 2, (status, err)
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("gradflow: error: "), err
    assert not (tmp / "runs").exists()  # no run directory, no logdir
    assert sorted(p.name for p in tmp.iterdir()) == ["config.yaml"]


@settings(max_examples=CLI_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cli_args())
def test_cli_bad_input_exits_2_with_one_line(case):
    data, args = case
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "config.yaml").write_bytes(data if data is not None else VALID_TEXT)
        status, out, err = run_cli_forked(["config.yaml", *args, "--logdir", "runs", "--device", "cpu"], tmp)
        assert_bad_input(status, out, err, tmp)


# File cases through the script a user runs, interpreter start-up included; the forked CLI
# test above covers the other kinds.
FILE_CASES = {  # three only: each costs a fresh interpreter's torch import (seconds on a busy box)
    "binary-non-utf8": bytes(range(256)) * 4,
    "empty": b"",
    "deeply-nested": b"model: " + b"[" * 50_000 + b"]" * 50_000,
}


def test_file_cases_through_the_script(tmp_path):
    def run(name: str) -> tuple[str, Path, subprocess.CompletedProcess]:
        cwd = tmp_path / name
        cwd.mkdir()
        (cwd / "config.yaml").write_bytes(FILE_CASES[name])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, str(SCRIPT), "config.yaml", "--logdir", "runs"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
        return name, cwd, proc

    with ThreadPoolExecutor(3) as pool:  # three at a time: each one is mostly torch's import
        results = list(pool.map(run, FILE_CASES))
    for name, cwd, proc in results:
        try:
            assert_bad_input(proc.returncode, proc.stdout, proc.stderr, cwd)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
