"""In-memory clips: the batch contract with no decoding, for benchmarks and engine tests.

A small pool of random ImageNet-normalized batches is made once on the target device and
cycled, so the input costs nothing and the batch at a given step is always the same. With
`num_classes`, every clip has a random label in [0, num_classes) (a classification
benchmark); without, labels are -1.
"""

from __future__ import annotations

import torch


class InMemoryClips:
    backend = "synthetic"

    def __init__(self, clips_per_batch: int, num_frames: int, image_size: int,
                 steps_per_epoch: int = 100, seed: int = 0, rank: int = 0, device=None,
                 pool_size: int = 4, start_step: int = 0, num_classes: int | None = None):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch {steps_per_epoch} must be >= 1")
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        shape = (clips_per_batch, 3, num_frames, image_size, image_size)
        self.pool = [torch.randn(shape, generator=g).to(device) for _ in range(pool_size)]
        self.labels = [torch.randint(0, num_classes, (clips_per_batch,), generator=g)
                       if num_classes else torch.full((clips_per_batch,), -1)
                       for _ in range(pool_size)]
        self.steps_per_epoch = steps_per_epoch
        self.start_step = start_step
        self.bad_samples = 0
        self.clips_per_batch = clips_per_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        n = self.clips_per_batch
        for step in range(self.start_step, self.steps_per_epoch):
            index = torch.arange(step * n, (step + 1) * n)
            yield {"video": self.pool[step % len(self.pool)], "label": self.labels[step % len(self.pool)],
                   "video_index": index, "view": torch.zeros(n, dtype=torch.long)}
