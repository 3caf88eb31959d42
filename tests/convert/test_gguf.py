"""GGUF teachers end to end: a pico Llama written as GGUF (float32 tensors, llama.cpp's layout) is read,
dequantized into an HF folder with the special tokens the file declares, and converted exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T

from mixerswap.convert import convert
from mixerswap.convert.gguf import cached_folder, gguf_as_hf_folder, gguf_metadata
from mixerswap.demo import build_tokenizer, demo_text

gguf = pytest.importorskip("gguf")


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from transformers' rotate-half layout to the interleaved one llama.cpp writes (per head,
    the rows (i, i + d/2) become neighbours); transformers undoes this when it reads the file."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_llama_gguf(path, model: T.LlamaForCausalLM, tokenizer, special: dict[str, int]) -> None:
    """``model`` and ``tokenizer`` as a GGUF file with float32 tensors and the ``special`` token ids."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    specials = set(tokenizer.all_special_ids)
    writer.add_token_types([3 if index in specials else 1 for _, index in vocab])  # 3 = control
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(special["bos"])
    writer.add_eos_token_id(special["eos"])
    writer.add_pad_token_id(special["pad"])
    writer.add_add_bos_token(False)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = model.state_dict()
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    if not cfg.tie_word_embeddings:  # llama.cpp leaves the head out when it is the embedding
        writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    for layer in range(cfg.num_hidden_layers):
        for hf, name in names.items():
            weight = state[f"model.layers.{layer}.{hf}.weight"]
            if name == "attn_q":
                weight = _interleave_rotary(weight, cfg.num_attention_heads)
            elif name == "attn_k":
                weight = _interleave_rotary(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{name}.weight", np.ascontiguousarray(weight.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pico_gguf(request, tmp_path_factory):
    """``(gguf path, the HF model it was written from, tokenizer)``: 2 layers, GQA 4/2, the output head
    its own matrix or the embedding (as SmolLM2's)."""
    tokenizer = build_tokenizer(demo_text(), vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})  # id 300: the declared eos
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           rms_norm_eps=1e-5, tie_word_embeddings=request.param, bos_token_id=0, eos_token_id=300)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("gguf") / "pico.F32.gguf"
    write_llama_gguf(path, model, tokenizer, {"bos": 0, "eos": 300, "pad": 1})
    return path, model, tokenizer


def test_a_gguf_teacher_becomes_an_hf_folder_with_its_weights_and_declared_special_tokens(pico_gguf, tmp_path,
                                                                                            monkeypatch):
    path, model, tokenizer = pico_gguf
    monkeypatch.setenv("MIXERSWAP_CACHE", str(tmp_path / "cache"))
    assert gguf_metadata(path, ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.model", "absent"]) == {
        "tokenizer.ggml.eos_token_id": 300, "tokenizer.ggml.model": "gpt2"}

    folder = gguf_as_hf_folder(path)
    assert folder == cached_folder(path) and not (folder / "config.json").read_text().count("quantization")
    loaded_tokenizer = T.AutoTokenizer.from_pretrained(folder)
    special = (loaded_tokenizer.bos_token, loaded_tokenizer.eos_token, loaded_tokenizer.pad_token)
    assert special == ("<s>", "<|end|>", "</s>")
    assert (loaded_tokenizer.eos_token_id, loaded_tokenizer.pad_token_id) == (300, 1)
    assert loaded_tokenizer.clean_up_tokenization_spaces is False
    text = "Once upon a time there was a little dog."
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]

    teacher = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_gguf_file_converts_exactly_to_mla(pico_gguf, tmp_path, monkeypatch):
    """``convert`` reads the .gguf directly: the exact MLA student matches the model the file was written from."""
    path, model, tokenizer = pico_gguf
    monkeypatch.setenv("MIXERSWAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "student"
    convert(path, out, to="mla", mixer_settings={"exact": True}, progress=False)
    student = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert T.AutoTokenizer.from_pretrained(out).eos_token == "<|end|>"
    ids = torch.tensor([tokenizer("The cat sat on the mat and looked at the sun.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep", [3, 20, 0.5, 0.99], ids=["magic-only", "header", "half", "last-tensor"])
def test_a_damaged_or_cut_short_gguf_is_refused_in_one_line_and_nothing_is_cached(pico_gguf, tmp_path, monkeypatch,
                                                                                  keep):
    """An interrupted download (any cut point) or a file that is no GGUF at all: a one-line error that says
    to download it again, and no cached folder that a later run would take for the teacher."""
    from mixerswap.convert.checkpoint_io import CheckpointError

    path, _, _ = pico_gguf
    monkeypatch.setenv("MIXERSWAP_CACHE", str(tmp_path / "cache"))
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="not a GGUF file|cut short.*download it again") as err:
        gguf_as_hf_folder(cut)
    assert "\n" not in str(err.value)
    assert not (cached_folder(cut) / "config.json").exists()

    other = tmp_path / "model.gguf"
    other.write_text("not a gguf\n")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        gguf_as_hf_folder(other)
