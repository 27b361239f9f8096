"""Inference engine: chunked prefill on the explicit state, then decode steps captured whole (every layer,
sampling and stop tracking) in one CUDA graph per batch bucket. On CPU the same steps run eagerly.

Legend: B batch (requests), P bucket (B rounded up to a captured size), T prompt tokens, V vocab,
S stop-token slots.

Each bucket owns a `_Slot`: its InferenceState and the small tensors the decode step reads and writes
(current token, done flags, stop ids, sampling parameters), allocated once, so that the step has
static shapes and addresses. Rows B..P-1 of a bucket are idle: marked done, masked, never touched.
A done row is masked like the reference loop (`generate.generate`) masks it: its state stays as it was
after its last real token, and it emits `pad_token_id`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..layers.fuse import linear
from ..model.infinitevl import VISION_KEYS, InfiniteVL
from ..model.state import InferenceState
from .cuda_graph import CapturedStep, EagerStep
from .generate import prompt_chunks
from .request import check_rows, check_state, decode_options, prompt_inputs, request_options, whole_number
from .sampling import MIN_TEMPERATURE, SamplingParams

MAX_STOP_TOKENS = 16
MAX_TOP_LOGPROBS = 20  # alternatives a step with log-probabilities records per row (OpenAI's top_logprobs limit)
BEGIN_OPTIONS = ("sampling", "stop_token_ids", "pad_token_id", "prefill_chunk_size")  # begin's keywords besides the prompt


def sample_rows(
    logits_PV: torch.Tensor, temperature_P: torch.Tensor, top_k_P: torch.Tensor, top_p_P: torch.Tensor
) -> torch.Tensor:
    """Per-row sampling with parameters held in tensors (so one captured graph serves any values),
    without host syncs. temperature 0 = greedy, top_k 0 = off, top_p 1 = off. Same distribution as
    `sampling.sample`: top-k, then top-p on what is left, then a draw (argmax of probs / Exponential(1))."""
    P, V = logits_PV.shape
    greedy = logits_PV.argmax(-1)
    logits = logits_PV.float() / temperature_P.clamp(min=MIN_TEMPERATURE)[:, None]
    sorted_l, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k_P > 0, top_k_P, V)[:, None]
    sorted_l = sorted_l.masked_fill(rank >= k, float("-inf"))
    p = sorted_l.softmax(-1)
    # drop a token when the tokens before it already reach top_p (the first always stays)
    sorted_l = sorted_l.masked_fill((p.cumsum(-1) - p) >= top_p_P[:, None], float("-inf"))
    probs = sorted_l.softmax(-1)
    pick = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)
    sampled = order.gather(-1, pick)[:, 0]
    return torch.where(temperature_P == 0, greedy, sampled)


def token_logprobs(logits_PV: torch.Tensor, token_P: torch.Tensor, logprob_P: torch.Tensor, top_ids_PK: torch.Tensor,
                   top_logprobs_PK: torch.Tensor) -> None:
    """Writes each row's log-probability of `token_P` and its K likeliest tokens with theirs (K = the outputs'
    width), under the model's distribution (float32 log-softmax of the logits, before temperature and top-k/p,
    as OpenAI and vLLM report them). No host syncs."""
    lp = logits_PV.float().log_softmax(-1)
    logprob_P.copy_(lp.gather(-1, token_P[:, None])[:, 0])
    values, ids = lp.topk(top_ids_PK.shape[1], dim=-1)
    top_ids_PK.copy_(ids)
    top_logprobs_PK.copy_(values)


@dataclass
class _Slot:
    state: InferenceState
    tok: torch.Tensor  # [P] long: the token the next step feeds; the step writes the new token here
    done: torch.Tensor  # [P] bool
    live: torch.Tensor  # [P, 1] long: 1 where the row still generates (the step's attention mask)
    stops: torch.Tensor  # [S] long, -1 = unused
    pad: torch.Tensor  # [] long
    temperature: torch.Tensor  # [P] float32
    top_k: torch.Tensor  # [P] long
    top_p: torch.Tensor  # [P] float32
    logprob: torch.Tensor  # [P] float32: the new token's log-probability (steps of a ":logprobs" kind write it)
    top_ids: torch.Tensor  # [P, MAX_TOP_LOGPROBS] long: the likeliest tokens, best first (idem)
    top_logprobs: torch.Tensor  # [P, MAX_TOP_LOGPROBS] float32: their log-probabilities (idem)
    # "greedy" | "sample", optionally + ":logprobs" -> captured (or eager) step
    steps: dict = field(default_factory=dict)
    owner: object = None  # the Decoding that runs in this slot now (a later begin takes the slot over)


@dataclass
class Decoding:
    """A generation in progress: the bucket it runs in and its first `rows.batch_size` rows."""

    slot: _Slot
    kind: str
    rows: InferenceState
    stops: torch.Tensor  # CPU, for the host-side stop check
    first: torch.Tensor  # [B] the token sampled from the prefill logits


class Engine:
    """Generation over token ids on one model: `prefill` (chunks of any size, continuing a state),
    `stream` (yields each new token column as it is produced) and `generate` (all of them)."""

    def __init__(
        self,
        model: InfiniteVL,
        *,
        max_batch_size: int = 1,
        backend: str | None = "auto",
        cuda_graph: bool | None = None,
        prefill_chunk_size: int = 8192,
        fuse_projections: bool | None = None,
    ):
        """cuda_graph / fuse_projections: None = on with the fast GPU backend. Fusing rebinds the decoder's
        projection weights as views of fused tensors (see InfiniteVL.fuse_projections)."""
        max_batch_size = whole_number(max_batch_size, "max_batch_size", 1)
        prefill_chunk_size = whole_number(prefill_chunk_size, "prefill_chunk_size", 1)
        self.device = model.lm_head.weight.device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device (it is on {self.device})")
        self.model = model.eval()
        if backend is None:  # keep the kernels the model already runs (a StreamSession chose them, vision included)
            self.backend = next((m.backend for m in model.model.modules() if hasattr(m, "backend")), "torch")
        else:
            self.backend = model.set_backend(backend)
        if fuse_projections or (fuse_projections is None and self.backend == "fla"):
            model.fuse_projections()
        self.cuda_graph = cuda_graph
        self.prefill_chunk_size = prefill_chunk_size
        sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
        self.buckets = sorted(sizes | {max_batch_size})
        self._slots: dict[int, _Slot] = {}
        self._pool = None

    # ---- prefill ----
    @torch.no_grad()
    def prefill(
        self,
        input_ids_BT: torch.Tensor | None = None,
        *,
        state: InferenceState | None = None,
        attention_mask_BT: torch.Tensor | None = None,
        chunk_size: int | None = None,
        **vision,
    ) -> torch.Tensor:
        """Feeds the tokens into `state` (continuing it) chunk by chunk; returns the last logits [B, V].
        Text-only prompts are embedded per chunk, so memory stays bounded by the chunk at any length.
        Arguments as for `generate.prefill`."""
        input_ids_BT, attention_mask_BT, vision = prompt_inputs(input_ids_BT, attention_mask_BT, vision)
        if state is None:
            raise ValueError("Engine.prefill needs the state to fill: state=model.new_state(batch_size)")
        check_state(state, input_ids_BT.shape[0])
        check_rows(attention_mask_BT)
        if chunk_size is not None:
            chunk_size = whole_number(chunk_size, "chunk_size", 1)
        return self._prefill(input_ids_BT, state=state, attention_mask_BT=attention_mask_BT, chunk_size=chunk_size,
                             **vision)

    def _prefill(self, input_ids_BT: torch.Tensor, *, state: InferenceState, attention_mask_BT: torch.Tensor | None,
                 chunk_size: int | None, **vision) -> torch.Tensor:
        """`prefill` on arguments already checked."""
        for logits in self._prefill_chunks(input_ids_BT, state=state, attention_mask_BT=attention_mask_BT,
                                           chunk_size=chunk_size, **vision):
            pass
        return logits

    def _prefill_chunks(self, input_ids_BT: torch.Tensor, *, state: InferenceState,
                        attention_mask_BT: torch.Tensor | None, chunk_size: int | None, **vision
                        ) -> Iterator[torch.Tensor]:
        """`_prefill` one chunk per next(), yielding each chunk's last logits [B, V] (the last is the prompt's)."""
        chunk = chunk_size or self.prefill_chunk_size
        ids = input_ids_BT.to(self.device)
        mask = None if attention_mask_BT is None else attention_mask_BT.to(self.device)
        if any(vision.get(k) is not None for k in VISION_KEYS):
            # images may straddle chunk boundaries: positions come from the whole prompt (generate.prompt_chunks)
            yield from prompt_chunks(self.model, ids, state=state, attention_mask_BT=mask, chunk_size=chunk, **vision)
            return
        # Chunk boundaries sit at multiples of `chunk` in the stream (not in this call), so a prompt fed over
        # several calls reuses the same few shapes (kernel plans and autotuning are per shape).
        T, start = ids.shape[1], int(state.seen.max())
        bounds = [0] + [b - start for b in range((start // chunk + 1) * chunk, start + T, chunk)] + [T]
        for s, e in zip(bounds[:-1], bounds[1:]):
            m = None if mask is None else mask[:, s:e]
            yield self.model(ids[:, s:e], attention_mask=m, state=state, logits_to_keep=1)[:, -1]

    # ---- decode ----
    def bucket(self, batch_size: int) -> int:
        for b in self.buckets:
            if b >= batch_size:
                return b
        raise ValueError(f"batch of {batch_size} rows exceeds max_batch_size={self.buckets[-1]}: raise it")

    @torch.no_grad()
    def _step(self, slot: _Slot, kind: str) -> None:
        """One decode step for every row of the bucket; reads and writes only the slot's tensors.
        The model's text path for one token per row, without InfiniteVL.forward's input checks (host syncs)."""
        model, state = self.model, slot.state
        P = slot.tok.shape[0]
        slot.live.copy_((~slot.done)[:, None])
        x = model.model.embed_tokens(slot.tok[:, None])
        positions = state.next_position.view(1, P, 1).expand(3, P, 1)
        hidden = model.model(x, positions, mask_BT=slot.live, state=state)
        state.seen.add_(slot.live[:, 0])
        state.next_position.add_(slot.live[:, 0])
        logits = linear(hidden[:, -1], model.lm_head.weight, backend=self.backend)
        if kind.startswith("greedy"):
            nxt = logits.argmax(-1)
        else:
            nxt = sample_rows(logits, slot.temperature, slot.top_k, slot.top_p)
        if kind.endswith(":logprobs"):
            token_logprobs(logits, nxt, slot.logprob, slot.top_ids, slot.top_logprobs)
        nxt = torch.where(slot.done, slot.pad, nxt)
        slot.done.logical_or_((nxt[:, None] == slot.stops[None, :]).any(-1))
        slot.tok.copy_(nxt)

    def _slot(self, P: int, kind: str) -> _Slot:
        slot = self._slots.get(P)
        if slot is None:
            dev = self.device
            slot = _Slot(
                state=self.model.new_state(P),
                tok=torch.zeros(P, dtype=torch.long, device=dev),
                done=torch.ones(P, dtype=torch.bool, device=dev),
                live=torch.zeros(P, 1, dtype=torch.long, device=dev),
                stops=torch.full((MAX_STOP_TOKENS,), -1, dtype=torch.long, device=dev),
                pad=torch.zeros((), dtype=torch.long, device=dev),
                temperature=torch.zeros(P, dtype=torch.float32, device=dev),
                top_k=torch.zeros(P, dtype=torch.long, device=dev),
                top_p=torch.ones(P, dtype=torch.float32, device=dev),
                logprob=torch.zeros(P, dtype=torch.float32, device=dev),
                top_ids=torch.zeros(P, MAX_TOP_LOGPROBS, dtype=torch.long, device=dev),
                top_logprobs=torch.zeros(P, MAX_TOP_LOGPROBS, dtype=torch.float32, device=dev),
            )
            self._slots[P] = slot
        if kind not in slot.steps:
            fn = lambda: self._step(slot, kind)  # noqa: E731
            if self.cuda_graph:
                # Capture on live rows so every kernel is recorded, then wipe what warm-up wrote.
                slot.done.fill_(False)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                slot.steps[kind] = CapturedStep(fn, pool=self._pool)
                slot.state.reset()
                slot.done.fill_(True)
            else:
                slot.steps[kind] = EagerStep(fn)
        return slot

    @torch.no_grad()
    def begin(
        self,
        input_ids_BT: torch.Tensor | None = None,
        *,
        sampling: SamplingParams = SamplingParams(),
        stop_token_ids: Iterable[int] | None = None,
        pad_token_id: int = 0,
        attention_mask_BT: torch.Tensor | None = None,
        state: InferenceState | None = None,
        prefill_chunk_size: int | None = None,
        **vision,
    ) -> Decoding:
        """Prefills the prompt into a bucket's state (continuing `state` when given: it is copied in) and
        samples the first new token. Then call `step` for each further token."""
        input_ids_BT, attention_mask_BT, vision = prompt_inputs(input_ids_BT, attention_mask_BT, vision)
        stops, pad_token_id = self._check_request(input_ids_BT, attention_mask_BT, state, sampling, stop_token_ids,
                                                  pad_token_id, prefill_chunk_size)
        return self._start(input_ids_BT, attention_mask_BT, state, sampling, stops, pad_token_id, prefill_chunk_size,
                           vision)

    @torch.no_grad()
    def _start(self, input_ids_BT, attention_mask_BT, state, sampling, stops, pad_token_id, prefill_chunk_size,
               vision) -> Decoding:
        """`begin` on a request already checked (`prompt_inputs`, `_check_request`)."""
        B = input_ids_BT.shape[0]
        kind = "greedy" if sampling.temperature == 0 else "sample"
        slot = self._slot(self.bucket(B), kind)
        slot.owner = None  # from here the slot's state is this call's: an earlier generation in it has ended
        slot.state.reset()
        rows = slot.state.rows(0, B)
        if state is not None:
            rows.copy_(state)
        logits = self._prefill(input_ids_BT, state=rows, attention_mask_BT=attention_mask_BT,
                               chunk_size=prefill_chunk_size, **vision)
        slot.stops.fill_(-1)
        if stops:
            slot.stops[: len(stops)] = torch.tensor(stops, device=self.device)
        slot.pad.fill_(pad_token_id)
        slot.temperature.fill_(sampling.temperature)
        slot.top_k.fill_(sampling.top_k)
        slot.top_p.fill_(sampling.top_p)
        first = sample_rows(logits, slot.temperature[:B], slot.top_k[:B], slot.top_p[:B])
        slot.tok.zero_()
        slot.tok[:B] = first
        slot.done.fill_(True)
        slot.done[:B] = (first[:, None] == slot.stops[None, :]).any(-1)
        slot.owner = Decoding(slot=slot, kind=kind, rows=rows, stops=torch.tensor(stops, dtype=torch.long),
                              first=slot.tok[:B].clone())
        return slot.owner

    def _check_request(self, input_ids_BT, attention_mask_BT, state, sampling, stop_token_ids, pad_token_id,
                       prefill_chunk_size) -> tuple[list[int], int]:
        """Everything about a request that can be refused before the model runs; returns (stop ids, pad id)."""
        stops = request_options(1, sampling, stop_token_ids, prefill_chunk_size)
        if len(stops) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stops)}")
        pad_token_id = decode_options(pad_token_id, None, None)
        check_state(state, input_ids_BT.shape[0])
        check_rows(attention_mask_BT)
        self.bucket(input_ids_BT.shape[0])
        return stops, pad_token_id

    @staticmethod
    def _check_owner(dec: Decoding) -> None:
        if dec.slot.owner is not dec:
            raise ValueError("this generation was taken over by a later begin/stream/generate call on this Engine "
                             "with a batch of the same bucket (they share one state, and its state is not written "
                             "back): finish a generation before starting the next, or batch the requests together")

    def step(self, dec: Decoding) -> torch.Tensor:
        """One more token for every row: [B] on the device (no host sync; read it when you need it)."""
        self._check_owner(dec)
        dec.slot.steps[dec.kind]()
        return dec.slot.tok[: dec.rows.batch_size]

    def stream(
        self,
        input_ids_BT: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 128,
        state: InferenceState | None = None,
        **kw,
    ) -> Iterator[torch.Tensor]:
        """Yields each new token column [B] (CPU long) as soon as it exists; stops when every row has
        produced a stop token or after max_new_tokens. With `state`, the prompt continues it and, once the
        stream is exhausted, `state` holds everything consumed (as with `generate.generate`).
        Keyword arguments as for `begin`. The arguments are checked in this call (a bad one raises here); the
        prompt is consumed on the first next(), so streams made in advance can be read one after another."""
        max_new_tokens = whole_number(max_new_tokens, "max_new_tokens", 1)
        options = {k: kw.pop(k) for k in BEGIN_OPTIONS if k in kw}
        ids, mask, vision = prompt_inputs(input_ids_BT, kw.pop("attention_mask_BT", None), kw)
        sampling, chunk = options.get("sampling", SamplingParams()), options.get("prefill_chunk_size")
        stops, pad = self._check_request(ids, mask, state, sampling, options.get("stop_token_ids"),
                                         options.get("pad_token_id", 0), chunk)
        return self._columns((ids, mask, state, sampling, stops, pad, chunk, vision), max_new_tokens)

    @torch.no_grad()
    def _columns(self, request: tuple, max_new_tokens: int) -> Iterator[torch.Tensor]:
        """The tokens of `stream`, begun (`_start(*request)`) on the first next()."""
        state = request[2]
        dec = self._start(*request)
        tok = dec.first.cpu()
        done = torch.isin(tok, dec.stops)
        yield tok
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            tok = self.step(dec).to("cpu", copy=True)  # a view of the slot: on CPU .cpu() would alias it
            done |= torch.isin(tok, dec.stops)
            yield tok
        if state is not None:
            self._check_owner(dec)
            state.copy_(dec.rows)

    def generate(self, input_ids_BT: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """New tokens [B, N] (CPU long), N <= max_new_tokens; same arguments as `stream`."""
        return torch.stack(list(self.stream(input_ids_BT, **kw)), dim=1)
