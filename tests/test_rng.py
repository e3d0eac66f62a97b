"""The counter-based randomness: one table of stream numbers, the values every draw is keyed on."""
from __future__ import annotations

import numpy as np

from ssl_distill.data.rng import Stream, counter_uniforms


def test_stream_numbers_are_distinct_and_unchanged() -> None:
    """Changing a number would change every draw of its consumer (crops, masks, resumed runs)."""
    assert {s.name: int(s) for s in Stream} == {
        "GEOMETRY": 1, "PHOTOMETRIC": 2, "SAMPLER": 3, "MASK_RATIO": 4, "MASK_SHAPE": 5, "OBJECT_CROPS": 6,
        "LINEAR_PROBE": 7, "ATTMASK": 0xA77,
    }


def test_streams_draw_different_numbers() -> None:
    seeds = [0, 1, 2**62 + 5]
    draws = [counter_uniforms(seeds, s, 0, 8) for s in Stream]
    assert not any(np.array_equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])
