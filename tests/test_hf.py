"""The transformers edge: the released model card snippet on a saved tiny checkpoint with the real tokenizer,
HF generate == our generate, left padding, the Auto classes, the parity fixture through AutoModelForCausalLM."""
import json
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

import infinitevl
from infinitevl import InfiniteVL
from infinitevl.hf import CACHE_NAME, InferenceStateCache, InfiniteVLForConditionalGeneration, InfiniteVLHFConfig
from infinitevl.inference import generate as our_generate
from infinitevl.media import process_vision_info as our_process_vision_info
from infinitevl.model.config import InfiniteVLConfig, TextConfig, VisionConfig

from .conftest import MEDIA, QWEN_TOKENIZER, REFERENCE_TINY

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
EOS = 151645


def tiny_qwen_vocab_config() -> InfiniteVLConfig:
    """Smaller than preset('tiny') but with Qwen2.5-VL's vocabulary and token ids, so the real tokenizer fits."""
    return InfiniteVLConfig(
        text=TextConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3], sliding_window=16,
                        num_linear_heads=2, num_linear_key_value_heads=2, linear_head_dim=16, norm_eps=1e-6),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                            out_hidden_size=64, fullatt_block_indexes=[1]),
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A released-format directory: config.json + model.safetensors + the Qwen2.5-VL tokenizer/processor files."""
    d = tmp_path_factory.mktemp("tiny-qwen-vocab")
    torch.manual_seed(0)
    model = InfiniteVL(tiny_qwen_vocab_config())
    with torch.no_grad():  # larger random weights than the default init, so greedy decoding is not one token repeated
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    model.save_pretrained(d)
    for f in QWEN_TOKENIZER.iterdir():
        if f.suffix in (".json", ".txt", ".jinja"):
            shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def card(checkpoint):
    """The model card's loading lines, verbatim."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, device_map="auto")
    processor = AutoProcessor.from_pretrained(checkpoint)
    return model, processor


