"""The real trained stories260k Llama (shared test data): exact round trip and a working hybrid."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerswap.convert import convert


def test_stories260k_round_trip_and_hybrid(stories_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    ids = tokenizer("Once upon a time, there was a little girl who loved", return_tensors="pt").input_ids
    teacher = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    convert(stories_dir, tmp_path / "same", keep_attention=1.0, progress=False)
    convert(stories_dir, tmp_path / "hybrid", keep_attention=0.4, progress=False)
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "same").eval()
    hybrid = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert (tmp_path / "hybrid" / "tokenizer.json").exists()
    with torch.no_grad():
        assert (same(ids).logits - teacher(ids).logits).abs().max().item() <= 1e-5
        out = hybrid.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        seq = ids
        for _ in range(10):
            logits = hybrid(seq, use_cache=False).logits[:, -1]
            logits[:, hybrid.generation_config.eos_token_id] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert out.tolist() == seq.tolist()
    assert hybrid.config.conversion["attention_layers"] == [1, 3]
