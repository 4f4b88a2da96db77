"""The engine takes what start-up built out of the cycle collector's sight, and gives it back when
it ends in a process that goes on."""

import gc

import pytest

from albireo import LLM, heap


@pytest.fixture
def restore_collector():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_the_heap_and_collects_the_youngest_generation_less_often(restore_collector):
    gc.unfreeze()
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] >= 10_000


def test_an_in_process_engine_keeps_its_heap_frozen_until_shutdown(tiny_model, restore_collector):
    gc.unfreeze()
    llm = LLM(tiny_model("llama"))
    assert gc.get_freeze_count() > 0
    llm.engine.shutdown()
    assert gc.get_freeze_count() == 0


def test_an_engine_dropped_without_shutdown_gives_its_heap_back(tiny_model, restore_collector):
    gc.unfreeze()
    llm = LLM(tiny_model("llama"))
    assert gc.get_freeze_count() > 0
    del llm  # no reference cycle holds the client: refcounting frees it and its finalizer runs
    assert gc.get_freeze_count() == 0
