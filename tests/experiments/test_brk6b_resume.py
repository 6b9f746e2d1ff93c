"""summary.json's ``seconds`` after ``--resume``: the run's training time, not only the last
process's. Resuming a finished run rewrote it from the run's seconds to 0.001 (a fresh
6-epoch run, then ``gradflow train --resume`` on it; brk6b). Oracle: the seconds the checkpointed
part took, as fit() measured them, plus what the resumed part took."""

from gradflow.experiments.config import load_config
from gradflow.experiments.data import load_dataset
from gradflow.experiments.models import build_model
from gradflow.experiments.train import fit


def test_resumed_seconds_add_to_the_checkpointed_ones():
    cfg = load_config("configs/shallow_tanh.yaml", ["train.epochs=4", "data.n_samples=200", "data.n_train=100"])
    data = load_dataset(cfg.data)
    states = []
    first = fit(build_model(cfg.model), data, cfg.optimizer, cfg.train, checkpoint=states.append)
    (state,) = states
    assert 0 < state["seconds"] <= first.seconds
    again = fit(build_model(cfg.model), data, cfg.optimizer, cfg.train, resume=state)       # nothing left to run
    assert again.epochs_run == 4 and state["seconds"] <= again.seconds < state["seconds"] + 1.0
    older = {k: v for k, v in state.items() if k != "seconds"}                               # a checkpoint of before
    assert fit(build_model(cfg.model), data, cfg.optimizer, cfg.train, resume=older).seconds < 1.0
