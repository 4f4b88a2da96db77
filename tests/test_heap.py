"""How engine processes tune the cycle collector."""

import gc

from albireo import LLM, heap


def test_a_process_that_ends_with_its_engine_freezes_its_heap_and_collects_less_often():
    threshold = gc.get_threshold()
    try:
        heap.settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] >= 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_the_offline_engine_collects_less_often_but_freezes_nothing(tiny_model):
    threshold = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        llm = LLM(tiny_model("llama"))
        assert gc.get_threshold()[0] >= 10_000
        assert gc.get_freeze_count() == 0
        llm.engine.shutdown()
    finally:
        gc.set_threshold(*threshold)
