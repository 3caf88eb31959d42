"""LoLCATs linear attention: the teacher when the softmax share is 1 and the window covers the sequence,
a naive per-query reference, decoding == parallel, bounded cache, padding and documents invisible."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap.architectures import PlanError
from mixerswap.architectures.mixers.common import PADDING_MASK_KWARG
from mixerswap.architectures.mixers.linear import LinearAttentionMixer, LinearSettings
from mixerswap.convert import convert

from ..conftest import FAMILIES, family_config
from .test_swa import HIDDEN, ids, rope, run, save_teacher


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_share_one_and_covering_window_is_the_teacher(family, tmp_path):
    overrides = {"sliding_window": 64} if getattr(family_config(family), "sliding_window", None) else {}
    teacher = save_teacher(family, tmp_path / "t", **overrides)
    convert(tmp_path / "t", tmp_path / "s", to="linear", mixer_settings={"window": 21}, progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    x = ids(2, 21)
    with torch.no_grad():
        for mixer in student.mixers():
            mixer.window_factors.fill_(float("inf"))
        torch.testing.assert_close(student(x).logits, teacher(x).logits, rtol=0, atol=1e-5)


def test_softmax_share_one_is_sliding_window_attention(teacher_dir, tmp_path):
    """Below the sequence length: the linear branch silenced leaves exactly ``swa`` without sinks."""
    convert(teacher_dir("qwen3"), tmp_path / "lin", to="linear", mixer_settings={"window": 5}, progress=False)
    convert(teacher_dir("qwen3"), tmp_path / "swa", to="swa", mixer_settings={"window": 5, "sinks": 0}, progress=False)
    linear = AutoModelForCausalLM.from_pretrained(tmp_path / "lin").eval()
    swa = AutoModelForCausalLM.from_pretrained(tmp_path / "swa").eval()
    x = ids(2, 21)
    with torch.no_grad():
        assert (linear(x).logits - swa(x).logits).abs().max() > 1e-4  # the linear branch matters at init
        for mixer in linear.mixers():
            mixer.window_factors.fill_(float("inf"))
        torch.testing.assert_close(linear(x).logits, swa(x).logits, rtol=0, atol=1e-5)


def make_mixer(window, feature_map="hedgehog", seed=0):
    torch.manual_seed(seed)
    settings = LinearSettings(n_heads=4, n_kv_heads=2, head_dim=8, window=window, feature_map=feature_map)
    mixer = LinearAttentionMixer(settings, HIDDEN, layer_idx=0)
    mixer.init_parameters(std=0.3)
    with torch.no_grad():
        for p in (mixer.feature_map_q, mixer.feature_map_k, mixer.window_factors):
            p.add_(0.3 * torch.randn_like(p))
    return mixer.double().eval()


def reference(mixer, h):
    """Per query: softmax weights (rotated q, k) in the window, feature-map weights (unrotated q, k) before
    it, one normalizer."""
    s = mixer.settings
    _, pe = rope(h.shape[1], 0, h.shape[0])
    q_raw, k_raw, _ = (t.transpose(1, 2) for t in mixer.project_unrotated(h))
    q, k, v = (t.transpose(1, 2) for t in mixer.project(h, pe))
    rep = s.n_heads // s.n_kv_heads
    phi_q = mixer.features(q_raw, mixer.feature_map_q)
    phi_k = mixer.features(k_raw, mixer.feature_map_k).repeat_interleave(rep, 1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    w = torch.sigmoid(mixer.window_factors)[None, :, None]
    out = torch.zeros_like(q)
    for i in range(h.shape[1]):
        near = list(range(max(0, i - s.window + 1), i + 1))
        far = list(range(0, max(0, i - s.window + 1)))
        scores = q[:, :, i : i + 1] @ k[:, :, near].transpose(-1, -2) * s.head_dim**-0.5
        a_near = w * torch.exp(scores - scores.amax(-1, keepdim=True))[:, :, 0]
        a_far = (1 - w) * (phi_q[:, :, i : i + 1] @ phi_k[:, :, far].transpose(-1, -2))[:, :, 0]
        num = (a_near[..., None] * v[:, :, near]).sum(2) + (a_far[..., None] * v[:, :, far]).sum(2)
        out[:, :, i] = num / (a_near.sum(-1, keepdim=True) + a_far.sum(-1, keepdim=True))
    return mixer.o_proj(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))


@pytest.mark.parametrize("seqlen", [1, 63, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("window", [1, 16, 64], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("block", [256, 7], ids=lambda b: f"block{b}")
def test_parallel_equals_reference_and_decoding(seqlen, window, block):
    mixer = make_mixer(window)
    mixer.query_block = block  # queries per block of the forward: the result must not depend on it
    h = torch.randn(2, seqlen, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(seqlen))
    full, _ = run(mixer, h, [seqlen])
    if seqlen < 100:
        torch.testing.assert_close(full, reference(mixer, h), rtol=1e-10, atol=1e-12)
    stepped, layer = run(mixer, h, [1] * seqlen)
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-12)
    third = seqlen // 3
    pieces, _ = run(mixer, h, [third, third, seqlen - 2 * third] if third else [seqlen])
    torch.testing.assert_close(pieces, full, rtol=1e-10, atol=1e-12)
    assert layer.get_seq_length() == seqlen


@pytest.mark.parametrize("feature_map", ["t2r", "elu"])
def test_other_feature_maps_decode_like_the_parallel_form(feature_map):
    mixer = make_mixer(5, feature_map)
    h = torch.randn(2, 23, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(run(mixer, h, [1] * 23)[0], run(mixer, h, [23])[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(run(mixer, h, [23])[0], reference(mixer, h), rtol=1e-10, atol=1e-12)


def test_cache_bytes_do_not_grow():
    mixer = make_mixer(16).float()
    h = torch.randn(2, 200, HIDDEN)
    sizes = {n: run(mixer, h[:, :n], [8] + [1] * (n - 8))[1].nbytes() for n in (20, 200)}
    assert sizes[20] == sizes[200]


def test_left_padded_row_equals_row_alone():
    mixer = make_mixer(4)
    h = torch.randn(2, 30, HIDDEN, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    batched, _ = run(mixer, h, [12] + [1] * 18, **{PADDING_MASK_KWARG: mask})
    alone, _ = run(mixer, h[1:, 7:], [5] + [1] * 18)
    torch.testing.assert_close(batched[1:, 7:], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", [256, 4], ids=lambda b: f"block{b}")
def test_packed_documents_equal_separate_runs(block):
    mixer = make_mixer(3)
    mixer.query_block = block
    lengths = [7, 1, 11]
    h = torch.randn(1, 19, HIDDEN, dtype=torch.float64)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    pe = tuple(t[:1, position_ids[0]] for t in rope(19)[1])
    with torch.no_grad():
        packed = mixer(h, position_ids=position_ids, position_embeddings=pe)[0]
        for doc, part in zip(h.split(lengths, 1), packed.split(lengths, 1), strict=True):
            position_ids, pe = rope(doc.shape[1], batch=1)
            torch.testing.assert_close(part, mixer(doc, position_ids=position_ids, position_embeddings=pe)[0])


@pytest.mark.parametrize("setting, message", [({"window": 0}, "window"), ({"feature_map": "cosine"}, "feature_map")])
def test_bad_settings_are_refused_in_one_line_and_nothing_is_written(setting, message, teacher_dir, tmp_path):
    with pytest.raises(PlanError, match=message) as err:
        convert(teacher_dir("llama"), tmp_path / "out", to="linear", mixer_settings=setting, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
