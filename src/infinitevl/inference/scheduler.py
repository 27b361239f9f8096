"""Continuous batching: requests join and leave one decode batch between steps.

Legend: P rows of the batch (the engine bucket it runs in), T prompt tokens, V vocab.

One background thread owns an `Engine` bucket of P rows. It takes waiting requests for the free rows (text
prompts together, up to PREFILL_GROUP, left-padded into a scratch state; a prompt with images or video alone)
and prefills them one chunk of about `prefill_chunk` tokens at a time, running one decode step for every live
row between two chunks, so that a long prompt delays the others' next tokens by one chunk, not by the whole
prompt (with no row decoding, in the engine's larger chunks). When the prompt is in, each first token is
sampled with the request's own parameters and each row's state copied into its batch row. A step (the
engine's captured step on a GPU: rows hold their own temperature / top-k / top-p) hands each row's new token to
its request and frees the rows that ended (a stop token, their token limit, or a cancel). A row's tokens are the
ones it gets alone: rows never see each other (GDN and SWA states are per row; idle rows are masked), and a
prompt's state does not depend on its chunks (up to float rounding).

A request's n choices (`submit_choices`) are prefilled once and decode in a row each.

A seeded sampling request runs alone (the batch drains first, and nothing joins it), so that its draws, and
so its answer, depend on its seed only (for a given `max_batch_size`: the draws are made for every row).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .engine import MAX_TOP_LOGPROBS, Engine, sample_rows, token_logprobs
from .request import prompt_inputs, whole_number
from .sampling import SamplingParams

_END = object()


class SchedulerClosed(ValueError):
    """The scheduler was closed before the request ended (or before it was submitted)."""


PREFILL_GROUP = 8  # text prompts prefilled together at most (the scratch state has this many rows)
PREFILL_CHUNK = 2048  # default tokens of prefill between two decode steps (split over the rows of a group)


@dataclass(eq=False)  # a request is itself: equal only to itself
class Ticket:
    """A submitted request: iterate it for its new token ids (the stop token included, when one ends it);
    `cancel()` frees its row at the next step. An error of the generation is raised by the iteration. With
    `logprobs`, `token_logprobs[i]` holds token i's entry once token i has been handed out."""

    input_ids: torch.Tensor
    vision: dict
    sampling: SamplingParams
    max_new_tokens: int
    seed: int | None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    solo: bool = False  # prefilled alone (set when its group failed, to find whose prompt it was)
    logprobs: int | None = None  # None: none; K: each token's log-probability and the K likeliest alternatives
    # (logprob, [(token id, logprob), ...K]) of each token, appended before the token is handed out
    token_logprobs: list = field(default_factory=list, repr=False)
    copies: list["Ticket"] = field(default_factory=list, repr=False)  # more choices of this prompt (submit's n):
    # prefilled once with it, each decoded in a row of its own

    def family(self) -> list["Ticket"]:
        return [self, *self.copies]

    @property
    def exclusive(self) -> bool:
        return self.seed is not None and self.sampling.temperature > 0

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class _Prefill:
    """The group being prefilled: its chunks (a generator over the scratch rows) and how many are left."""

    group: list[Ticket]
    chunks: Iterator[torch.Tensor]
    left: int
    logits: torch.Tensor | None = None


