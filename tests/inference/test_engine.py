"""The engine on CPU (eager steps, reference kernels): same tokens and state as the plain loop."""
import pytest
import torch

from infinitevl import InfiniteVL, preset
from infinitevl.inference import SamplingParams, generate
from infinitevl.inference.engine import Engine, sample_rows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InfiniteVL(preset("tiny")).eval()


def _prompt(B=3, T=45, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B == 3:
        mask[1, :7] = 0  # left padding
        mask[2, :30] = 0
    return ids, mask


def test_engine_matches_reference_loop_with_stops_and_padding(model):
    ids, mask = _prompt()
    want = generate(model, ids, attention_mask_BT=mask, max_new_tokens=20)
    stop = int(want[0, 5])  # row 0 stops at step 5 (or earlier), the others may run on
    want = generate(model, ids, attention_mask_BT=mask, max_new_tokens=20, stop_token_ids=[stop], pad_token_id=7)
    engine = Engine(model, max_batch_size=4, backend="torch")
    got = engine.generate(ids, attention_mask_BT=mask, max_new_tokens=20, stop_token_ids=[stop], pad_token_id=7)
    assert engine.bucket(3) == 4 and not engine.cuda_graph
    assert got.tolist() == want.tolist()


def test_fused_projections_change_nothing(model):
    import copy

    ids, mask = _prompt()
    want = generate(model, ids, attention_mask_BT=mask, max_new_tokens=8)
    fused = copy.deepcopy(model)
    got = Engine(fused, max_batch_size=4, backend="torch", fuse_projections=True).generate(
        ids, attention_mask_BT=mask, max_new_tokens=8)
    assert fused.model.layers[1].self_attn.in_proj is not None
    assert got.tolist() == want.tolist()
    assert fused.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, atol=0, rtol=0)


def test_stream_yields_columns_and_continues_state(model):
    ids, _ = _prompt(B=2, T=40)
    st_ref, st = model.new_state(2), model.new_state(2)
    want = generate(model, ids, max_new_tokens=6, state=st_ref)
    engine = Engine(model, max_batch_size=2, backend="torch")
    cols = list(engine.stream(ids, max_new_tokens=6, state=st))
    assert len(cols) == 6 and all(c.shape == (2,) for c in cols)
    assert torch.stack(cols, 1).tolist() == want.tolist()
    for a, b in zip(st.tensors(), st_ref.tensors()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a second turn continues the conversation from the carried state
    more = torch.randint(0, 1000, (2, 9))
    want2 = generate(model, more, max_new_tokens=4, state=st_ref)
    assert engine.generate(more, max_new_tokens=4, state=st).tolist() == want2.tolist()


@pytest.mark.parametrize("chunk", [1, 7, 33])
def test_prefill_chunks_of_any_size(model, chunk):
    ids, mask = _prompt(T=70)
    engine = Engine(model, max_batch_size=3, backend="torch")
    s_full, s_chunk = model.new_state(3), model.new_state(3)
    full = engine.prefill(ids, state=s_full, attention_mask_BT=mask, chunk_size=1000)
    part = engine.prefill(ids, state=s_chunk, attention_mask_BT=mask, chunk_size=chunk)
    torch.testing.assert_close(part, full, atol=2e-5, rtol=1e-4)
    for a, b in zip(s_chunk.tensors(), s_full.tensors()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_sample_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    P = logits.shape[0]
    t = torch.tensor([0.0, 1.0, 1.0, 1.0])
    k = torch.tensor([0, 1, 3, 0])
    p = torch.tensor([1.0, 1.0, 1.0, 1e-6])
    top3 = logits.topk(3, -1).indices
    for _ in range(20):
        tok = sample_rows(logits, t, k, p)
        assert tok[0] == logits[0].argmax() and tok[1] == logits[1].argmax() and tok[3] == logits[3].argmax()
        assert tok[2] in top3[2]
    # temperature 1, no filters: every token can come out, with the softmax frequencies
    draws = torch.stack([sample_rows(logits[:1].expand(2000, -1), torch.ones(2000), torch.zeros(2000, dtype=torch.long),
                                     torch.ones(2000)) for _ in range(5)]).flatten()
    freq = torch.bincount(draws, minlength=50).float() / draws.numel()
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.02
    assert P == 4


def test_reference_sampler_and_engine_sampler_agree_on_edge_cases():
    """A subnormal temperature is near-greedy (no NaN); top_k keeps exactly k tokens even when logits tie."""
    from infinitevl.inference.sampling import sample

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    tiny = SamplingParams(temperature=1e-40)
    assert sample(logits, tiny).tolist() == [1]
    assert sample_rows(logits, torch.tensor([1e-40]), torch.tensor([0]), torch.tensor([1.0])).tolist() == [1]
    tied = torch.tensor([[2.0, 2.0, 2.0, -1.0]])
    seen = {int(sample(tied, SamplingParams(temperature=1.0, top_k=1))) for _ in range(30)}
    engine_seen = {int(sample_rows(tied, torch.ones(1), torch.ones(1, dtype=torch.long), torch.ones(1)))
                   for _ in range(30)}
    assert len(seen) == 1 and len(engine_seen) == 1


def test_sampled_generation_runs(model):
    ids, _ = _prompt(B=1, T=12)
    engine = Engine(model, backend="torch")
    out = engine.generate(ids, max_new_tokens=5, sampling=SamplingParams(temperature=0.8, top_k=20, top_p=0.9))
    assert out.shape == (1, 5)


def test_backend_choice_and_errors(model):
    assert model.set_backend("auto") == "torch"  # no CUDA here
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("fla")
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("cuda")
    with pytest.raises(ValueError, match="cuda_graph"):
        Engine(model, cuda_graph=True)
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, max_batch_size=2, backend="torch").bucket(3)


def test_fused_model_can_be_cast_after_fusing(model):
    import copy

    ids, _ = _prompt(B=1, T=20)
    fused = copy.deepcopy(model)
    fused.fuse_projections()
    fused.double()
    assert fused.model.layers[1].self_attn.in_proj.weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).float(), model(ids), atol=1e-4, rtol=1e-4)