@pytest.fixture(scope="module")
def fp32(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def qwen_process_vision_info():
    """qwen_vl_utils.process_vision_info. It imports torchvision at module level; without torchvision (our CPU
    install) a minimal stub stands in during that import, providing only the names it touches at import time and
    on the image path (its video path needs the real torchvision: videos go through infinitevl.media here). The
    stub is removed from sys.modules afterwards."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        stub = types.ModuleType("torchvision")
        stub.__version__ = "0.0.0"
        stub.io = types.ModuleType("torchvision.io")
        stub.transforms = types.ModuleType("torchvision.transforms")
        stub.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
        stub.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        with pytest.MonkeyPatch.context() as mp:
            for name, module in {"torchvision": stub, "torchvision.io": stub.io,
                                 "torchvision.transforms": stub.transforms,
                                 "torchvision.transforms.functional": stub.transforms.functional}.items():
                mp.setitem(sys.modules, name, module)
            from qwen_vl_utils import process_vision_info
            return process_vision_info
    from qwen_vl_utils import process_vision_info
    return process_vision_info


PROMPTS = {
    "text": [{"type": "text", "text": "Write a haiku about constant memory."}],
    "image": [{"type": "image", "image": str(MEDIA / "1.jpg")}, {"type": "text", "text": "Describe this image."}],
    "two_images": [{"type": "image", "image": str(MEDIA / "1.jpg")}, {"type": "image", "image": str(MEDIA / "2.jpg")},
                   {"type": "text", "text": "What differs between these two pictures?"}],
    "video": [{"type": "video", "video": str(MEDIA / "1.mp4"), "fps": 1.0, "max_pixels": 28 * 28 * 16},
              {"type": "text", "text": "What happens in this video?"}],
    "image_and_video": [{"type": "image", "image": str(MEDIA / "3.jpg"), "max_pixels": 28 * 28 * 64},
                        {"type": "video", "video": str(MEDIA / "3.mp4"), "fps": 1.0, "max_pixels": 28 * 28 * 16},
                        {"type": "text", "text": "Does the picture appear in the video?"}],
}


def _vision(inputs) -> dict:
    return {k: inputs[k] for k in VISION_KEYS if k in inputs}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_model_card_snippet(card, qwen_process_vision_info, case):
    model, processor = card
    assert isinstance(model, InfiniteVLForConditionalGeneration) and model.dtype == torch.bfloat16
    messages = [{"role": "user", "content": PROMPTS[case]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    video_kwargs = {}
    if "video" in case:  # qwen_vl_utils' video reader needs torchvision: our loader, same message format
        image_inputs, video_inputs, video_kwargs = our_process_vision_info(messages, return_video_kwargs=True)
    else:
        image_inputs, video_inputs = qwen_process_vision_info(messages)
    inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt",
                       **video_kwargs).to(model.device)
    generated_ids = model.generate(**inputs, max_new_tokens=6)

    prompt = inputs["input_ids"]
    assert torch.equal(generated_ids[:, : prompt.shape[1]], prompt) and generated_ids.shape[1] > prompt.shape[1]
    new = generated_ids[:, prompt.shape[1]:]
    ours = our_generate(model.core, prompt, max_new_tokens=6, stop_token_ids=[EOS], **_vision(inputs))
    assert new.tolist() == ours[:, : new.shape[1]].tolist()
    assert isinstance(processor.batch_decode(new, skip_special_tokens=True)[0], str)
    if "video" in case:
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / video_kwargs["video_metadata"][0]["fps"]])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(fp32, side):
    """Either padding side (the tokenizer's default is right) gives every row its own answer."""
    model, processor = fp32
    processor.tokenizer.padding_side = side  # the fixture's processor: set back to left below
    small_image = [{"type": "image", "image": str(MEDIA / "1.jpg"), "max_pixels": 28 * 28 * 8},
                   {"type": "text", "text": "Describe this image."}]
    conversations = [[{"role": "user", "content": small_image}],
                     [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    images, _ = our_process_vision_info(conversations[0])
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][1] == 0).any(), "the second prompt must be padded"
    processor.tokenizer.padding_side = "left"
    T = batch["input_ids"].shape[1]
    for how in ({}, {"use_cache": False}):
        together = model.generate(**batch, max_new_tokens=6, do_sample=False, **how)
        for row, (text, imgs) in enumerate(((texts[0], images), (texts[1], None))):
            alone = processor(text=[text], images=imgs, return_tensors="pt")
            single = model.generate(**alone, max_new_tokens=6, do_sample=False)
            assert together[row, T:].tolist() == single[0, alone["input_ids"].shape[1]:].tolist(), how
    # chunked prefill (text only in transformers): a row's last chunk may be all padding
    processor.tokenizer.padding_side = side
    texts = [texts[1], texts[1].replace("Hi", "Count to twenty in French, then in German.")]
    batch = processor(text=texts, padding=True, return_tensors="pt")
    processor.tokenizer.padding_side = "left"
    together = model.generate(**batch, max_new_tokens=6, do_sample=False, prefill_chunk_size=4)
    for row, text in enumerate(texts):
        alone = processor(text=[text], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)
        assert together[row, batch["input_ids"].shape[1]:].tolist() == single[0, alone["input_ids"].shape[1]:].tolist()


def test_generate_without_cache_and_beam_search(fp32):
    model, processor = fp32
    inputs = processor(text=["<|im_start|>user\nCount to five.<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    cached = model.generate(**inputs, max_new_tokens=5)
    uncached = model.generate(**inputs, max_new_tokens=5, use_cache=False)  # full recompute every step
    assert cached.tolist() == uncached.tolist()
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.shape == (1, inputs["input_ids"].shape[1] + 4)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(**inputs, pixel_values=torch.zeros(4, 1176), image_grid_thw=torch.tensor([[1, 2, 2]]),
                       num_beams=2)


def test_forward_cache_continuation_and_loss(fp32):
    model, _ = fp32
    ids = torch.randint(0, 151000, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    full = model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert getattr(full, CACHE_NAME) is None
    first = model(input_ids=ids[:, :15], attention_mask=mask[:, :15])
    state = getattr(first, CACHE_NAME)  # `cache` from transformers 5.24, `past_key_values` before
    assert isinstance(state, InferenceStateCache) and state.get_seq_length() == 15
    snap = getattr(model(input_ids=ids[:, :15], attention_mask=mask[:, :15]), CACHE_NAME)  # a second, equal state
    for name, past in (("past_key_values", state), ("cache", snap)):  # either name continues the state
        rest = model(input_ids=ids[:, 15:], attention_mask=mask, **{name: past})  # HF-style mask
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1)[mask.bool()], full.logits[mask.bool()],
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids[:, 15:], cache=state, past_key_values=snap)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    want = torch.nn.functional.cross_entropy(full.logits[:, :-1].reshape(-1, full.logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_auto_classes_and_released_names(checkpoint):
    for auto in (AutoModelForImageTextToText, AutoModel):
        model = auto.from_pretrained(checkpoint)
        assert isinstance(model, InfiniteVLForConditionalGeneration) and model.dtype == torch.float32  # "auto"
    stored = set(load_file(str(checkpoint / "model.safetensors")))
    assert set(model.state_dict()) == stored | {"lm_head.weight"}
    assert model.lm_head.weight is model.model.embed_tokens.weight is model.core.model.embed_tokens.weight
    config = AutoConfig.from_pretrained(checkpoint)
    assert isinstance(config, InfiniteVLHFConfig) and config.to_core() == tiny_qwen_vocab_config()
    random_init = AutoModelForCausalLM.from_config(config)
    assert set(random_init.state_dict()) == set(model.state_dict())


def test_save_pretrained_round_trip(card, tmp_path):
    model, _ = card  # bfloat16
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # dtype "auto": the saved dtype
    assert again.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), name  # the card's model sits on the GPU when there is one
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "infinite_vl" and saved["dtype"] == "bfloat16"
    assert InfiniteVLConfig.from_file(tmp_path) == tiny_qwen_vocab_config()


def test_released_config_layouts(tmp_path):
    released = {  # the released 4B config.json (flat text fields, nested vision_config), keys as published
        "attn_implementation": "flash_attention_2", "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_infinitevl.InfiniteVLConfig"}, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 2048,
        "image_token_id": 151655, "initializer_range": 0.02, "intermediate_size": 11008,
        "max_position_embeddings": 128000, "max_window_layers": 70, "model_type": "infinite_vl",
        "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0, "sliding_window": 8192, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0", "use_cache": False, "use_sliding_window": True, "video_token_id": 151656,
        "vision_config": {"depth": 32, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
                          "hidden_size": 1280, "in_channels": 3, "in_chans": 3, "intermediate_size": 3420,
                          "model_type": "infinite_vl", "num_heads": 16, "out_hidden_size": 2048, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
                          "tokens_per_second": 2, "torch_dtype": "bfloat16", "window_size": 112},
        "vision_end_token_id": 151653, "vision_start_token_id": 151652, "vision_token_id": 151654,
        "vocab_size": 151936,
    }
    (tmp_path / "config.json").write_text(json.dumps(released))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.to_core() == infinitevl.preset("4b") and config.dtype == torch.bfloat16 and config.use_cache
    assert config.layer_types[:4] == ["sliding_attention"] + ["linear_attention"] * 3
    config.save_pretrained(tmp_path / "saved")
    assert InfiniteVLConfig.from_file(tmp_path / "saved") == infinitevl.preset("4b")
    nested = AutoConfig.from_pretrained(REFERENCE_TINY / "model")  # text fields nested under text_config
    assert nested.to_core() == InfiniteVLConfig.from_file(REFERENCE_TINY / "model")
    with pytest.raises(ValueError, match="vision_config"):
        InfiniteVLHFConfig(hidden_size=8)


def test_from_pretrained_dtype_device_and_bad_arguments(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="bfloat16", device_map={"": "cpu"})
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    with pytest.raises(ValueError, match="load_in_8bit"):
        AutoModelForCausalLM.from_pretrained(checkpoint, load_in_8bit=True)
    with pytest.raises(ValueError, match="dtype"):
        AutoModelForCausalLM.from_pretrained(checkpoint, dtype="int8")
    with pytest.raises(ValueError, match="several devices"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"visual": "cpu", "model": "meta"})


def test_from_pretrained_config_settings(checkpoint):
    """pad_token_id and use_cache are taken (through the Auto class or the model class); keys that describe the
    checkpoint are refused by name instead of being dropped."""
    for load in (AutoModelForCausalLM.from_pretrained, InfiniteVLForConditionalGeneration.from_pretrained):
        model = load(checkpoint, pad_token_id=3, use_cache=False)
        assert model.config.pad_token_id == 3 and model.config.use_cache is False
        assert model.generation_config.pad_token_id == 3  # what generate() pads finished rows with
        assert getattr(model(input_ids=torch.tensor([[5, 6]])), CACHE_NAME) is None  # use_cache=False holds
    with pytest.raises(ValueError, match=r"sliding_window: 8 -> 16 \(given -> file\)"):
        AutoModelForCausalLM.from_pretrained(checkpoint, sliding_window=8)
    with pytest.raises(ValueError, match=r"\['sliding_window'\] describe the checkpoint"):
        InfiniteVLForConditionalGeneration.from_pretrained(checkpoint, sliding_window=8)


@pytest.fixture(scope="module")
def parity():
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_TINY / "model")
    return model, load_file(str(REFERENCE_TINY / "cases.safetensors"))


@pytest.mark.parametrize("case", ["text", "image", "video", "two_images"])
def test_parity_fixture_through_auto_model(parity, case):
    model, cases = parity
    vision = {k: cases[f"{case}.{k}"] for k in VISION_KEYS if f"{case}.{k}" in cases}
    with torch.no_grad():
        logits = model(input_ids=cases[f"{case}.input_ids"], **vision).logits
    diff = (logits - cases[f"{case}.logits"]).abs()
    assert diff.max() < 5e-2 and diff.mean() < 2e-3, (case, diff.max().item(), diff.mean().item())
    if case == "image":  # greedy tokens too (all cases are checked on the core in tests/model/test_parity.py)
        ids = cases[f"{case}.input_ids"]
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, **vision)
        assert got.tolist() == cases[f"{case}.generated"].tolist()


