"""GradflowCallback added only on resume (brk15a): the checkpoint was made without this callback's
state (its first fit had no GradflowCallback), so no ``load_state_dict`` runs; and at
``on_fit_start`` Lightning has not restored the loops yet (``trainer.global_step`` reads 0 there).
The windows were labelled from 0 (4, 8) where the trainer was at steps 12 and 16; the oracle is
the trainer's own ``global_step`` after each batch."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_brk14a_lightning_second_fit import Net, loader, quiet

pl = pytest.importorskip("lightning.pytorch")


class Steps(pl.Callback):
    """The trainer's global_step after each batch (the oracle of a window's label)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.seen.append(trainer.global_step)


def _fit(tmp_path, callbacks, ckpt_path=None, epochs=1):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=str(tmp_path), max_epochs=epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("first", [lambda: [], lambda: [Steps()]], ids=["no-callback", "another-callback"])
def test_a_callback_added_on_resume_labels_windows_by_the_trainers_step(tmp_path, first):
    torch.manual_seed(0)
    trainer = _fit(tmp_path, first())
    assert trainer.global_step == 8
    callback, steps = quiet(), Steps()
    _fit(tmp_path, [callback, steps], ckpt_path=trainer.checkpoint_callback.best_model_path, epochs=2)
    assert steps.seen == list(range(9, 17))
    assert [w.step for w in callback.monitor.history] == [12, 16] and callback.steps == 16
    assert len(callback.losses) == 2


def test_a_new_fit_with_no_checkpoint_still_starts_at_zero(tmp_path):
    torch.manual_seed(0)
    callback = quiet()
    _fit(tmp_path, [callback])
    assert [w.step for w in callback.monitor.history] == [4, 8] and callback.steps == 8
