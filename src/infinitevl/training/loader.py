"""The training data stream: epochs of packed rows, split over ranks, resumable at any step.

Each epoch shuffles the sample order with a generator seeded by (seed, epoch), packs it greedily
into rows of at most `budget` tokens, and deals the rows round-robin to the ranks: rank r gets rows
r, r + world, ... An optimizer step consumes `accum` rows per rank, so a step sees the same rows
whatever the split (1 process x accum 2 == 2 processes x accum 1). The position is just
(epoch, step in epoch): nothing random is carried, so a resumed run reads exactly the rows an
uninterrupted one would.

With `workers > 0` a pool of forked processes builds (decodes, tokenises, preprocesses) the samples
of the next `prefetch` steps while the model trains on the current one; the rows and their order do
not change, only who builds them.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from ..ops.rope import VisionTokens
from .data import BadSample, ChatDataset
from .packing import PackedBatch, pack, plan_rows


@dataclass
class LoaderState:
    epoch: int = 0
    step: int = 0  # optimizer steps taken within `epoch`


class RowLoader:
    def __init__(self, dataset: ChatDataset, vision_tokens: VisionTokens, *, budget: int, accum: int, seed: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True, workers: int = 0, prefetch: int = 4):
        if accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {accum}")
        if workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {workers}")
        self.dataset, self.vision_tokens = dataset, vision_tokens
        self.budget, self.accum, self.seed = budget, accum, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.state = LoaderState()
        self._plans: dict[int, list[list[int]]] = {}
        self.workers, self.prefetch = workers, max(1, prefetch)
        self._pool = None
        self._pending: dict[tuple[int, int], list] = {}

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

    def rows_in_epoch(self, epoch: int) -> int:
        return len(self._all_rows(epoch))

    def steps_in_epoch(self, epoch: int) -> int:
        return self.rows_in_epoch(epoch) // (self.world * self.accum)

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

    def _advance(self, state: LoaderState) -> LoaderState:
        """The position of the step that `state` points at (rolls over to the next epoch when one ends)."""
        if state.step >= self.steps_in_epoch(state.epoch):
            state = LoaderState(state.epoch + 1, 0)
            if self.steps_in_epoch(state.epoch) == 0:
                raise ValueError(
                    f"an epoch holds {len(self._all_rows(state.epoch))} packed rows, fewer than one step needs "
                    f"({self.world} ranks x grad_accum {self.accum}): lower grad_accum or row_tokens, or add data")
        return state

    def next_step(self) -> list[PackedBatch]:
        """The micro-batches of the next optimizer step for this rank (a row whose samples all failed to
        load is left out, so the list may be shorter than accum, even empty)."""
        self.state = self._advance(self.state)
        if self.workers:
            samples_per_row = self._prefetched_rows()
        else:
            rows = self.rows_for_step(self.state.epoch, self.state.step)
            samples_per_row = [[self.dataset.get(i) for i in row] for row in rows]
        batches = []
        for samples in samples_per_row:
            samples = [s for s in samples if s is not None]
            if samples:
                batches.append(pack(samples, self.vision_tokens))
        self.state = LoaderState(self.state.epoch, self.state.step + 1)
        return batches

    # ---- worker processes ----
    def _prefetched_rows(self) -> list[list]:
        if self._pool is None:
            # fork: the workers inherit the dataset (nothing pickled); they never touch CUDA. An executor, not
            # multiprocessing.Pool: Pool.terminate() can hang joining its task thread when an error (a bad
            # sample with on_bad_sample="error") leaves prefetched jobs queued; shutdown(cancel_futures) cannot.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"),
                                             initializer=_worker_init, initargs=(self.dataset,))
        here = (self.state.epoch, self.state.step)
        for key in [k for k in self._pending if k < here]:  # e.g. after load_state_dict
            del self._pending[key]
        pos = self.state
        for _ in range(self.prefetch):
            key = (pos.epoch, pos.step)
            if key not in self._pending:
                self._pending[key] = [[self._pool.submit(_worker_get_many, row[c:c + 4])
                                       for c in range(0, len(row), 4)] for row in self.rows_for_step(*key)]
            pos = self._advance(LoaderState(pos.epoch, pos.step + 1))
        out = []
        for job in self._pending.pop(here):
            samples = []
            for i, (kind, payload) in (item for chunk in job for item in chunk.result()):
                if kind == "bad":
                    self.dataset._skip(payload)  # raises for on_bad_sample="error", else counts it
                    samples.append(None)
                else:
                    s = pickle.loads(payload)
                    assert len(s) == self.dataset.lengths[i], (len(s), self.dataset.lengths[i], s.where)
                    samples.append(s)
            out.append(samples)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # running chunks are a few samples: short wait
            self._pool = None
            self._pending.clear()

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, d: dict) -> None:
        self.state = LoaderState(**d)
        self._pending.clear()


_DATASET: ChatDataset | None = None


def _worker_init(dataset: ChatDataset) -> None:
    global _DATASET
    _DATASET = dataset
    torch.set_num_threads(1)


def _worker_get_many(indices: list[int]) -> list:
    return [_worker_get(i) for i in indices]


def _worker_get(i: int):
    """(i, ("ok", pickled sample) | ("bad", BadSample)): plain pickle, so tensors travel by value
    (no shared-memory file descriptors piling up)."""
    try:
        return i, ("ok", pickle.dumps(_DATASET.fmt.build(_DATASET.records[i])))
    except BadSample as e:
        return i, ("bad", e)
