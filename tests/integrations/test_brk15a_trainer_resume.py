"""GradflowTrainerCallback added only on resume (brk15a, the Lightning case's twin): the Hugging
Face Trainer restores ``state.global_step`` from the checkpoint before ``on_train_begin``, and the
callback labels its windows with that step, so they follow the Trainer's own logged steps."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_trainer_callback import Oracle, dataset, tiny_gpt2  # noqa: E402

from gradflow.integrations.transformers import GradflowTrainerCallback  # noqa: E402


def _trainer(tmp_path, callbacks, max_steps):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=max_steps,
                                          logging_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                                          save_strategy="steps", save_steps=4, disable_tqdm=True, seed=0)
    return transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=dataset(), callbacks=callbacks)


def test_a_callback_added_on_resume_labels_windows_by_the_trainers_step(tmp_path):
    _trainer(tmp_path, [], max_steps=4).train()
    callback, oracle = GradflowTrainerCallback(every_n_steps=2, verbose=False, log_dir=str(tmp_path / "tb")), Oracle()
    _trainer(tmp_path, [callback, oracle], max_steps=8).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert [w.step for w in callback.monitor.history] == [6, 8]
    assert [row["step"] for row in oracle.logged if "loss" in row] == [6, 8]
