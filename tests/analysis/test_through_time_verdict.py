"""The through-time verdict (gradflow/analysis/through_time.py) on windows with known profiles,
and on real runs of the recurrent configs (first_token at T=100)."""

from __future__ import annotations

import numpy as np
import pytest

from gradflow.analysis.diagnose import diagnose
from gradflow.analysis.through_time import TIME_ADVICE, check_through_time, measure_time, time_advice
from gradflow.monitor import Window

STUCK = [0.693] * 12                      # a loss that never moves
LEARNED = [0.69, 0.3] + [0.01] * 10        # one that learned


def windows(profile, cell="RNN_TANH", key="rnn_1.l0", count=12):
    grads = {"rnn_1.weight_hh_l0": {"mean_abs": 1e-3, "norm": 1e-2, "max_abs": 1e-2, "nonfinite": 0},
             "dense_2.weight": {"mean_abs": 1e-2, "norm": 1e-1, "max_abs": 1e-1, "nonfinite": 0}}
    return [Window(i, 32, gradients=grads, time={key: np.asarray(profile, dtype=float)}, time_cells={key: cell})
            for i in range(count)]


def test_vanishing_through_time_with_evidence_in_words():
    check = check_through_time(windows(np.logspace(-12, -1, 100)), {"first": 0.693, "tail": 0.693})
    assert check["verdict"] == "vanishing" and check["advice"] == "vanishing/rnn"
    assert "the gradient reaching time step 0 of rnn_1.l0 is 1e-11 of its largest" in check["why"]
    assert "it stays within 0.001 of it for 28 of 100 steps" in check["why"]
    assert check["value"] == pytest.approx(1e-11)


def test_reverse_direction_reads_from_the_end():
    check = check_through_time(windows(np.logspace(-1, -12, 100), key="gru_1.l0_reverse", cell="GRU"), None)
    assert check["verdict"] == "vanishing" and check["advice"] == "vanishing/gru"
    assert "time step 99 of gru_1.l0_reverse" in check["why"]


def test_a_net_that_learned_to_latch_is_a_note_not_a_verdict():
    profile = np.logspace(-30, -3, 50)
    d = diagnose(windows(profile), LEARNED)
    assert "vanishing" not in d.verdicts
    assert any("saturated units" in note for note in d.evidence["notes"])


def test_healthy_profile_is_not_vanishing():
    check = check_through_time(windows(np.linspace(0.01, 0.1, 100), cell="LSTM", key="lstm_1.l0"), None)
    assert not check["fired"] and check["verdict"] is None
    assert measure_time(windows(np.linspace(0.01, 0.1, 100)))["rnn_1.l0"]["horizon"] == 100


def test_exploding_through_time():
    check = check_through_time(windows(np.logspace(4, 0, 50), cell="RNN_RELU"), None)
    assert check["verdict"] == "exploding" and check["advice"] == "exploding/rnn"
    bad = windows(np.r_[np.nan, np.ones(9)])
    assert check_through_time(bad, None)["verdict"] == "exploding"


def test_only_late_windows_judge():
    early = windows(np.logspace(-20, -1, 100), cell="LSTM", key="lstm_1.l0", count=9)
    late = windows(np.linspace(0.01, 0.1, 100), cell="LSTM", key="lstm_1.l0", count=3)
    row = measure_time(early + late)["lstm_1.l0"]
    assert row["reach_early"] == pytest.approx(1e-19) and row["reach"] == pytest.approx(0.1)
    assert not check_through_time(early + late, None)["fired"]


def test_diagnose_folds_it_in_with_recurrent_advice_and_no_optimizer_advice():
    d = diagnose(windows(np.logspace(-12, -1, 100)), STUCK)
    assert d.verdicts[0] == "vanishing" and "through time" in d.line()
    assert d.recommendation.startswith(time_advice("vanishing/rnn"))
    assert "Adam" not in d.recommendation
    lstm = diagnose(windows(np.logspace(-12, -1, 100), cell="LSTM", key="lstm_1.l0"), STUCK)
    assert "forget-gate bias" in lstm.recommendation and "chrono" in lstm.recommendation
    assert all("Adam" not in text for text in TIME_ADVICE.values())


def test_no_recurrent_layer_leaves_diagnosis_alone():
    w = [Window(i, 10, gradients={"dense_1.weight": {"mean_abs": 0.1, "nonfinite": 0},
                                  "dense_2.weight": {"mean_abs": 0.1, "nonfinite": 0}}) for i in range(6)]
    check = check_through_time(w)
    assert not check["fired"] and check["layers"] == {}


def test_one_window_spike_is_a_note_not_exploding():
    steady = windows(np.linspace(0.5, 1.0, 100), cell="GRU", key="gru_1.l0")
    steady[6].time["gru_1.l0"] = np.logspace(4, 0, 100)
    check = check_through_time(steady, {"first": 0.69, "tail": 0.02})      # it learned and kept it
    assert check["verdict"] is None and "a spike, not the late median" in check["why"]


def test_a_spike_before_a_collapse_is_exploding():
    w = windows(np.linspace(0.001, 0.01, 100), cell="LSTM", key="lstm_1.l0")
    w[10].time["lstm_1.l0"] = np.linspace(5.0, 0.04, 100)          # 500x the usual largest
    collapsed = {"first": 0.69, "tail": 0.9}
    check = check_through_time(w, collapsed)
    assert check["verdict"] == "exploding" and "500x" in check["why"] and check["advice"] == "exploding/lstm"
    assert check_through_time(w, {"first": 0.69, "tail": 0.01})["verdict"] is None   # it learned: not judged
