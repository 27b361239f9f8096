"""A generation request's arguments: the processor's names work, everything else wrong is a named ValueError
(`generate` and the `Engine` alike), never an error inside the model or a keyword silently dropped."""
import numpy as np
import pytest
import torch

from infinitevl import InfiniteVL, preset
from infinitevl.inference import SamplingParams, generate
from infinitevl.inference.engine import Engine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InfiniteVL(preset("tiny")).eval()


def _padded():
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    return ids, mask


@pytest.mark.parametrize("engine", [False, True])
def test_processor_names_are_taken_as_meant(model, engine):
    ids, mask = _padded()
    run = Engine(model, max_batch_size=2, backend="torch").generate if engine else \
        lambda *a, **k: generate(model, *a, **k)
    hot = SamplingParams(temperature=50.0)  # near-uniform sampling: any change in the logits shows in the tokens

    def tokens(*args, **kwargs):
        torch.manual_seed(0)
        return run(*args, max_new_tokens=16, sampling=hot, **kwargs).tolist()

    want = tokens(ids, attention_mask_BT=mask)
    assert tokens(ids, attention_mask=mask) == want
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": torch.zeros_like(ids)}
    assert tokens(**inputs) == want  # the processor's output, whole
    assert tokens(ids) != want  # the mask matters for the padded row


@pytest.mark.parametrize("engine", [False, True])
def test_bad_requests_are_named(model, engine):
    ids, mask = _padded()
    run = Engine(model, max_batch_size=2, backend="torch").generate if engine else \
        lambda *a, **k: generate(model, *a, **k)
    cases = [
        (dict(input_ids_BT=ids, pixel_value=torch.zeros(4, 8)), r"unknown argument\(s\) \['pixel_value'\]"),
        (dict(input_ids_BT=ids, attention_mask_BT=mask, attention_mask=mask), "given twice"),
        (dict(input_ids_BT=ids[0].tolist()), "integer tensor.*got list"),
        (dict(input_ids_BT=ids.float()), "integer tensor.*float32"),
        (dict(input_ids_BT=np.asarray(ids)), "integer tensor.*ndarray"),
        (dict(input_ids_BT=ids[0]), r"\[batch, tokens\].*input_ids\[None\]"),
        (dict(input_ids_BT=ids, attention_mask_BT=mask[:, 1:]), "shaped like input_ids"),
        (dict(input_ids_BT=ids, max_new_tokens=2.5), "max_new_tokens must be a whole number"),
        (dict(input_ids_BT=ids, max_new_tokens=0), "max_new_tokens must be a whole number >= 1"),
        (dict(input_ids_BT=ids, prefill_chunk_size=0), "prefill_chunk_size must be a whole number >= 1"),
        (dict(input_ids_BT=ids, stop_token_ids=["x"]), "stop token id"),
        (dict(input_ids_BT=ids, sampling={"temperature": 0.7}), "SamplingParams"),
        (dict(), "no input_ids"),
        (dict(input_ids_BT=ids, attention_mask_BT=mask * 2), "1 for real tokens and 0 for padding"),
        (dict(input_ids_BT=ids, pixel_values=[[0.0]]), "pixel_values must be a tensor"),
        (dict(input_ids_BT=ids, pad_token_id="x"), "pad_token_id must be a whole number"),
        (dict(input_ids_BT=ids, pad_token_id=None), "pad_token_id must be a whole number"),
        (dict(input_ids_BT=ids, stop_token_ids=[10**30]), "stop token id must be a whole number.*2\\*\\*63"),
        (dict(input_ids_BT=ids, state="s"), "state must be an InferenceState"),
        (dict(input_ids_BT=ids, state=model.new_state(3)), r"state holds 3 rows but the input has 2"),
    ]
    if not engine:
        cases += [(dict(input_ids_BT=ids, generator=5), "generator must be a torch.Generator"),
                  (dict(input_ids_BT=ids, on_token=5), "on_token must be a function")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run(**kwargs)
    assert run(ids, max_new_tokens=2, stop_token_ids=5).shape[0] == 2  # one stop id needs no list
    # numpy and tensor numbers are numbers
    assert run(ids, max_new_tokens=np.int64(2), stop_token_ids=torch.tensor([5, 6])).shape[0] == 2
    assert run(ids, max_new_tokens=2, stop_token_ids=torch.tensor(5),
               sampling=SamplingParams(np.float32(0.5), np.int64(3), np.float64(0.9))).shape[0] == 2


def test_sampling_params_must_be_finite_numbers():
    for kwargs, message in [(dict(temperature=float("nan")), "finite"), (dict(top_p=float("inf")), "finite"),
                            (dict(temperature="0.7"), "finite number"), (dict(top_k=2.5), "whole number"),
                            (dict(temperature=-1.0), r"in \[0, 10000\]")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)


def test_model_forward_checks_its_ids(model):
    with pytest.raises(ValueError, match="integer tensor"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(torch.tensor([[1, 2, 3]]), logits_to_keep=-1)


def test_engine_options_and_prefill_arguments_are_checked(model):
    for kwargs in (dict(max_batch_size="2"), dict(max_batch_size=2.0), dict(prefill_chunk_size="8")):
        with pytest.raises(ValueError, match="must be a whole number"):
            Engine(model, backend="torch", **kwargs)
    engine = Engine(model, backend="torch")
    state = model.new_state(1)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['bogus'\]"):
        engine.prefill(torch.tensor([[5, 6, 0]]), state=state, bogus=1)
    with pytest.raises(ValueError, match="needs the state"):
        engine.prefill(torch.tensor([[5, 6, 0]]))
    assert int(state.seen[0]) == 0  # refused calls consumed nothing
    # the processor's name for the mask is taken: the pad is not consumed
    engine.prefill(input_ids=torch.tensor([[5, 6, 0]]), state=state, attention_mask=torch.tensor([[1, 1, 0]]))
    assert int(state.seen[0]) == 2


def test_all_padding_rows_and_eager_stream_checks(model):
    ids, mask = _padded()
    mask[1] = 0
    engine = Engine(model, max_batch_size=2, backend="torch")
    for run in (lambda **k: generate(model, ids, attention_mask_BT=mask, **k),
                lambda **k: engine.generate(ids, attention_mask_BT=mask, **k)):
        with pytest.raises(ValueError, match=r"row\(s\) \[1\] of attention_mask have no real token"):
            run(max_new_tokens=2)
    state = model.new_state(2)
    generate(model, ids, max_new_tokens=1, state=state)
    seen = state.seen.clone()
    with pytest.raises(ValueError, match="no real token"):  # its first token would come from a pad's logits
        generate(model, ids, attention_mask_BT=mask, max_new_tokens=2, state=state)
    assert torch.equal(state.seen, seen)  # refused before anything was consumed
    for bad in (dict(max_new_tokens=0), dict(attention_mask_BT=mask), dict(sampling={"temperature": 1}),
                dict(stop_token_ids=["x"]), dict(pad_token_id=-1), dict(bogus=1), dict(stop_token_ids=list(range(17))),
                dict(input_ids_BT=torch.zeros(3, 4, dtype=torch.long))):
        with pytest.raises(ValueError):
            engine.stream(**{"input_ids_BT": ids, "max_new_tokens": 2, **bad})  # raised by the call, not on next()
