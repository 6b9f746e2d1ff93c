"""A sink that fails while a window is written (a user's Sink that raises, a TensorBoard run
directory deleted under the writer): log() says so in one MonitorError naming the sink and the
step, the window is still closed and kept, and the next window holds only its own steps.

Oracle: the number of optimizer steps run in each window (3), counted by the test."""

import contextlib
import shutil

import pytest
import torch
import torch.nn as nn

from gradflow import GradientMonitor
from gradflow.monitor.sinks import ScalarSink, Sink, TeeSink
from gradflow.monitor.tensors import MonitorError

STEPS = 3


class FailsOnce(Sink):
    """Raises at the window it is told to; keeps the steps of the windows it was given."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.steps = fail_at, []

    def log(self, scalars, histograms, step):
        if step == self.fail_at:
            raise OSError("No space left on device")
        self.steps.append(step)


def run_window(model, optimizer):
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        optimizer.step()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def test_a_sink_that_raises_closes_the_window_and_says_which_sink(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    later = []
    sink = TeeSink(FailsOnce(fail_at=1), ScalarSink(lambda scalars, step: later.append(step)))
    with GradientMonitor(model, sink) as monitor:
        for window in range(3):
            run_window(model, optimizer)
            if window == 1:
                with pytest.raises(MonitorError) as info:
                    monitor.log(window)
                message = str(info.value)
                assert "log(1)" in message and "FailsOnce" in message and "No space left on device" in message
                assert "\n" not in message
                assert isinstance(info.value.__cause__.__cause__, OSError)   # through the TeeSink's own
            else:
                monitor.log(window)
    assert [w.step for w in monitor.history] == [0, 1, 2]
    assert [w.gradients["0.weight"]["steps"] for w in monitor.history] == [STEPS] * 3   # not 3, 6
    assert later == [0, 1, 2]              # the tee's other sink got the window the first refused
    assert sink.sinks[0].steps == [0, 2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # TensorBoard's writer thread
def test_a_deleted_run_directory_is_one_monitor_error_and_the_window_is_kept(model, tmp_path):
    """TensorBoard's event writer fails in its own thread and says so at the next write: from
    then on each log() raises MonitorError, and each window still holds only its own steps."""
    from torch.utils.tensorboard import SummaryWriter

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = SummaryWriter(tmp_path / "run")
    monitor = GradientMonitor(model, writer, histograms=False)
    run_window(model, optimizer)
    monitor.log(0)
    writer.flush()
    shutil.rmtree(tmp_path / "run")
    for window in (1, 2):
        run_window(model, optimizer)
        try:
            monitor.log(window)
            writer.flush()                # the writer thread's failure, raised by torch itself
        except FileNotFoundError:
            pass
        except MonitorError as error:
            assert window == 2 or "SummaryWriter" in str(error)
    run_window(model, optimizer)
    with pytest.raises(MonitorError, match=r"log\(3\): writing the window to SummaryWriter failed: FileNotFoundError"):
        monitor.log(3)
    assert [w.step for w in monitor.history] == [0, 1, 2, 3]
    assert [w.gradients["0.weight"]["steps"] for w in monitor.history] == [STEPS] * 4
    monitor.remove()
    with contextlib.suppress(FileNotFoundError):   # TensorBoard's own writer thread: not gradflow's
        writer.close()
