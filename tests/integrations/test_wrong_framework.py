"""One framework's gradflow callback handed to the other framework fails at once, with one line
naming the right class and its import (real Lightning and transformers Trainers; tiny models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402
from gradflow.integrations.transformers import GradflowTrainerCallback  # noqa: E402


class Net(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def hf_trainer(tmp_path, callbacks):
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 20, (4, 8))]
    return transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=data,
                                callbacks=callbacks)


def test_the_trainer_callback_in_lightning_names_gradflow_callback(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    trainer = lightning.Trainer(max_epochs=1, callbacks=[GradflowTrainerCallback()], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=str(tmp_path))
    with pytest.raises(TypeError) as raised:
        trainer.fit(Net(), data)
    message = str(raised.value)
    assert "\n" not in message and "GradflowTrainerCallback is for the Hugging Face Trainer" in message
    assert "from gradflow.integrations.lightning import GradflowCallback" in message


def test_the_lightning_callback_in_the_hf_trainer_names_gradflow_trainer_callback(tmp_path):
    with pytest.raises(TypeError) as raised:
        hf_trainer(tmp_path, [GradflowCallback()])
    message = str(raised.value)
    assert "\n" not in message and "GradflowCallback is for Lightning" in message
    assert "from gradflow.integrations.transformers import GradflowTrainerCallback" in message


def test_the_lightning_callback_added_to_the_hf_trainer_later_fails_at_train_begin(tmp_path):
    trainer = hf_trainer(tmp_path, None)
    trainer.add_callback(GradflowCallback())
    with pytest.raises(TypeError, match="GradflowCallback is for Lightning.*import GradflowTrainerCallback"):
        trainer.train()