def test_generate_continues_a_given_state_under_either_name(fp32):
    """generate(cache=...) and generate(past_key_values=...) both use the given state (transformers 5.24 renamed
    the argument; the model passes it on under the installed version's name)."""
    model, _ = fp32
    ids = torch.randint(0, 151000, (2, 10))
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    for name in ("cache", "past_key_values"):
        state = InferenceStateCache()
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             **{name: state})
        assert torch.equal(got, want) and state.columns == 13  # the prompt and 3 fed-back tokens went through it


def test_generate_restarts_from_a_returned_cache(fp32):
    """transformers' "reuse the cache" pattern, in both of its forms: the whole conversation with an attention mask
    as long, or only the new tokens (the mask may cover the whole conversation). Only the columns the state has
    not consumed are fed."""
    model, _ = fp32
    ids = torch.randint(0, 151000, (1, 12), generator=torch.Generator().manual_seed(5))
    follow = torch.randint(0, 151000, (1, 4), generator=torch.Generator().manual_seed(6))

    def first():
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        return out.sequences, getattr(out, CACHE_NAME)

    seq, _ = first()
    full = torch.cat([seq, follow], 1)
    fresh = model.generate(input_ids=full, max_new_tokens=4, do_sample=False)[:, full.shape[1]:]
    forms = {"whole conversation": lambda c: dict(input_ids=full, attention_mask=torch.ones_like(full)),
             "new tokens, whole mask": lambda c: dict(input_ids=full[:, c:], attention_mask=torch.ones_like(full)),
             "whole conversation, no mask": lambda c: dict(input_ids=full)}  # transformers: no mask = all ones
    for name, inputs in forms.items():
        seq, cache = first()
        consumed = cache.columns  # the prompt and 4 of the 5 new tokens
        again = model.generate(**inputs(consumed), max_new_tokens=4, do_sample=False, **{CACHE_NAME: cache})
        assert again[:, -4:].tolist() == fresh.tolist(), name
        assert cache.columns == full.shape[1] + 3, name
    seq, cache = first()
    with pytest.raises(ValueError, match="prefill_chunk_size with a returned cache"):
        model.generate(input_ids=follow, max_new_tokens=2, prefill_chunk_size=2, **{CACHE_NAME: cache})
    with pytest.raises(ValueError, match="nothing new to generate from"):
        model.generate(input_ids=seq[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=2,
                       **{CACHE_NAME: cache})


def test_a_generated_placeholder_token_is_text(fp32):
    """A model may emit an image or video placeholder id: generation goes on (in a prompt, a placeholder without
    pixels is still an error)."""
    model, processor = fp32
    inputs = processor(text=["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    image_id = model.config.image_token_id
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, sequence_bias={(image_id,): 100.0})
    assert out[0, -3:].tolist() == [image_id] * 3
    with pytest.raises(ValueError, match="no image pixels"):
        model(input_ids=torch.tensor([[5, image_id, 6]]))


def test_gradient_checkpointing_and_unsupported_outputs(fp32):
    model, _ = fp32
    ids = torch.randint(0, 151000, (1, 16), generator=torch.Generator().manual_seed(7))
    model.train()
    try:
        plain = model(input_ids=ids, labels=ids).loss
        plain.backward()
        want = model.model.layers[1].mlp.down_proj.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_enable()
        assert model.model.gradient_checkpointing and model.model.recomputes(0)
        again = model(input_ids=ids, labels=ids).loss
        again.backward()
        torch.testing.assert_close(again, plain)
        torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight.grad, want, atol=1e-6, rtol=1e-5)
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert not model.model.gradient_checkpointing
    for name in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=name):
            model(input_ids=ids, **{name: True})


