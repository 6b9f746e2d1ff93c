"""The TensorBoard sink: fast checksums identical to TensorBoard's own, one event per window."""

import os

import pytest

from gradflow.monitor.sinks import Histogram, TensorBoardSink, _masked_crc32c


@pytest.mark.parametrize("size", [0, 1, 7, 100, 65_537], ids=["empty", "byte", "odd", "small", "large"])
def test_fast_checksum_equals_tensorboards_pure_python_one(size):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = os.urandom(size)
    assert _masked_crc32c(data) == masked_crc32c(data)


def test_one_window_is_one_readable_event(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        sink = TensorBoardSink(writer)
        histogram = Histogram(limits=[0.5, 1.0], counts=[0.0, 3.0], min=0.5, max=1.0, num=3.0, sum=2.25, sum_squares=1.7)
        sink.log({"grad/dense_1/weight/norm": 0.25, "grad/dense_1/weight/max_abs": 0.5},
                 {"grad/dense_1/weight": histogram}, step=7)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert [e.value for e in events.Scalars("grad/dense_1/weight/norm")] == [0.25]
    (point,) = events.Histograms("grad/dense_1/weight")
    assert point.step == 7 and point.histogram_value.num == 3.0
