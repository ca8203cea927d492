"""A bounded set of captures by key: the warm-up's kept for good, the rest in a small LRU.

Each CUDA graph holds its static input and output buffers and a share of the graph memory pool,
so a stage that captured one graph per shape it ever saw would grow with every new image size.
:class:`CaptureCache` keeps what was captured during a warm-up (between :meth:`start_warmup` and
:meth:`end_warmup`) for good, plus at most ``size`` more, dropping the least recently used; with
``size`` 0, shapes outside the warm-up's set run eagerly.
Pure bookkeeping: the capture itself is the callable passed to :meth:`CaptureCache.get`, so this
is tested without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Capture = TypeVar("Capture")


class CaptureCache(Generic[Capture]):
    """``get(key, capture)`` -> the capture for ``key`` (``capture()`` on first use), or None: run eagerly."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"a capture cache holds 0 or more entries, not {size}")
        self.size = size
        self.pinned: dict[Hashable, Capture] = {}
        self.recent: OrderedDict[Hashable, Capture] = OrderedDict()
        self.captures = 0  # captures made, dropped ones included
        self._warming = False

    def get(self, key: Hashable, capture: Callable[[], Capture]) -> Capture | None:
        if key in self.pinned:
            return self.pinned[key]
        if self._warming:
            if key in self.recent:
                self.pinned[key] = self.recent.pop(key)
            else:
                self.pinned[key] = capture()
                self.captures += 1
            return self.pinned[key]
        if key in self.recent:
            self.recent.move_to_end(key)
            return self.recent[key]
        if self.size == 0:
            return None
        if len(self.recent) >= self.size:
            self.recent.popitem(last=False)  # its buffers go with it
        self.recent[key] = capture()
        self.captures += 1
        return self.recent[key]

    def start_warmup(self) -> None:
        """Captures from now on are kept for good (the shapes a warm-up runs)."""
        self._warming = True

    def end_warmup(self) -> None:
        """Later captures go to the LRU of ``size``."""
        self._warming = False

    def __len__(self) -> int:
        return len(self.pinned) + len(self.recent)
