"""A 2-process gloo DDP Lightning fit with GradflowCallback (run by test_lightning_ddp.py).

    python tests/integrations/ddp_lightning_run.py OUT_DIR

Lightning's ddp strategy relaunches this script for rank 1. Each rank saves its oracle records
(p.grad in on_before_optimizer_step) and whether its callback attached to OUT_DIR/rank<k>.json.
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # test_lightning_callback, oracle_tools

import torch  # noqa: E402

torch.set_num_threads(1)

from test_lightning_callback import Net, Oracle, loader, pl  # noqa: E402

from gradflow.integrations.lightning import GradflowCallback  # noqa: E402

if __name__ == "__main__":
    out = sys.argv[1]
    torch.manual_seed(0)
    oracle, callback = Oracle(), GradflowCallback(every_n_steps=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp",
                         logger=pl.loggers.TensorBoardLogger(out, name="tb", version=0), callbacks=[oracle, callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), loader(n=32, batch=4))
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"records": oracle.records, "attached": callback.monitor is not None, "steps": callback.steps,
                   "windows": [w.step for w in callback.monitor.history] if callback.monitor else []}, f)