def test_saving_over_a_sharded_checkpoint_loads_what_was_saved(checkpoint, tmp_path):
    import json

    from safetensors.torch import save_file

    d = tmp_path / "sharded"
    shutil.copytree(checkpoint, d)
    weights = load_file(str(d / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file({k: weights[k] for k in part}, str(d / f"model-0000{i + 1}-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: f"model-0000{1 if k in names[:half] else 2}-of-00002.safetensors" for k in names}}))
    (d / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["stray"] = "vocab.json"  # a malformed entry: saving must not delete that file
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    model.save_pretrained(d)
    assert not (d / "model.safetensors.index.json").exists() and not list(d.glob("model-0000*"))
    assert (d / "vocab.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(d)
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_bad_generate_and_forward_arguments_are_named(fp32):
    model, _ = fp32
    ids = torch.randint(0, 151000, (2, 6), generator=torch.Generator().manual_seed(8))
    cases = [
        (lambda: model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="dynamic"),
         "cache_implementation does not apply"),
        (lambda: model.generate(input_ids=ids, attention_mask=torch.tensor([[1] * 6, [0] * 6]), max_new_tokens=2),
         r"row\(s\) \[1\] of attention_mask have no real token"),
        (lambda: model(input_ids=ids[0]), r"input_ids must be \[batch, tokens\].*input_ids\[None\]"),
        (lambda: model(input_ids=ids, labels=ids[:, :3]), "labels must be a tensor shaped like input_ids"),
        (lambda: model.generate(input_ids=ids[:, :0], max_new_tokens=2), "the prompt is empty"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def _right_padded(rows):
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def test_right_padding_keeps_the_callers_prompt_and_holds_over_turns(fp32):
    """The returned sequences start with the prompt as given; a second turn (without a cache, or restarting the
    returned cache) with right-padded new tokens still gives each row what it gives alone."""
    model, _ = fp32
    g = torch.Generator().manual_seed(9)
    first = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (9, 5)]
    then = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (2, 6)]
    ids, mask = _right_padded(first)
    out = model.generate(inputs=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids)  # the prompt as given, padding where it was
    new = out.sequences[:, ids.shape[1]:]
    follow, follow_mask = _right_padded(then)
    conversation = torch.cat([out.sequences, follow], 1)
    conversation_mask = torch.cat([mask, torch.ones_like(new), follow_mask], 1)
    want = []
    for row in range(2):
        alone = torch.tensor([first[row] + new[row].tolist() + then[row]])
        want.append(model.generate(input_ids=alone, max_new_tokens=3, do_sample=False)[0, -3:].tolist())
    again = model.generate(input_ids=conversation, attention_mask=conversation_mask, max_new_tokens=3,
                           do_sample=False)
    assert again[:, -3:].tolist() == want  # no cache: the whole conversation again
    cache = getattr(out, CACHE_NAME)
    restarted = model.generate(input_ids=conversation, attention_mask=conversation_mask, max_new_tokens=3,
                               do_sample=False, **{CACHE_NAME: cache})
    assert restarted[:, -3:].tolist() == want  # the returned cache, right-padded new tokens


def test_restart_limits_and_prompt_placeholders_in_chunks(fp32):
    model, _ = fp32
    ids = torch.randint(0, 151000, (1, 8), generator=torch.Generator().manual_seed(10))
    out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, CACHE_NAME)
    with pytest.raises(ValueError, match="images or videos in a continued conversation"):
        model.generate(input_ids=ids[:, :2], pixel_values=torch.zeros(4, 1176), image_grid_thw=torch.tensor([[1, 2, 2]]),
                       max_new_tokens=2, **{CACHE_NAME: cache})
    with pytest.raises(ValueError, match="nothing new"):
        model.generate(input_ids=ids[:, :3], attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2,
                       **{CACHE_NAME: cache})
    assert cache.pending is None  # a refused restart leaves nothing behind
    forgot = torch.cat([ids, torch.tensor([[model.config.image_token_id]])], 1)  # a placeholder but no pixels
    for chunk in (None, 1, 4):
        with pytest.raises(ValueError, match="no image pixels"):
            model.generate(input_ids=forgot, max_new_tokens=2, prefill_chunk_size=chunk)


def test_a_row_with_no_new_tokens_continues_from_its_last_real_token(fp32):
    """A cache filled by hand (all logits kept), then generate() with new tokens for one row only: the other row
    answers from the last real token it had."""
    model, _ = fp32
    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (6, 2)]
    extra = torch.randint(0, 151000, (2,), generator=g).tolist()
    ids, mask = _right_padded(rows)
    want = [model.generate(input_ids=torch.tensor([r]), max_new_tokens=3, do_sample=False)[0, -3:].tolist()
            for r in (rows[0] + extra, rows[1])]
    for keep in (0, 1):
        cache = InferenceStateCache()
        model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, cache=cache)
        new, new_mask = _right_padded([extra, [0]])
        new_mask[1] = 0  # nothing new for row 1
        out = model.generate(input_ids=new, attention_mask=torch.cat([mask, new_mask], 1), max_new_tokens=3,
                             do_sample=False, **{CACHE_NAME: cache})
        assert out[:, -3:].tolist() == want, keep


def test_a_restart_mask_that_contradicts_the_state_is_refused(fp32):
    model, _ = fp32
    ids = torch.randint(0, 151000, (1, 6), generator=torch.Generator().manual_seed(12))
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, CACHE_NAME)
    conversation = torch.cat([out.sequences, torch.tensor([[5, 6]])], 1)
    mask = torch.ones_like(conversation)
    mask[0, 6] = 0  # a consumed (generated) column now marked as padding: the state cannot take it back
    with pytest.raises(ValueError, match="marks other earlier columns as real than the state consumed"):
        model.generate(input_ids=conversation, attention_mask=mask, max_new_tokens=2, **{CACHE_NAME: cache})
