"""Teacher -> student: the teacher read into our code computes what transformers computes, and the
student reproduces the teacher exactly in every copied layer; the new GDN layers get the mimic init."""
from __future__ import annotations

import math

import pytest
import torch

from infinitevl import InfiniteVL
from infinitevl.training.student import (
    StudentSpec, build_student, convert, gdn_layer_indices, load_teacher, save_teacher,
)


@pytest.fixture(scope="module")
def hf_teacher(hf_teacher_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_teacher_dir, attn_implementation="eager").eval()


def _image_prompt(cfg, n_text=20, grid=(1, 4, 6)):
    n_img = grid[0] * grid[1] * grid[2] // 4
    ids = ([100 + i for i in range(n_text // 2)] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
           + [cfg.vision_end_token_id] + [200 + i for i in range(n_text // 2)])
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    return torch.tensor([ids]), pixels, torch.tensor([list(grid)])


def test_teacher_in_our_code_matches_transformers(hf_teacher_dir, hf_teacher):
    ours = load_teacher(hf_teacher_dir)
    ids, pixels, grid = _image_prompt(ours.config)
    mm = (ids == ours.config.image_token_id).long()
    with torch.no_grad():
        a = ours(ids, pixel_values=pixels, image_grid_thw=grid)
        b = hf_teacher(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm).logits
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_student_copies_every_kept_layer_exactly(hf_teacher_dir, hf_teacher):
    teacher = load_teacher(hf_teacher_dir)
    student = build_student(teacher, StudentSpec(sliding_window=4096, norm_eps=1e-6)).eval()
    gdn = gdn_layer_indices(student.config)
    assert gdn == [1, 2, 3] and student.config.text.layer_types[4] == "sliding_attention"

    # Every tensor outside the new GDN mixers is the teacher's, bit for bit.
    t_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if not any(name.startswith(f"model.layers.{i}.self_attn.") for i in gdn):
            assert torch.equal(tensor, t_state[name]), name

    # Each copied layer, fed the transformers teacher's input to that layer, gives its output.
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda m, args, kw, out, i=i: captured.__setitem__(
        i, (args[0] if args else kw["hidden_states"], out[0] if isinstance(out, tuple) else out)), with_kwargs=True)
        for i, layer in enumerate(hf_teacher.model.language_model.layers)]
    ids, pixels, grid = _image_prompt(student.config)
    mm = (ids == student.config.image_token_id).long()
    with torch.no_grad():
        hf_out = hf_teacher(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm,
                            output_hidden_states=True)
    for h in hooks:
        h.remove()
    from infinitevl.model.decoder import token_indices
    from infinitevl.ops.rope import mrope_cos_sin, rope_inv_freq

    with torch.no_grad():
        emb = student.embed(ids, pixel_values=pixels, image_grid_thw=grid)
        torch.testing.assert_close(emb, captured[0][0], atol=1e-6, rtol=0)  # vision tower + merger + embeddings
        pos, _ = student.positions(ids, image_grid_thw=grid)
        tc = student.config.text
        cos, sin = mrope_cos_sin(pos, rope_inv_freq(tc.head_dim, tc.rope_theta), tc.mrope_section)
        tok_idx, seg = token_indices(1, ids.shape[1], ids.device)
        for i, layer in enumerate(student.model.layers):
            if i in gdn:
                continue
            x_in, x_out = captured[i]
            y = layer(x_in, cos=cos, sin=sin, tok_idx=tok_idx, mask=None, state=None, cu_seqlens=None, seg=seg)
            torch.testing.assert_close(y, x_out, atol=1e-5, rtol=1e-5)
        last = captured[len(student.model.layers) - 1][1]
        torch.testing.assert_close(student.lm_head(student.model.norm(last)), hf_out.logits, atol=1e-5, rtol=1e-5)


def test_mimic_init_and_conversion_dir(hf_teacher_dir, tmp_path):
    student = convert(hf_teacher_dir, tmp_path / "student", StudentSpec(sliding_window=64))
    gdn = student.model.layers[1].self_attn
    assert torch.all(gdn.A_log == 0) and torch.all(gdn.a_proj.weight == 0) and torch.all(gdn.b_proj.weight == 0)
    torch.testing.assert_close(torch.nn.functional.softplus(gdn.dt_bias), torch.full_like(gdn.dt_bias, 1e-3))
    for conv in (gdn.q_conv1d, gdn.k_conv1d, gdn.v_conv1d):
        assert torch.all(conv.weight[:, 0, -1] == 1) and torch.all(conv.weight[:, 0, :-1] == 0)
    with torch.no_grad():
        assert math.isclose(float(torch.sigmoid(gdn.b_proj(torch.randn(1, 64)))[0, 0]), 0.5)
    reloaded = InfiniteVL.from_pretrained(tmp_path / "student")
    assert reloaded.config == student.config
    assert (tmp_path / "student/tokenizer.json").exists() and (tmp_path / "student/preprocessor_config.json").exists()


def test_teacher_round_trip_and_bad_teacher(hf_teacher_dir, tmp_path):
    teacher = load_teacher(hf_teacher_dir)
    save_teacher(teacher, tmp_path / "t")
    again = load_teacher(tmp_path / "t")
    for (k, a), (_, b) in zip(teacher.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/config.json").write_text('{"model_type": "infinite_vl"}')
    with pytest.raises(ValueError, match="Qwen2.5-VL"):
        load_teacher(tmp_path / "bad")
