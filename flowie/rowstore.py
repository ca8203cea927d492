"""An image that is written once, top to bottom, in row blocks and then read back in row ranges.

The streamed pipeline (:meth:`flowie.pipeline.Pipeline.run_streamed`) keeps its one
image-sized intermediate here: the SwinIR output, which the cond encoder reads right away and
the colour fix reads again after the flow and the decoder have run. Two backings, same bits:

- memory: a float32 tensor in host RAM. On a GPU this takes the image off the card, which then
  holds only tiles and latents;
- a spill file (``spill_dir``): rows go to an unlinked temporary file with ``pwrite`` and come
  back with ``pread``, so the image sits in the page cache (which the kernel may drop or write
  out) instead of the process's resident memory. For very large images on a CPU host. Put it on a
  disk, not a tmpfs: a tmpfs is RAM.

Pixels are stored interleaved ([H, W, C] float32), so a range of whole rows is one contiguous
read and a tile is one read per row.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch


class RowStore:
    """[1, C, H, W] float32 rows; :meth:`write` in order, :meth:`read` any range once written."""

    def __init__(self, channels: int, height: int, width: int, spill_dir: str | os.PathLike | None = None):
        if min(channels, height, width) <= 0:
            raise ValueError(f"RowStore needs positive sizes, got C={channels}, H={height}, W={width}")
        self.shape = (1, channels, height, width)
        self.written = 0  # rows [0, written) hold data
        self._pixel_bytes = channels * 4
        self._row_bytes = width * self._pixel_bytes
        self._fd: int | None = None
        self._memory: torch.Tensor | None = None
        if spill_dir is None:
            self._memory = torch.empty((height, width, channels), dtype=torch.float32)
        else:
            if not os.path.isdir(spill_dir):
                raise ValueError(f"spill directory {spill_dir!r} does not exist; create it or unset the spill setting")
            handle, path = tempfile.mkstemp(prefix="flowie-rows-", suffix=".f32", dir=spill_dir)
            os.unlink(path)  # nothing to clean up after a crash: the space is freed with the descriptor
            self._fd = handle

    @property
    def spilled(self) -> bool:
        return self._fd is not None

    def write(self, top: int, rows: torch.Tensor) -> None:
        """Store rows [top, top + n) from a [1, C, n, W] tensor (any device / float dtype)."""
        _, channels, height, width = self.shape
        if rows.ndim != 4 or rows.shape[0] != 1 or rows.shape[1] != channels or rows.shape[3] != width:
            raise ValueError(f"expected rows of shape [1, {channels}, n, {width}], got {tuple(rows.shape)}")
        if top != self.written:
            raise ValueError(f"rows must be written in order: next is {self.written}, got {top}")
        n = rows.shape[2]
        if top + n > height:
            raise ValueError(f"rows {top}..{top + n} run past the height {height}")
        packed = rows[0].detach().to("cpu", torch.float32).permute(1, 2, 0)  # [n, W, C]
        if self._memory is not None:
            self._memory[top:top + n] = packed
        else:
            assert self._fd is not None
            data = np.ascontiguousarray(packed.numpy())
            view, offset = memoryview(data).cast("B"), top * self._row_bytes
            while view:  # pwrite may write less than asked
                count = os.pwrite(self._fd, view, offset)
                view, offset = view[count:], offset + count
        self.written = top + n

    def read(self, top: int, bottom: int, left: int = 0, right: int | None = None) -> torch.Tensor:
        """Rows [top, bottom), columns [left, right), as a contiguous float32 CPU tensor [1, C, n, w]."""
        _, channels, _, width = self.shape
        right = width if right is None else right
        if not 0 <= top <= bottom <= self.written:
            raise ValueError(f"rows {top}..{bottom} are not stored (rows 0..{self.written} are)")
        if not 0 <= left <= right <= width:
            raise ValueError(f"columns {left}..{right} are outside 0..{width}")
        if self._memory is not None:
            packed = self._memory[top:bottom, left:right]
        else:
            packed = torch.from_numpy(self._pread(top, bottom, left, right))
        return packed.permute(2, 0, 1).unsqueeze(0).contiguous()

    def _pread(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        assert self._fd is not None
        channels, width = self.shape[1], self.shape[3]
        data = np.empty((bottom - top, right - left, channels), dtype=np.float32)
        if left == 0 and right == width:  # whole rows: one contiguous range of the file
            spans = [(memoryview(data).cast("B"), top * self._row_bytes)]
        else:
            spans = [(memoryview(data[i]).cast("B"), (top + i) * self._row_bytes + left * self._pixel_bytes)
                     for i in range(bottom - top)]
        for view, offset in spans:
            while view:  # pread may return less than asked
                count = os.preadv(self._fd, [view], offset)
                if count == 0:
                    raise OSError("the spill file is shorter than the rows written to it")
                view, offset = view[count:], offset + count
        return data

    def close(self) -> None:
        """Free the rows (the spill file's space or the RAM)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._memory = None

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()
