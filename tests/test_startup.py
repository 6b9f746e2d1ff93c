"""gradflow.startup: the garbage collector off until the first epoch ends, and back as it was."""

import gc

import pytest

from gradflow.startup import StartupCollector, prepare_exit


@pytest.fixture
def collector_state():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if was else gc.disable)()


def frozen(obj) -> bool:
    """Whether ``obj`` sits in the permanent generation that ``gc.freeze()`` fills: there
    ``gc.get_objects()`` (the three collected generations) does not list it.

    ``gc.get_freeze_count()`` cannot tell: it counts every frozen object still alive, and it
    drops whenever one of them dies, which a thread left running by an earlier test (or by a
    library) does at any moment by letting go of something it held when the freeze came.
    """
    assert gc.is_tracked(obj)
    return not any(o is obj for o in gc.get_objects())


@pytest.mark.usefixtures("collector_state")
def test_off_until_the_first_epoch_then_frozen_then_restored():
    gc.enable()
    collector = StartupCollector()
    assert not gc.isenabled()
    made_before = []                                # tracked containers, as the imports make
    collector.epoch_end(0, {})
    assert gc.isenabled() and frozen(made_before)
    made_after = []
    collector.epoch_end(1, {})                      # only the first epoch freezes
    assert not frozen(made_after)
    collector.close()
    assert gc.isenabled() and not frozen(made_before) and gc.get_freeze_count() == 0


@pytest.mark.usefixtures("collector_state")
def test_a_run_that_fails_before_its_first_epoch_restores_the_collector():
    gc.enable()
    StartupCollector().close()
    assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.mark.usefixtures("collector_state")
def test_a_disabled_collector_stays_disabled():
    gc.disable()
    collector = StartupCollector()
    collector.epoch_end(0, {})
    assert not gc.isenabled()
    collector.close()
    assert not gc.isenabled()


@pytest.mark.usefixtures("collector_state")
def test_prepare_exit_freezes_every_object():
    prepare_exit()
    assert gc.get_freeze_count() > 0
