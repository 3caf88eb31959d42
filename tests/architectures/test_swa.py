"""Sliding-window attention: the teacher exactly when the window covers the sequence (every family), a
sliding-window teacher exactly with its own window, sinks, and a ring-buffer cache of bounded size."""

import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from mixerswap.architectures.cache import HybridMixerCache, WindowKVLayer
from mixerswap.architectures.mixers.common import PADDING_MASK_KWARG
from mixerswap.architectures.mixers.swa import SlidingWindowMixer, SWASettings
from mixerswap.convert import convert

from ..conftest import FAMILIES, build_teacher, family_config

HIDDEN = 32


def ids(*shape, seed=0):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def save_teacher(family, path, **config_overrides):
    torch.manual_seed(0)
    model = build_teacher(family)
    if config_overrides:
        config = family_config(family)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_window_covering_the_sequence_is_the_teacher(family, tmp_path):
    """fp32, <= 1e-5: q/k norms, partial rotary, llama3 RoPE, Gemma's scale and softcap all reused."""
    # a sliding-window teacher is given a window longer than the sequence, so it is full attention too
    overrides = {"sliding_window": 64} if getattr(family_config(family), "sliding_window", None) else {}
    teacher = save_teacher(family, tmp_path / "t", **overrides)
    convert(tmp_path / "t", tmp_path / "s", to="swa", mixer_settings={"window": 21, "sinks": 2}, progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    x = ids(2, 21)
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, teacher(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family, attention_layers", [("mistral", []), ("gemma2", [1]), ("gemma3_text", [])])
def test_sliding_window_teacher_with_its_window_is_the_teacher(family, attention_layers, tmp_path):
    """The pico teachers have ``sliding_window=6``; 21 tokens cross it. Gemma-2's full layer (1) stays."""
    teacher = save_teacher(family, tmp_path / "t")
    convert(tmp_path / "t", tmp_path / "s", to="swa", attention_layers=attention_layers, progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert student.layer_mixer(0).settings.window == 6 and student.layer_mixer(0).settings.sinks == 0
    x = ids(2, 21)
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, teacher(x).logits, rtol=0, atol=1e-5)
        generated = student.generate(x[:1, :9], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        expected = teacher.generate(x[:1, :9], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.tolist() == expected.tolist()


def make_mixer(window, sinks, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = SWASettings(n_heads=4, n_kv_heads=2, head_dim=8, window=window, sinks=sinks, **overrides)
    mixer = SlidingWindowMixer(settings, HIDDEN, layer_idx=0)
    mixer.init_parameters(std=0.3)
    return mixer.double().eval()


def rope(seqlen, start=0, batch=2):
    position_ids = torch.arange(start, start + seqlen)[None].expand(batch, -1)
    freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    angles = position_ids[..., None].double() * freq
    emb = torch.cat([angles, angles], -1)
    return position_ids, (emb.cos(), emb.sin())


def run(mixer, h, steps, **kwargs):
    """``h`` through a fresh cache in pieces of ``steps`` tokens; returns outputs and the cache layer."""
    cache = HybridMixerCache(family_config("llama"), {0: mixer.new_cache_layer()})
    outs, start = [], 0
    for n in steps:
        position_ids, pe = rope(n, start, h.shape[0])
        extra = {k: v[:, : start + n] for k, v in kwargs.items()}
        with torch.no_grad():
            outs.append(mixer(h[:, start : start + n], position_ids=position_ids, past_key_values=cache,
                              position_embeddings=pe, **extra)[0])
        start += n
    return torch.cat(outs, 1), cache.mixer_layer(0)


def reference(mixer, h):
    """Naive per-query softmax over the keys its window and sinks allow."""
    s = mixer.settings
    position_ids, pe = rope(h.shape[1], 0, h.shape[0])
    q, k, v = (t.transpose(1, 2) for t in mixer.project(h, pe))
    rep = s.n_heads // s.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros_like(q)
    for i in range(h.shape[1]):
        keys = sorted(set(range(max(0, i - s.window + 1), i + 1)) | set(range(min(s.sinks, i + 1))))
        p = torch.softmax(q[:, :, i : i + 1] @ k[:, :, keys].transpose(-1, -2) * s.head_dim**-0.5, -1)
        out[:, :, i] = (p @ v[:, :, keys])[:, :, 0]
    return mixer.o_proj(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))


@pytest.mark.parametrize("seqlen", [1, 63, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("window", [1, 16, 64], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("sinks", [0, 4], ids=lambda s: f"sinks{s}")
@pytest.mark.parametrize("block", [256, 7], ids=lambda b: f"block{b}")
def test_parallel_equals_reference_and_decoding(seqlen, window, sinks, block):
    mixer = make_mixer(window, sinks)
    mixer.query_block = block  # queries per block of the forward: the result must not depend on it
    h = torch.randn(2, seqlen, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(seqlen))
    full, _ = run(mixer, h, [seqlen])
    torch.testing.assert_close(full, reference(mixer, h), rtol=1e-10, atol=1e-12)
    stepped, layer = run(mixer, h, [1] * seqlen)
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-12)
    third = seqlen // 3
    chunked, _ = run(mixer, h, [third, third, seqlen - 2 * third] if third else [seqlen])  # multi-token continuations
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-12)
    assert layer.get_seq_length() == seqlen


def test_ring_buffer_bytes_do_not_grow():
    mixer = make_mixer(window=16, sinks=4).float()
    h = torch.randn(2, 200, HIDDEN)
    sizes = {}
    for length in (20, 200):
        _, layer = run(mixer, h[:, :length], [8] + [1] * (length - 8))
        assert isinstance(layer, WindowKVLayer)
        sizes[length] = layer.nbytes()
        assert layer.keys.shape[2] == 16 + 4
    assert sizes[20] == sizes[200]


def test_left_padding_and_sinks_are_the_rows_own_first_tokens():
    """A left-padded row gives what the row alone gives, prefill and decoding, sinks included."""
    mixer = make_mixer(window=5, sinks=2)
    mixer.query_block = 4
    h = torch.randn(2, 30, HIDDEN, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    batched, _ = run(mixer, h, [12] + [1] * 18, **{PADDING_MASK_KWARG: mask})
    alone, _ = run(mixer, h[1:, 7:], [5] + [1] * 18)
    torch.testing.assert_close(batched[1:, 7:], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", [256, 3], ids=lambda b: f"block{b}")
def test_packed_documents_do_not_see_each_other(block):
    mixer = make_mixer(window=4, sinks=1)
    mixer.query_block = block  # small blocks: later documents' sinks lie before the window of their block
    h = torch.randn(1, 19, HIDDEN, dtype=torch.float64)
    lengths = [7, 1, 11]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    pe = rope(19)[1]
    pe = tuple(t[:1, position_ids[0]] for t in pe)
    with torch.no_grad():
        packed = mixer(h, position_ids=position_ids, position_embeddings=pe)[0]
        for doc, part in zip(h.split(lengths, 1), packed.split(lengths, 1), strict=True):
            position_ids, pe = rope(doc.shape[1], batch=1)
            torch.testing.assert_close(part, mixer(doc, position_ids=position_ids, position_embeddings=pe)[0])


@pytest.mark.parametrize("setting, message", [({"window": 0}, "window"), ({"sinks": -1}, "sinks"),
                                              ({"n_heads": 3}, "multiple")])
def test_bad_settings_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        SWASettings(**{"n_heads": 4, "n_kv_heads": 2, "head_dim": 8, **setting})


def test_gemma2_full_layers_get_the_default_window_and_local_layers_their_own(teacher_dir, tmp_path):
    from mixerswap.convert import convert

    result = convert(teacher_dir("gemma2"), tmp_path / "s", to="swa", progress=False)
    windows = [(entry["window"], entry["sinks"]) for entry in result.plan]
    assert windows == [(6, 0), (512, 4), (6, 0)]  # layer_types: sliding, full, sliding


@pytest.mark.parametrize("kind", ["swa", "linear"])
def test_a_forward_holds_scores_for_a_block_and_its_window_not_the_whole_sequence(kind, monkeypatch):
    from mixerswap.architectures.mixers.linear import LinearAttentionMixer, LinearSettings

    if kind == "swa":
        mixer = make_mixer(window=16, sinks=2)
    else:
        torch.manual_seed(0)
        mixer = LinearAttentionMixer(LinearSettings(n_heads=4, n_kv_heads=2, head_dim=8, window=16), HIDDEN, 0)
        mixer.init_parameters(std=0.3)
        mixer = mixer.double().eval()
    mixer.query_block = 32
    widths = []
    scores = type(mixer).scores
    monkeypatch.setattr(type(mixer), "scores", lambda self, q, k: widths.append(k.shape[2]) or scores(self, q, k))
    h = torch.randn(1, 300, HIDDEN, dtype=torch.float64)
    run(mixer, h, [300])
    assert len(widths) == 10 and max(widths) <= 32 + 16 - 1 + 2  # a block, its window and the sinks
