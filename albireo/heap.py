"""The cycle collector around an engine: what start-up built is taken out of its sight.

A full collection walks every container object the process holds. After start-up that is ~320k
objects (torch, transformers, the modules imported while the model loads, the model itself),
most of which live as long as the process: walking them took ~175 ms on a 2-core CPU, and on the
GPU machines W5's engine stalled for 10-30 ms every ~150 decode steps, the GPU idle meanwhile.
Frozen, they are skipped; refcounting still frees any of them that is dropped.
"""

from __future__ import annotations

import gc

# A step over ~1000 running requests allocates thousands of short-lived objects: at CPython's
# default threshold (700) the collector ran several times a step.
_YOUNGEST_THRESHOLD = 10_000


def settle() -> None:
    """Collect once, freeze what survives, and let the youngest generation grow before collecting."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, _YOUNGEST_THRESHOLD), gen1, gen2)


def release() -> None:
    """Give the frozen objects back to the collector: an engine that ends in a process that goes on
    (the offline LLM class) may hold reference cycles, and its GPU memory, that only it can free."""
    gc.unfreeze()
