"""A key written twice in a config file or an override's value: PyYAML keeps the last one
silently, so a second ``train:`` section threw away the first (epochs back to the default 500).
The oracle: the file's text, which says the key twice; the config must refuse it in one line
naming the key and both lines, and YAML's merge keys (``<<``), which may repeat a key by design,
still load."""

import pytest

from gradflow.errors import ConfigError
from gradflow.experiments.config import load_config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochs: 3\nmodel:\n  depth: 2\ntrain:\n  batch_size: 8\n",
         "line 5, column 1: duplicate key 'train' (first at line 1); write each key once"),
        ("train:\n  epochs: 3\n  epochs: 4\n", "line 3, column 3: duplicate key 'epochs' (first at line 2)"),
        ("train: {epochs: 1, 'epochs': 2}\n", "duplicate key 'epochs'"),
    ],
    ids=["section", "key", "flow-and-quoted"],
)
def test_a_key_given_twice_in_a_file_is_refused(tmp_path, text, message):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_key_given_twice_in_an_override_value_is_refused():
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_config(None, ["model.initializer={name: he_uniform, name: zeros}"])


def test_merge_keys_may_repeat_a_key(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: {epochs: 3, batch_size: 8}\n  epochs: 4\n")
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.batch_size) == (4, 8)