def test_engine_equals_reference_loop_on_the_trained_shipped_model():
    """A trained model gives varied tokens (a random one repeats a single token, which would hide a stale or
    aliased token buffer): every column the engine yields must be the reference loop's."""
    from infinitevl.cli import DEFAULT_MODEL

    model = InfiniteVL.from_pretrained(DEFAULT_MODEL).eval()
    ids = torch.tensor([[5, 300, 301, 302, 303, 304]])
    want = generate(model, ids, max_new_tokens=6)
    assert len(set(want[0].tolist())) > 1
    assert Engine(model, backend="torch").generate(ids, max_new_tokens=6).tolist() == want.tolist()


def test_right_and_middle_padding_give_each_rows_own_tokens(model):
    """The processor pads on the right by default: a row's answer must still continue its last real token."""
    from infinitevl.inference.generate import prefill

    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 1000, (1, n), generator=g) for n in (9, 20, 14)]
    want = [generate(model, r, max_new_tokens=8)[0].tolist() for r in rows]
    ids = torch.zeros(3, 20, dtype=torch.long)
    mask = torch.zeros(3, 20, dtype=torch.long)
    ids[0, :9], mask[0, :9] = rows[0], 1  # right padding
    ids[1], mask[1] = rows[1], 1
    ids[2, :5], ids[2, 11:] = rows[2][0, :5], rows[2][0, 5:]  # a gap in the middle
    mask[2, :5], mask[2, 11:] = 1, 1
    assert generate(model, ids, attention_mask_BT=mask, max_new_tokens=8).tolist() == want
    engine = Engine(model, max_batch_size=4, backend="torch")
    assert engine.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8).tolist() == want
    alone = prefill(model, rows[0])[0]
    torch.testing.assert_close(prefill(model, ids, attention_mask_BT=mask)[0][0], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.prefill(ids, state=model.new_state(3), attention_mask_BT=mask)[0], alone[0],
                               atol=1e-4, rtol=1e-4)


def test_a_later_generation_on_the_same_bucket_ends_the_earlier_stream(model):
    engine = Engine(model, max_batch_size=2, backend="torch")
    first = engine.stream(torch.tensor([[5, 6, 7]]), max_new_tokens=5)
    next(first)
    engine.generate(torch.tensor([[8, 9]]), max_new_tokens=3)  # same bucket: takes the state over
    with pytest.raises(ValueError, match="taken over by a later"):
        list(first)
    other = engine.stream(torch.tensor([[5, 6, 7]]), max_new_tokens=5)
    next(other)
    engine.generate(torch.tensor([[8, 9], [1, 2]]), max_new_tokens=3)  # another bucket: no conflict
    assert len(list(other)) == 4
    # a call that is refused after taking the slot over still ends the earlier stream
    third = engine.stream(torch.tensor([[5, 6, 7]]), max_new_tokens=5)
    next(third)
    with pytest.raises(ValueError, match="placeholder"):
        engine.generate(torch.tensor([[model.config.image_token_id, 5]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="taken over"):
        next(third)
    # a stream taken over before it ends does not write the other generation's state into the caller's
    state = model.new_state(1)
    kept = engine.stream(torch.tensor([[5, 6, 7]]), max_new_tokens=1, state=state)
    next(kept)
    engine.generate(torch.tensor([[8, 9, 10, 11]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="taken over"):
        list(kept)
    assert int(state.seen[0]) == 0


def test_streams_made_in_advance_are_read_one_after_another(model):
    engine = Engine(model, max_batch_size=1, backend="torch")
    prompts = [torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])]
    want = [generate(model, p, max_new_tokens=4).tolist() for p in prompts]
    streams = [engine.stream(p, max_new_tokens=4) for p in prompts]  # nothing runs until read
    assert [torch.stack(list(s), 1).tolist() for s in streams] == want


def test_a_generated_placeholder_id_is_text_but_a_prompt_placeholder_needs_pixels():
    """A model may emit an image placeholder id: decoding goes on. In a prompt, a placeholder without pixels is an
    error wherever the prefill's chunk boundaries fall."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    m = InfiniteVL(cfg).eval()
    with torch.no_grad():  # the head then scores only the image placeholder (hidden[0] > 0 for this seed)
        m.lm_head.weight.zero_()
        m.lm_head.weight[cfg.image_token_id, 0] = 1.0
        m.model.norm.weight.zero_()
        m.model.norm.weight[0] = 1.0
    ids = torch.tensor([[5, 6, 7]])
    assert generate(m, ids, max_new_tokens=3).tolist() == [[cfg.image_token_id] * 3]
    assert Engine(m, backend="torch").generate(ids, max_new_tokens=3).tolist() == [[cfg.image_token_id] * 3]
    for prompt in ([5, 6, 7, 8, cfg.image_token_id], [cfg.image_token_id, 5, 6, 7, 8]):
        with pytest.raises(ValueError, match="no image pixels"):
            Engine(m, backend="torch").prefill(torch.tensor([prompt]), state=m.new_state(1), chunk_size=4)
