"""What a newcomer types first: bare ``gradflow``, options that are config keys, near-miss keys
and bad figure paths each get one line that says what to type instead (in process, no training)."""

import pytest

from gradflow.cli import EXIT_BAD_INPUT, EXIT_OK, main
from gradflow.experiments.config import config_keys, suggest_key

DEEP_RELU = "configs/deep_relu.yaml"


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("gradflow: error: ")
    return captured.err.strip()


def test_bare_gradflow_prints_help(capsys):
    assert main([]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("usage: gradflow") and all(c in out for c in ("train", "sweep", "diagnose", "compare"))


@pytest.mark.parametrize("argv, fix", [
    (["--epochs", "5"], "train.epochs=5"),
    (["--epochs=5"], "train.epochs=5"),
    (["--learning-rate", "0.1"], "optimizer.lr=0.1"),
    (["--depth", "20", "--batch_size", "8"], "model.depth=20 train.batch_size=8"),
])
def test_an_option_that_is_a_config_key_suggests_the_override(capsys, tmp_path, argv, fix):
    assert main(["train", DEEP_RELU, *argv, "--logdir", str(tmp_path)]) == EXIT_BAD_INPUT
    line = error_line(capsys)
    assert line.endswith(f"config settings are key=value overrides: {fix}")
    assert list(tmp_path.iterdir()) == []


def test_an_unrelated_option_keeps_the_general_hint(capsys, tmp_path):
    assert main(["train", DEEP_RELU, "--bogus", "--logdir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert error_line(capsys).endswith("unrecognized arguments: --bogus; overrides look like key=value")


@pytest.mark.parametrize("key, nearest", [
    ("optimizer.learning_rate", "optimizer.lr"),    # initials
    ("learning_rate", "optimizer.lr"),              # any section when its own has nothing near
    ("model.dept", "model.depth"),                  # difflib
    ("train.epoch", "train.epochs"),
    ("epochs", "train.epochs"),
    ("model.output.activaton", "model.output.activation"),
    ("model.xyzzy", None),
])
def test_the_nearest_key(key, nearest):
    assert suggest_key(key) == nearest
    assert nearest is None or nearest in config_keys()


def test_an_unknown_key_names_the_nearest_in_its_error(capsys, tmp_path):
    assert main(["train", DEEP_RELU, "optimizer.learning_rate=0.1", "--logdir", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "optimizer.learning_rate: unknown key (did you mean optimizer.lr?); accepted: name, lr," in error_line(capsys)


@pytest.mark.parametrize("flow, message", [
    ("{tmp}/no/such/dir/flow.png", "directory {tmp}/no/such/dir does not exist"),
    ("{tmp}", "is a directory; give a figure file such as {tmp}/flow.png"),
    ("{tmp}/flow", "the name must end in a figure format: "),
    ("{tmp}/flow.xyz", "the name must end in a figure format: "),
])
@pytest.mark.parametrize("command", ["diagnose", "compare"])
def test_a_bad_figure_path_is_one_line_before_any_run_is_read(capsys, tmp_path, command, flow, message):
    flow, message = flow.format(tmp=tmp_path), message.format(tmp=tmp_path)
    argv = ["diagnose", str(tmp_path / "missing-run"), "--flow", flow] if command == "diagnose" else \
        ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", flow]
    assert main(argv) == EXIT_BAD_INPUT
    line = error_line(capsys)
    assert f"{'--flow' if command == 'diagnose' else '--out'} {flow}: {message}" in line


@pytest.mark.parametrize("command", ["train", "sweep", "diagnose", "compare"])
def test_each_commands_help_opens_with_what_it_does_and_examples_that_parse(capsys, command):
    """``gradflow diagnose --help`` and ``compare --help`` were only the usage line and the options:
    no word on what they print, no example (friction15); every command's help now has both."""
    import shlex

    from gradflow.cli import build_parser

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n", 1)[1].split("positional arguments:", 1)[0]
    assert len(description.strip().splitlines()) >= 5 and "(from the repository root):" in description, out
    examples = [line.split("#")[0].split("|")[0].strip() for line in out.splitlines()
                if line.strip().startswith(f"gradflow {command} ")]
    assert examples, out
    for example in examples:
        args, extra = build_parser().parse_known_args(shlex.split(example)[1:])
        assert args.command == command and all("=" in a for a in extra), example


@pytest.mark.parametrize("argv, line", [
    (["train"], "gradflow train needs a CONFIG file (e.g. configs/deep_relu.yaml) or --resume RUN_DIR"),
    (["train", "train.epochs=3"], "train.epochs=3 is a key=value override; name the CONFIG file first, "
                                  "e.g. gradflow train configs/deep_relu.yaml train.epochs=3"),
    (["train", DEEP_RELU, "--resume", "RUN"],
     "give a CONFIG file or --resume RUN_DIR, not both; --resume goes on with RUN_DIR's config.yaml"),
    (["train", "--resume", "RUN", "train.epochs=60"],
     "--resume: takes no overrides or --seed (got train.epochs=60); it goes on with the run directory's "
     "config.yaml; to change a setting, start a new run from that config: gradflow train RUN/config.yaml "
     "train.epochs=60"),
    (["train", "--resume", "RUN", "--seed", "3"],
     "--resume: takes no overrides or --seed (got --seed 3); it goes on with the run directory's config.yaml; "
     "to change a setting, start a new run from that config: gradflow train RUN/config.yaml train.seed=3"),
    (["diagnose", "RUN", "--epochs", "3"], "--epochs: picks the epochs of the --flow chart; add --flow PATH"),
], ids=["train-alone", "override-without-config", "config-and-resume", "resume-with-override",
        "resume-with-seed", "diagnose-epochs-without-flow"])
def test_a_misplaced_config_resume_or_epochs_says_what_to_type(capsys, argv, line):
    """Before (friction15): the first four all read 'give a CONFIG file or --resume RUN_DIR (not both)'
    (an override after --resume was taken for CONFIG), or 'train.epochs=3: config file not found';
    diagnose --epochs without --flow was ignored in silence."""
    assert main(argv) == EXIT_BAD_INPUT
    assert error_line(capsys) == f"gradflow: error: {line}"
