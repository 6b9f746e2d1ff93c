"""Each callback's docstring table of keys matches the tags it writes: a tiny Lightning fit and a
tiny Hugging Face Trainer run (clipping, weights and activations on) are read back from their event
files; every tag written has a row, and every row names a tag written (``diagnosis/<verdict>`` goes to
the other loggers only)."""

from __future__ import annotations

import glob
import re

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402
from gradflow.integrations.transformers import GradflowTrainerCallback  # noqa: E402

NOT_TENSORBOARD = {"diagnosis/<verdict>", "grad/idle_parameters/text_summary"}   # other loggers; idle windows only


def table_keys(doc: str) -> list[tuple[str, str]]:
    """(key, kind) for each ``...`` key of the table's rows (between the header's rule and the last
    rule): kind ``histograms`` on a row that says histogram, ``tensors`` on a text row, else ``scalars``."""
    lines = doc.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*=+\s+=+\s*", line)]
    second = re.search(r"=\s+=", lines[rules[0]]).end() - 1          # where the value column starts
    keys = []
    for row in lines[rules[1] + 1:rules[-1]]:
        kind = "histograms" if "histogram" in row else "tensors" if "(text" in row else "scalars"
        first, value = re.findall(r"``([^`]+)``", row[:second]), re.findall(r"``([^`]+)``", row[second:])
        keys += [(key, kind) for key in first + [v for v in value if "/" in v and " " not in v]]
    return keys


def pattern(key: str) -> re.Pattern:
    text = re.escape(key)
    for placeholder in ("LAYER/PARAM", "MODULE", r"\.\.\.", "<verdict>"):
        text = text.replace(re.escape(placeholder) if placeholder != r"\.\.\." else r"\.\.\.", ".+")
    text = re.sub(r"\\\{([^}]+)\\\}", lambda m: "(" + m.group(1).replace(",", "|") + ")", text)
    return re.compile(text)


def written_tags(logdir: str) -> set[tuple[str, str]]:
    """(tag, kind) of every tag in the event files under ``logdir``, less the Trainer's own."""
    tags: set[tuple[str, str]] = set()
    for path in glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True):
        accumulator = event_accumulator.EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        accumulator.Reload()
        for kind in ("scalars", "histograms", "tensors"):
            tags.update((tag, kind) for tag in accumulator.Tags()[kind])
    return {(t, kind) for t, kind in tags if not t.startswith(("train/", "args/", "model_config/"))}


class Net(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lightning_tags(tmp_path) -> set[str]:
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2), torch.randn(16, 1)), batch_size=4)
    lightning.Trainer(max_epochs=1, log_every_n_steps=2, gradient_clip_val=0.01, logger=TensorBoardLogger(str(tmp_path)),
                      callbacks=[GradflowCallback(verbose=False)], enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False).fit(Net(), data)
    return written_tags(str(tmp_path))


def transformers_tags(tmp_path) -> set[str]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8, bos_token_id=0, eos_token_id=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=2, per_device_train_batch_size=2,
                                          max_grad_norm=0.01, report_to=["tensorboard"], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 20, (8, 8))]
    transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=data,
                         callbacks=[GradflowTrainerCallback(verbose=False)]).train()
    return written_tags(str(tmp_path))


@pytest.mark.parametrize("callback, run", [(GradflowCallback, lightning_tags), (GradflowTrainerCallback, transformers_tags)])
def test_the_docstring_table_lists_what_is_written(tmp_path, callback, run):
    keys = table_keys(callback.__doc__)
    tags = run(tmp_path)
    unlisted = sorted((t, kind) for t, kind in tags if not any(pattern(k).fullmatch(t) and kind == was for k, was in keys))
    assert not unlisted, f"written but not in {callback.__name__}'s table: {unlisted}"
    unwritten = [k for k, was in keys
                 if k not in NOT_TENSORBOARD and not any(pattern(k).fullmatch(t) and kind == was for t, kind in tags)]
    assert not unwritten, f"in {callback.__name__}'s table but not written: {unwritten}"
