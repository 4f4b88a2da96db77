"""How an engine's processes tune the cycle collector.

A step over ~1000 running requests allocates thousands of short-lived objects: at CPython's
default threshold (700) the collector ran several times a step, so every engine process lets the
youngest generation grow to 10,000 first. A process that ends with its engine (a TP worker, the
server's engine-core process) also freezes what start-up built: full collections walked it all
(~320k objects after start-up, 175 ms on a 2-core CPU), and in a TP worker such a collection held
up every rank (W2 at TP=2 on two H200s: GPU idles of 92 and 107 ms, 12 ms at most once frozen).
The offline LLM class does not freeze: its engine shares the user's process, and a frozen engine
held in a reference cycle could never be collected, nor its GPU memory freed. (W5 on one H100
stalled as often with its engine frozen, or with the collector off, as without: its 10-30 ms
stalls are not the collector's.)
"""

from __future__ import annotations

import gc


def collect_less_often() -> None:
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 10_000), gen1, gen2)


def settle() -> None:
    """For a process that ends with its engine: collect once, freeze what survives, collect less often."""
    gc.collect()
    gc.freeze()
    collect_less_often()