class Scheduler:
    """Serves submitted requests in one decode batch of `max_batch_size` rows on `engine`, which it then owns
    (do not generate with it elsewhere)."""

    def __init__(self, engine: Engine, *, stop_token_ids: list[int], max_batch_size: int = 8,
                 prefill_chunk: int = PREFILL_CHUNK):
        """prefill_chunk: tokens of prefill between two decode steps; smaller keeps the rows in flight
        smoother while a long prompt comes in, larger prefills faster."""
        self.engine = engine
        self.P = whole_number(max_batch_size, "max_batch_size", 1)
        self.prefill_chunk = whole_number(prefill_chunk, "prefill_chunk", 1)
        self.stops = list(stop_token_ids)
        engine.bucket(self.P)  # max_batch_size within the engine's
        # every step kind captured now: capturing later would reset the rows in flight
        self.slot = engine._slot(self.P, "greedy")
        for kind in ("sample", "greedy:logprobs", "sample:logprobs"):
            engine._slot(self.P, kind)
        self.slot.owner = self  # any other generation on this engine's bucket is refused
        self.slot.state.reset()
        self.slot.done.fill_(True)
        self.slot.stops.fill_(-1)
        if self.stops:
            self.slot.stops[: len(self.stops)] = torch.tensor(self.stops, device=engine.device)
        self.scratch = engine.model.new_state(min(self.P, PREFILL_GROUP))
        self.rows: list[Ticket | None] = [None] * self.P
        self.counts = [0] * self.P
        self.waiting: deque[Ticket] = deque()
        self.pending: _Prefill | None = None
        self.wake = threading.Condition()
        self.closed = False
        # seconds spent (host clock, the device synchronised by each step's token read) and counts, for monitoring
        self.stats = {"prefills": 0, "prefill_chunks": 0, "prefill_s": 0.0, "steps": 0, "step_s": 0.0,
                      "row_steps": 0}
        self.thread = threading.Thread(target=self._run, name="infinitevl-scheduler", daemon=True)
        self.thread.start()

    def submit(self, input_ids_BT: torch.Tensor, *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               seed: int | None = None, logprobs: int | None = None, **vision) -> Ticket:
        """Queues one prompt ([1, T] ids and its vision inputs); checked here (a ValueError names the problem).
        logprobs=K (0..MAX_TOP_LOGPROBS) records each new token's log-probability and its K likeliest
        alternatives in `Ticket.token_logprobs`."""
        return self.submit_choices(input_ids_BT, n=1, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                   logprobs=logprobs, **vision)[0]

    def submit_choices(self, input_ids_BT: torch.Tensor, *, n: int, max_new_tokens: int,
                       sampling: SamplingParams = SamplingParams(), seed: int | None = None,
                       logprobs: int | None = None, **vision) -> list[Ticket]:
        """`submit` for n answers to one prompt: it is prefilled once, then each answer decodes in its own row
        (n <= max_batch_size). With a seed (and sampling), the n answers draw together from it, alone in the
        batch."""
        n = whole_number(n, "n", 1)
        if n > self.P:
            raise ValueError(f"{n} choices need {n} rows: at most max_batch_size={self.P}")
        ids, mask, vision = prompt_inputs(input_ids_BT, None, vision)
        if ids.shape[0] != 1:
            raise ValueError(f"submit takes one prompt ([1, T] ids), got {ids.shape[0]} rows: submit each")
        self.engine._check_request(ids, mask, None, sampling, self.stops, 0, None)
        if seed is not None:
            seed = whole_number(seed, "seed", 0)
        if logprobs is not None:
            logprobs = whole_number(logprobs, "logprobs", 0)
            if logprobs > MAX_TOP_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got "
                                 f"{logprobs}")
        max_new_tokens = whole_number(max_new_tokens, "max_new_tokens", 1)
        tickets = [Ticket(ids, vision, sampling, max_new_tokens, seed, logprobs=logprobs) for _ in range(n)]
        ticket = tickets[0]
        ticket.copies = tickets[1:]
        with self.wake:
            if self.closed:
                raise SchedulerClosed("this scheduler was closed: make a new one")
            self.waiting.append(ticket)
            self.wake.notify()
        return tickets

    def status(self) -> dict:
        """Rows in use, requests waiting, and the time/count stats: for health checks and monitoring."""
        with self.wake:
            busy, waiting, closed = sum(t is not None for t in self.rows), len(self.waiting), self.closed
            pending = self.pending
        return {"closed": closed or not self.thread.is_alive(), "rows": self.P, "busy_rows": busy,
                "prefilling": 0 if pending is None else len(pending.group), "waiting": waiting,
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in self.stats.items()}}

    def close(self) -> None:
        """Ends the generations in flight and the waiting ones (their iteration raises), then the thread."""
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the scheduler thread ----
    def _tickets(self) -> list[Ticket]:
        """Every request not ended: in rows, being prefilled, waiting (with their copies)."""
        pending = [] if self.pending is None else self.pending.group
        return [t for t in self.rows if t is not None] + [c for t in pending + list(self.waiting) for c in t.family()]

    def _fail_all(self, error: Exception) -> None:
        with self.wake:
            self.closed = True
            for t in self._tickets():
                t.out.put(error)
            self.waiting.clear()
            self.pending = None
            self.rows = [None] * self.P

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug or a broken device: fail every request rather than hang them
            self._fail_all(SchedulerClosed(f"the scheduler stopped ({type(e).__name__}: {e})"))
            raise

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not any(self.rows) and self.pending is None and not self.closed:
                    self.wake.wait()
                if self.closed:
                    break
            if self.pending is None:
                self._begin()
            if self.pending is not None:
                self._advance()
            if any(self.rows):
                self._step()
        self._fail_all(SchedulerClosed("the scheduler was closed before this request ended"))

    def _take(self) -> list[Ticket]:
        """The waiting requests to start now, in order: text prompts together (as many as there are free rows,
        at most PREFILL_GROUP), a prompt with vision inputs, one longer than prefill_chunk or a seeded sampling
        request alone."""
        group: list[Ticket] = []
        with self.wake:
            busy = [t for t in self.rows if t is not None]
            free = self.P - len(busy)  # rows for the group's requests and their copies
            if any(t.exclusive for t in busy):
                return group
            while self.waiting and len(group) < PREFILL_GROUP:
                head = self.waiting[0]
                if all(t.cancelled.is_set() for t in head.family()):
                    for t in self.waiting.popleft().family():
                        t.out.put(_END)
                    continue
                if len(head.family()) > free:
                    break
                alone = (head.exclusive or head.solo or any(v is not None for v in head.vision.values())
                         or head.input_ids.shape[1] > self.prefill_chunk)  # padding others to it would waste chunks
                if alone and (group or (head.exclusive and busy)):
                    break
                group.append(self.waiting.popleft())
                free -= len(head.family())
                if alone:
                    break
        return group

    def _begin(self) -> None:
        """Takes the next group and sets up its prefill (left-padded into the scratch rows)."""
        group = self._take()
        if group:
            try:
                self._setup(group)
            except Exception as e:
                self._failed(group, e)

    def _failed(self, group: list[Ticket], error: Exception) -> None:
        """A group whose prefill failed (none of it was handed out): a lone request gets the error; a group's
        requests are retried alone, at the front of the queue, to find whose prompt it was."""
        if len(group) == 1:
            for t in group[0].family():
                t.out.put(error)
            return
        with self.wake:
            for t in reversed(group):
                t.solo = True
                self.waiting.appendleft(t)

    def _setup(self, group: list[Ticket]) -> None:
        k = len(group)
        scratch = self.scratch.rows(0, k)
        scratch.reset()
        if k == 1:
            ids, mask = group[0].input_ids, None
        else:
            T = max(t.input_ids.shape[1] for t in group)
            ids = torch.zeros(k, T, dtype=torch.long)
            mask = torch.zeros(k, T, dtype=torch.long)
            for j, t in enumerate(group):
                L = t.input_ids.shape[1]
                ids[j, T - L:] = t.input_ids[0].cpu()
                mask[j, T - L:] = 1
        vision = {key: v for key, v in group[0].vision.items() if v is not None} if k == 1 else {}
        # With rows decoding, about prefill_chunk tokens a chunk; with none, the engine's chunks (larger: fewer
        # forwards; a forward of a few hundred tokens costs more host time than GPU time). A fresh scratch is fed
        # in ceil(T / chunk) chunks.
        live = any(t is not None for t in self.rows)
        chunk = max(1, self.prefill_chunk // k) if live else self.engine.prefill_chunk_size
        chunks = self.engine._prefill_chunks(ids, state=scratch, attention_mask_BT=mask, chunk_size=chunk, **vision)
        self.pending = _Prefill(group, chunks, left=-(-ids.shape[1] // chunk))

    @torch.no_grad()
    def _advance(self) -> None:
        """Feeds the pending group's next chunk; after its last, starts the group's rows."""
        p = self.pending
        if all(t.cancelled.is_set() for head in p.group for t in head.family()):
            self.pending = None
            for head in p.group:
                for t in head.family():
                    t.out.put(_END)
            return
        t0 = time.perf_counter()
        try:
            logits = next(p.chunks, None)
            if logits is not None:
                p.logits, p.left = logits, p.left - 1
                self.stats["prefill_chunks"] += 1
            if logits is None or p.left <= 0:
                self.pending = None
                self._start(p.group, p.logits)
        except Exception as e:  # a request's own failure (e.g. its prompt): find whose, the others go on
            self.pending = None
            self._failed(p.group, e)
        finally:
            if self.engine.device.type == "cuda":  # the chunk's GPU time, not the next step's
                torch.cuda.synchronize(self.engine.device)
            self.stats["prefill_s"] += time.perf_counter() - t0

    def _start(self, group: list[Ticket], logits: torch.Tensor) -> None:
        """Samples each first token of the prefilled group (and of each request's copies, from the same logits)
        with its own parameters, and moves the requests that go on into free batch rows (their states from the
        scratch rows)."""
        slot = self.slot
        members = [(j, t) for j, head in enumerate(group) for t in head.family()]  # (scratch row, request)
        rows = [i for i, t in enumerate(self.rows) if t is None][: len(members)]  # taken with room for them all
        self.stats["prefills"] += len(group)
        firsts = []  # every first token before any is handed out: a failure here leaves nothing half-done
        for (j, t), i in zip(members, rows):
            slot.temperature[i] = t.sampling.temperature
            slot.top_k[i] = t.sampling.top_k
            slot.top_p[i] = t.sampling.top_p
            if t.exclusive and t is group[j]:  # a seeded sampling request (alone in the batch with its copies)
                torch.manual_seed(t.seed)
            firsts.append(int(sample_rows(logits[j:j + 1], slot.temperature[i:i + 1], slot.top_k[i:i + 1],
                                          slot.top_p[i:i + 1])[0]))
        entries = [self._first_logprobs(logits[j], token, t.logprobs) if t.logprobs is not None else None
                   for (j, t), token in zip(members, firsts)]
        goes_on = [not t.cancelled.is_set() and token not in self.stops and t.max_new_tokens > 1
                   for (_, t), token in zip(members, firsts)]
        try:  # every device write before any token is handed out: a failure leaves nothing half-done
            for k, ((j, _), i) in enumerate(zip(members, rows)):
                if goes_on[k]:
                    slot.state.rows(i, i + 1).copy_(self.scratch.rows(j, j + 1))
                    slot.tok[i] = firsts[k]
                    slot.done[i] = False
        except Exception:
            try:
                slot.done[rows] = True
            except Exception:
                pass  # a broken device: the step fails next and ends the rows in flight
            raise
        for k, ((_, t), i, token) in enumerate(zip(members, rows, firsts)):
            if t.cancelled.is_set() and not goes_on[k]:  # cancelled while its prompt went in
                t.out.put(_END)
                continue
            if entries[k] is not None:
                t.token_logprobs.append(entries[k])
            t.out.put(token)
            if goes_on[k]:
                self.rows[i], self.counts[i] = t, 1
            else:
                t.out.put(_END)

    @staticmethod
    def _first_logprobs(logits_V: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        """A first token's logprobs entry (from the prefill's logits), as the steps record them."""
        dev = logits_V.device
        lp = torch.zeros(1, device=dev)
        ids = torch.zeros(1, MAX_TOP_LOGPROBS, dtype=torch.long, device=dev)
        top = torch.zeros(1, MAX_TOP_LOGPROBS, device=dev)
        token_logprobs(logits_V[None], torch.tensor([token], device=dev), lp, ids, top)
        return float(lp[0]), list(zip(ids[0, :k].tolist(), top[0, :k].tolist()))

    @torch.no_grad()
    def _step(self) -> None:
        live = [t for t in self.rows if t is not None]
        kind = "greedy" if all(t.sampling.temperature == 0 for t in live) else "sample"
        with_logprobs = any(t.logprobs is not None for t in live)
        kind += ":logprobs" if with_logprobs else ""
        t0 = time.perf_counter()
        try:
            self.slot.steps[kind]()
            tokens = self.slot.tok.tolist()
            if with_logprobs:
                lps, ids, tops = (x.tolist() for x in (self.slot.logprob, self.slot.top_ids, self.slot.top_logprobs))
            self.stats["steps"] += 1
            self.stats["row_steps"] += len(live)
            self.stats["step_s"] += time.perf_counter() - t0
        except Exception as e:  # the batch cannot go on: every request in it gets the error
            for i, t in enumerate(self.rows):
                if t is not None:
                    t.out.put(e)
                    self._free(i)
            return
        for i, t in enumerate(self.rows):
            if t is None:
                continue
            self.counts[i] += 1
            if t.logprobs is not None:
                t.token_logprobs.append((lps[i], list(zip(ids[i][: t.logprobs], tops[i][: t.logprobs]))))
            t.out.put(tokens[i])
            if tokens[i] in self.stops or self.counts[i] >= t.max_new_tokens or t.cancelled.is_set():
                t.out.put(_END)
                self._free(i)

    def _free(self, i: int) -> None:
        self.rows[i] = None
        self.slot.done[i] = True
