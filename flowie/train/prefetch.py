"""Training batches made ahead by DataLoader worker processes, handed out strictly in index order.

Every batch is a pure function of (stream, index), so prefetching changes no number of a run.
"""

from __future__ import annotations

import torch

from flowie.train.data import CropSampler


class BatchDataset(torch.utils.data.Dataset):
    """Batches start..stop-1 of one stream; each a pure function of its index, so workers change nothing."""

    def __init__(self, sampler: CropSampler, stream: int, start: int, stop: int, batch: int, degrade: bool):
        self.sampler, self.stream, self.start, self.stop = sampler, stream, start, stop
        self.batch, self.degrade = batch, degrade

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.batch(self.stream, self.start + k, self.batch, degrade=self.degrade)


class Prefetcher:
    """Batches made by ``workers`` DataLoader processes, handed out strictly in index order."""

    def __init__(self, sampler: CropSampler, stream: int, start: int, stop: int, batch: int, degrade: bool,
                 workers: int):
        dataset = BatchDataset(sampler, stream, start, stop, batch, degrade)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                             prefetch_factor=4, worker_init_fn=single_thread_worker)
        self.stream, self.degrade, self.next_index, self.stop = stream, degrade, start, stop
        self._iter = iter(loader)

    def serves(self, stream: int, index: int, degrade: bool) -> bool:
        return stream == self.stream and degrade == self.degrade and self.next_index <= index < self.stop

    def take(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        while True:  # skip ahead if a batch was not asked for (never in the training loop)
            clean, lq = next(self._iter)
            self.next_index += 1
            if self.next_index - 1 == index:
                return clean, lq


def single_thread_worker(_worker_id: int) -> None:
    """DataLoader workers use one thread each: the training process keeps the cores."""
    torch.set_num_threads(1)
