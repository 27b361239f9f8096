"""The training data stream: epochs of packed rows, split over ranks, resumable at any step.

Each epoch shuffles the sample order with a generator seeded by (seed, epoch), packs it greedily
into rows of at most `budget` tokens, and deals the rows round-robin to the ranks: rank r gets rows
r, r + world, ... An optimizer step consumes `accum` rows per rank, so a step sees the same rows
whatever the split (1 process x accum 2 == 2 processes x accum 1). The position is just
(epoch, step in epoch): nothing random is carried, so a resumed run reads exactly the rows an
uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..ops.rope import VisionTokens
from .data import ChatDataset
from .packing import PackedBatch, pack, plan_rows


@dataclass
class LoaderState:
    epoch: int = 0
    step: int = 0  # optimizer steps taken within `epoch`


class RowLoader:
    def __init__(self, dataset: ChatDataset, vision_tokens: VisionTokens, *, budget: int, accum: int, seed: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True):
        if accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {accum}")
        self.dataset, self.vision_tokens = dataset, vision_tokens
        self.budget, self.accum, self.seed = budget, accum, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.state = LoaderState()
        self._plans: dict[int, list[list[int]]] = {}

    def _all_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            self._plans = {epoch: plan_rows(order, self.dataset.lengths, self.budget)}
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self._all_rows(epoch)) // (self.world * self.accum)

    def total_steps(self, epochs: float) -> int:
        """Steps in `epochs` epochs (a fraction takes that share of the last epoch's steps)."""
        whole, frac = int(epochs), epochs - int(epochs)
        n = sum(self.steps_in_epoch(e) for e in range(whole))
        if frac:
            n += int(frac * self.steps_in_epoch(whole))
        return n

    def rows_for_step(self, epoch: int, step: int) -> list[list[int]]:
        rows = self._all_rows(epoch)
        first = step * self.accum * self.world
        return [rows[first + k * self.world + self.rank] for k in range(self.accum)]

    def next_step(self) -> list[PackedBatch]:
        """The micro-batches of the next optimizer step for this rank (a row whose samples all failed to
        load is left out, so the list may be shorter than accum, even empty)."""
        if self.state.step >= self.steps_in_epoch(self.state.epoch):
            self.state = LoaderState(self.state.epoch + 1, 0)
            if self.steps_in_epoch(self.state.epoch) == 0:
                raise ValueError(
                    f"an epoch holds {len(self._all_rows(self.state.epoch))} packed rows, fewer than one step needs "
                    f"({self.world} ranks x grad_accum {self.accum}): lower grad_accum or row_tokens, or add data")
        batches = []
        for row in self.rows_for_step(self.state.epoch, self.state.step):
            samples = [s for s in (self.dataset.get(i) for i in row) if s is not None]
            if samples:
                batches.append(pack(samples, self.vision_tokens))
        self.state = LoaderState(self.state.epoch, self.state.step + 1)
        return batches

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = LoaderState(**d)
