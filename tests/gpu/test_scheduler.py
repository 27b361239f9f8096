"""Continuous batching on the GPU: the scheduler's captured step (rows joining and leaving between replays)
gives each request the tokens the engine gives it alone."""
import pytest

from infinitevl.inference import SamplingParams
from infinitevl.inference.engine import Engine
from infinitevl.inference.scheduler import Scheduler

from ..inference.test_scheduler import EOS, shipped_prompts

BLUE = 370  # "blue": a second stop token, which ends the answers about the star early


@pytest.fixture(scope="module")
def shipped():
    return shipped_prompts("cuda")


@pytest.mark.parametrize("prefill_chunk", [2048, 8])  # 8: prompts go in over many chunks, between steps
def test_graph_batch_equals_each_request_alone(shipped, prefill_chunk):
    model, prompts = shipped
    lengths = [12, 3, 9, 5, 20]
    engine = Engine(model, max_batch_size=1)
    assert engine.cuda_graph
    want = [engine.generate(ids, max_new_tokens=n, stop_token_ids=[EOS, BLUE], **vision)[0].tolist()
            for (ids, vision), n in zip(prompts, lengths)]
    want = [w[: next((k + 1 for k, t in enumerate(w) if t in (EOS, BLUE)), len(w))] for w in want]
    with Scheduler(Engine(model, max_batch_size=4), stop_token_ids=[EOS, BLUE], max_batch_size=4,
                   prefill_chunk=prefill_chunk) as sched:
        assert sched.engine.cuda_graph
        ids, vision = prompts[4]
        it = iter(sched.submit(ids, max_new_tokens=lengths[4], **vision))
        first = [next(it), next(it)]
        tickets = [sched.submit(ids, max_new_tokens=n, **vision) for (ids, vision), n in zip(prompts[:4], lengths[:4])]
        got = [list(t) for t in tickets] + [first + list(it)]
        # sampled rows beside greedy ones, then greedy again on the freed rows
        hot = [sched.submit(ids, max_new_tokens=8, sampling=SamplingParams(1.5, 40, 0.9), **vision)
               for ids, vision in prompts[:2]]
        again = [sched.submit(ids, max_new_tokens=n, **vision) for (ids, vision), n in zip(prompts[2:4], lengths[2:4])]
        assert all(1 <= len(list(t)) <= 8 for t in hot)
        assert [list(t) for t in again] == want[2:4]
    assert got == want


def test_graph_logprobs_are_the_models(shipped):
    """The captured ":logprobs" steps record each token's log-probability and alternatives (a row without
    logprobs beside it unchanged)."""
    import torch

    model, prompts = shipped
    engine = Engine(model, max_batch_size=1)
    (ids, vision), other = prompts[0], prompts[1]
    want = engine.generate(ids, max_new_tokens=10, stop_token_ids=[EOS], **vision)[0].tolist()
    want = want[: want.index(EOS) + 1] if EOS in want else want
    want_other = engine.generate(other[0], max_new_tokens=10, stop_token_ids=[EOS], **other[1])[0].tolist()
    want_other = want_other[: want_other.index(EOS) + 1] if EOS in want_other else want_other
    with Scheduler(Engine(model, max_batch_size=4), stop_token_ids=[EOS], max_batch_size=4) as sched:
        t = sched.submit(ids, max_new_tokens=10, logprobs=3, **vision)
        plain = sched.submit(other[0], max_new_tokens=10, **other[1])
        assert [list(t), list(plain)] == [want, want_other]
    full = torch.cat([ids.cpu(), torch.tensor([want[:-1]])], dim=1).to(model.lm_head.weight.device)
    with torch.no_grad():
        ref = model(full, **vision)[0, ids.shape[1] - 1:].float().log_softmax(-1)
    assert len(t.token_logprobs) == len(want)
    for k, (token, (lp, top)) in enumerate(zip(want, t.token_logprobs)):
        assert lp == pytest.approx(float(ref[k, token]), abs=2e-2)  # fla kernels round to TF32
        assert top[0][0] == token and [i for i, _ in top][:1] == ref[k].topk(1).indices.tolist()


def test_graph_choices_share_one_prefill(shipped):
    model, prompts = shipped
    ids, vision = prompts[0]
    want = Engine(model, max_batch_size=1).generate(ids, max_new_tokens=8, stop_token_ids=[EOS], **vision)[0].tolist()
    want = want[: want.index(EOS) + 1] if EOS in want else want
    with Scheduler(Engine(model, max_batch_size=4), stop_token_ids=[EOS], max_batch_size=4) as sched:
        assert [list(t) for t in sched.submit_choices(ids, n=3, max_new_tokens=8, **vision)] == [want] * 3
        assert sched.stats["prefills"] == 1
