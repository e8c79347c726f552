"""Running a producer on a background thread, a bounded number of items ahead of its consumer.

Encode jobs decode the next clips with ffmpeg (PyAV, which releases the GIL while it
decodes) while the accelerator encodes the current ones.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

_DONE = object()


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Yield the items of `items` in order, produced on a background thread at most `depth`
    items ahead (memory holds at most depth + 2: queued, being made, being used). An error in the producer is
    raised here, at the item where it happened."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry) -> bool:
        """Put `entry` once there is room; False when the consumer has stopped."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((_DONE, None))
        except BaseException as err:  # handed to the consumer, which raises it
            offer((_DONE, err))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early: let the producer finish
        thread.join()
