"""Continuous batching on CPU: requests joining and leaving one batch get the tokens they get alone."""
import threading

import pytest
import torch

from transformers import AutoProcessor

from infinitevl.chat import chat_inputs
from infinitevl.cli import DEFAULT_MODEL, load_model
from infinitevl.inference import SamplingParams
from infinitevl.inference.engine import Engine
from infinitevl.inference.scheduler import Scheduler
from infinitevl.media import process_vision_info

EOS = 2


EXAMPLES = DEFAULT_MODEL.parent / "examples"
QUESTIONS = [("blue_star.png", "Describe the image."), ("three_circles.png", "How many shapes are there?"),
             ("blue_star.png", "What colour is the shape?"), ("three_circles.png", "Describe the image."),
             (None, "Write a word.")]


def shipped_prompts(device: str):
    """(model, [(input_ids, vision inputs)] of QUESTIONS) on `device`: the shipped model answers these in words."""
    model, processor = load_model(DEFAULT_MODEL, device, torch.float32, processor=True)
    prompts = []
    for image, question in QUESTIONS:
        content = ([{"type": "image", "image": str(EXAMPLES / image)}] if image else []) + [
            {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        prompts.append(chat_inputs(processor, messages, process_vision_info(messages, return_video_kwargs=True),
                                   device))
    return model, prompts


@pytest.fixture(scope="module")
def shipped():
    return shipped_prompts("cpu")


TEXTS = ["Write a word.", "What colour is the sky?", "Hello", "How many shapes are there in the picture I gave you?",
         "Say something.", "What is written?"]


@pytest.fixture(scope="module")
def texts(shipped):
    """Text-only prompts of different lengths (they are prefilled together, left-padded)."""
    processor = AutoProcessor.from_pretrained(str(DEFAULT_MODEL))
    out = []
    for text in TEXTS:
        messages = [{"role": "user", "content": text}]
        out.append(chat_inputs(processor, messages, (None, None, {}), "cpu"))
    assert len({ids.shape[1] for ids, _ in out}) > 3
    return out


def _alone(model, prompt, n, stops=(EOS,), sampling=SamplingParams(), seed=None):
    """The tokens the engine generates for the prompt alone, up to and with the first stop token."""
    ids, vision = prompt
    if seed is not None:
        torch.manual_seed(seed)
    out = Engine(model, backend="torch").generate(ids, max_new_tokens=n, stop_token_ids=list(stops),
                                                   sampling=sampling, **vision)[0].tolist()
    stop_at = next((k for k, t in enumerate(out) if t in stops), None)
    return out if stop_at is None else out[: stop_at + 1]


@pytest.fixture
def schedulers():
    """make(model, rows, stops) -> a Scheduler, closed after the test."""
    made = []

    def make(model, rows, stops, **kw):
        made.append(Scheduler(Engine(model, max_batch_size=rows, backend="torch"), stop_token_ids=stops,
                              max_batch_size=rows, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _submit(sched, prompt, n, **kw):
    ids, vision = prompt
    return sched.submit(ids, max_new_tokens=n, **vision, **kw)


def test_requests_joining_midway_get_the_tokens_they_get_alone(shipped, schedulers):
    model, prompts = shipped
    blue = 370  # "blue": a second stop token, which ends the answers about the star early
    lengths = [12, 3, 9, 5, 20]
    want = [_alone(model, p, n, stops=[EOS, blue]) for p, n in zip(prompts, lengths)]
    assert want[0][-1] == blue and want[1] == [278, 283, 393] and want[4][-1] == EOS  # what the cases exercise
    sched = schedulers(model, 4, [EOS, blue])
    it = iter(_submit(sched, prompts[4], lengths[4]))
    got4 = [next(it), next(it)]  # request 4 is two tokens in when the others arrive (5 requests, 4 rows)
    tickets = [_submit(sched, p, n) for p, n in zip(prompts[:4], lengths[:4])]
    got = [list(t) for t in tickets] + [got4 + list(it)]
    assert got == want


def test_text_prompts_prefilled_together_get_the_tokens_they_get_alone(shipped, texts, schedulers):
    model, _ = shipped
    want = [_alone(model, p, 10) for p in texts]
    sched = schedulers(model, 4, [EOS])
    tickets = [_submit(sched, p, 10) for p in texts]  # 4 start together, 2 wait for rows
    assert [list(t) for t in tickets] == want
    assert sched.stats["prefills"] == len(texts)


def test_prompts_fed_in_small_chunks_get_the_tokens_they_get_alone(shipped, texts, schedulers):
    """Chunks of one token for a group of 4 text prompts (left-padded: a row's first chunks are all padding),
    chunks of 4 for a prompt with an image (its placeholders straddle chunks)."""
    model, prompts = shipped
    cases = texts[:4] + prompts[:2]
    want = [_alone(model, p, 8) for p in cases]
    sched = schedulers(model, 5, [EOS], prefill_chunk=4)
    busy = _submit(sched, prompts[4], 10**6)  # a row decoding: prompts go in between its steps
    next(iter(busy))
    tickets = [_submit(sched, p, 8) for p in cases]
    assert [list(t) for t in tickets] == want
    longest = max(p[0].shape[1] for p in cases)
    assert sched.stats["prefill_chunks"] >= longest  # the text group alone took one chunk per position
    busy.cancel()


def test_a_long_prompt_is_prefilled_between_the_decode_steps_of_the_others(shipped, schedulers, monkeypatch):
    model, prompts = shipped
    sched = schedulers(model, 2, [], prefill_chunk=8)
    events = []
    for name in ("_advance", "_step"):
        real = getattr(sched, name)
        monkeypatch.setattr(sched, name, lambda real=real, name=name: (events.append(name), real())[1])
    busy = iter(_submit(sched, prompts[4], 200))
    next(busy)
    events.clear()
    long = prompts[0]  # an image prompt of more than 8 tokens: several chunks
    chunks = -(-long[0].shape[1] // 8)
    assert chunks >= 4
    want = _alone(model, long, 3, stops=())
    assert list(_submit(sched, long, 3)) == want
    first_chunk = events.index("_advance")
    assert events[first_chunk:first_chunk + 2 * chunks] == ["_advance", "_step"] * chunks
    # A request cancelled while its prompt goes in ends without a token, and frees what it held.
    advance = sched._advance

    def cancel_then_advance():
        if sched.pending is not None and any(t is cancelled for t in sched.pending.group):
            cancelled.cancel()
        return advance()

    monkeypatch.setattr(sched, "_advance", cancel_then_advance)
    cancelled = _submit(sched, long, 3)
    assert list(cancelled) == []
    assert sched.status()["prefilling"] == 0
    assert list(_submit(sched, prompts[1], 4)) == _alone(model, prompts[1], 4, stops=())


def test_logprobs_are_the_models(shipped, schedulers):
    """Each token's log-probability and alternatives equal a forward over the prompt and the answer; a row with
    logprobs beside one without changes neither's tokens."""
    model, prompts = shipped
    sched = schedulers(model, 4, [EOS])
    want = [_alone(model, p, 10) for p in prompts[:2]]
    with_lp, plain = _submit(sched, prompts[0], 10, logprobs=3), _submit(sched, prompts[1], 10)
    assert [list(with_lp), list(plain)] == want
    assert plain.token_logprobs == [] and len(with_lp.token_logprobs) == len(want[0])
    ids, vision = prompts[0]
    full = torch.cat([ids, torch.tensor([want[0][:-1]])], dim=1)
    with torch.no_grad():
        ref = model(full, **vision)[0, ids.shape[1] - 1:].float().log_softmax(-1)
    for k, (token, (lp, top)) in enumerate(zip(want[0], with_lp.token_logprobs)):
        assert lp == pytest.approx(float(ref[k, token]), abs=1e-4)
        assert len(top) == 3 and top[0][0] == token  # greedy: the token is the likeliest
        assert [t for t, _ in top] == ref[k].topk(3).indices.tolist()
        assert [v for _, v in top] == pytest.approx(ref[k].topk(3).values.tolist(), abs=1e-4)
    hot = _submit(sched, prompts[2], 6, sampling=SamplingParams(temperature=2.0), logprobs=0)
    got = list(hot)
    assert len(hot.token_logprobs) == len(got) and all(top == [] and lp <= 0 for lp, top in hot.token_logprobs)
    with pytest.raises(ValueError, match="logprobs must be in"):
        _submit(sched, prompts[0], 3, logprobs=21)


def test_choices_share_one_prefill(shipped, schedulers):
    model, prompts = shipped
    sched = schedulers(model, 4, [EOS])
    image = prompts[0]
    want = _alone(model, image, 8)
    choices = sched.submit_choices(image[0], n=3, max_new_tokens=8, **image[1])
    assert [list(t) for t in choices] == [want] * 3
    assert sched.stats["prefills"] == 1  # the prompt (and its image) went in once
    hot = dict(n=3, max_new_tokens=10, sampling=SamplingParams(temperature=3.0, top_k=50), seed=5)
    first = [list(t) for t in sched.submit_choices(image[0], **hot, **image[1])]
    again = [list(t) for t in sched.submit_choices(image[0], **hot, **image[1])]
    assert first == again and len({tuple(x) for x in first}) > 1  # the seed decides all three; they differ
    with pytest.raises(ValueError, match="5 choices need 5 rows: at most max_batch_size=4"):
        sched.submit_choices(image[0], n=5, max_new_tokens=3, **image[1])
    busy = _submit(sched, prompts[4], 10**6)  # 3 rows left: a family of 3 waits for none, one of 4 would wait
    next(iter(busy))
    family = sched.submit_choices(prompts[1][0], n=3, max_new_tokens=4, **prompts[1][1])
    assert [list(t) for t in family] == [_alone(model, prompts[1], 4)] * 3
    busy.cancel()


def test_sampled_and_greedy_rows_share_a_batch(shipped, schedulers):
    model, prompts = shipped
    want = [_alone(model, p, 10) for p in prompts[:2]]
    sched = schedulers(model, 4, [EOS])
    hot = SamplingParams(temperature=1.5, top_k=40, top_p=0.95)
    sampled = [_submit(sched, p, 10, sampling=hot) for p in prompts[2:4]]
    tickets = [_submit(sched, p, 10) for p in prompts[:2]]
    assert [list(t) for t in tickets] == want
    assert all(1 <= len(list(t)) <= 10 for t in sampled)


def test_a_seeded_request_runs_alone_and_repeats(shipped, schedulers):
    model, prompts = shipped
    hot = SamplingParams(temperature=3.0)
    quiet = schedulers(model, 4, [EOS])
    want = list(_submit(quiet, prompts[0], 12, sampling=hot, seed=123))  # the draws are made for all 4 rows
    sched = schedulers(model, 4, [EOS])
    others = [_submit(sched, p, 12, sampling=hot) for p in prompts[1:3]]
    seeded = [_submit(sched, prompts[0], 12, sampling=hot, seed=123) for _ in range(2)]
    late = _submit(sched, prompts[3], 12, sampling=hot)
    assert [list(t) for t in seeded] == [want, want]
    assert all(1 <= len(list(t)) <= 12 for t in others + [late])


def test_cancel_frees_the_row(shipped, schedulers):
    model, prompts = shipped
    sched = schedulers(model, 1, [])
    ticket = _submit(sched, prompts[0], 10**6)
    it = iter(ticket)
    for _ in range(3):
        next(it)
    ticket.cancel()
    done = threading.Event()
    threading.Thread(target=lambda: (list(it), done.set()), daemon=True).start()
    assert done.wait(30), "a cancelled request went on"
    assert list(_submit(sched, prompts[1], 6)) == _alone(model, prompts[1], 6, stops=())
    endless, waiting = _submit(sched, prompts[0], 10**6), _submit(sched, prompts[1], 10**6)
    next(iter(endless))
    sched.close()  # ends both: the one in flight and the one waiting for the row
    for t in (endless, waiting):
        with pytest.raises(ValueError, match="closed before this request ended"):
            list(t)
    with pytest.raises(ValueError, match="closed"):
        _submit(sched, prompts[1], 3)


def test_bad_requests_are_refused_at_submit_and_a_failing_one_fails_alone(shipped, texts, schedulers):
    model, prompts = shipped
    sched = schedulers(model, 2, [EOS])
    ids = prompts[4][0]
    with pytest.raises(ValueError, match="one prompt"):
        sched.submit(ids.repeat(2, 1), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sched.submit(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="seed must be a whole number >= 0"):
        sched.submit(ids, max_new_tokens=3, seed=2**70)
    with pytest.raises(ValueError, match="top_k must be in"):
        sched.submit(ids, max_new_tokens=3, sampling=SamplingParams(1.0, 2**40))
    with pytest.raises(ValueError, match="pixel_values must be a tensor"):
        sched.submit(ids, max_new_tokens=3, pixel_values=[1, 2])
    with pytest.raises(ValueError, match="exceeds max_batch_size"):
        Scheduler(Engine(model, max_batch_size=2, backend="torch"), stop_token_ids=[], max_batch_size=3)
    # An image placeholder with no image: the prefill of its group fails, then of this request only.
    image_pad = torch.tensor([[1, 2, model.config.image_token_id, 3]])
    ok_ticket, bad_ticket = _submit(sched, texts[1], 8), sched.submit(image_pad, max_new_tokens=3)
    with pytest.raises(ValueError, match="image"):
        list(bad_ticket)
    assert list(ok_ticket) == _alone(model, texts[1], 8)


def test_a_broken_scheduler_fails_its_requests_instead_of_hanging(shipped, schedulers, monkeypatch):
    from infinitevl.inference.scheduler import SchedulerClosed

    model, prompts = shipped
    sched = schedulers(model, 2, [EOS])

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(sched, "_take", broken)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the thread's own report of the error
    ticket = _submit(sched, prompts[4], 4)
    with pytest.raises(SchedulerClosed, match="RuntimeError: boom"):
        list(ticket)
    sched.thread.join(10)
    with pytest.raises(SchedulerClosed):
        _submit(sched, prompts[4], 4)
    assert sched.status()["closed"]  # what the server's /health reports (503)


def test_a_failure_setting_up_or_starting_a_group_loses_no_request(shipped, texts, schedulers, monkeypatch):
    """A device error while a group's prefill is set up reaches its request; one while the group's states are
    copied into their rows hands out nothing, and the prompts retried alone get their own tokens once."""
    model, _ = shipped
    sched = schedulers(model, 4, [EOS])
    real = sched.scratch.rows

    def broken(a, b):
        raise RuntimeError("CUDA error (simulated)")

    monkeypatch.setattr(sched.scratch, "rows", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        list(_submit(sched, texts[0], 4))
    copies = []

    def flaky(a, b):
        if b - a == 1:  # the per-request copies into the batch rows
            copies.append(a)
            if len(copies) == 2:
                raise RuntimeError("CUDA error (simulated) copying the second row")
        return real(a, b)

    monkeypatch.setattr(sched.scratch, "rows", flaky)
    want = [_alone(model, p, 6) for p in texts[:2]]
    with sched.wake:  # both wait before the scheduler looks: they are prefilled as one group
        tickets = [_submit(sched, p, 6) for p in texts[:2]]
    assert [list(t) for t in tickets] == want
    assert copies[:2] == [0, 1]  # the group's two copies (the second failed); then each went in alone
    assert all(r is None for r in sched.rows) and not sched.status()["closed"]
