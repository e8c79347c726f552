"""The background producer that encode jobs decode clips on."""

from __future__ import annotations

import threading
import time

import pytest

from soraflow.core.background import prefetch


def test_items_arrive_in_order_made_ahead_on_another_thread():
    made = []

    def items():
        for i in range(6):
            made.append(threading.current_thread().name)
            yield i

    consumed = []
    for item in prefetch(items(), depth=2):
        time.sleep(0.02)  # the producer runs ahead while the consumer works
        consumed.append(item)
    assert consumed == list(range(6))
    assert set(made) == {"prefetch"}


def test_a_producer_error_is_raised_where_it_happened():
    def items():
        yield 1
        raise ValueError("clip 2 cannot be decoded")

    got = []
    with pytest.raises(ValueError, match="clip 2"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1]


def test_stopping_early_ends_the_producer():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    for item in prefetch(items(), depth=2):
        if item == 3:
            break
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]
    assert len(produced) <= 3 + 4  # at most depth + 2 made past the last item used
