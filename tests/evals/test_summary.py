"""The demo's evaluation table: the demo's own teacher and a student of it, every measure present."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerswap.convert import convert
from mixerswap.demo import demo_text, packaged_teacher
from mixerswap.evals.summary import demo_eval_report


def test_demo_eval_report_on_the_demo_models(tmp_path):
    convert(packaged_teacher(), tmp_path / "student", keep_attention=0.4, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(packaged_teacher())
    teacher = AutoModelForCausalLM.from_pretrained(packaged_teacher()).eval()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    held_out = torch.tensor(tokenizer(demo_text())["input_ids"])
    table = demo_eval_report(teacher, student, tokenizer, held_out)
    lines = table.splitlines()
    cells = lambda line: [c.strip() for c in line.split("|")[1:-1]]  # noqa: E731
    assert cells(lines[0]) == ["measure", "teacher", "student", "student / teacher"]
    for measure in ("held-out perplexity", "MQAR accuracy @ 32", "prefill tokens/s @ 192", "decode tokens/s @ 64",
                    "cache KiB @ 192+8"):
        assert any(line.startswith(f"| {measure}") for line in lines), measure
    cache = cells(next(line for line in lines if line.startswith("| cache KiB @ 192+8")))
    assert float(cache[2]) < float(cache[1])  # 3 of 5 layers keep a fixed-size state instead of keys/values
    assert any("timing wall_clock, 1 warm-up and 3 timed repeat(s)" in line for line in lines)
    assert "torch reference kernels" in lines[-1]  # on CPU: said, since their speed is not the point
    text_report = demo_eval_report(teacher, student, tokenizer, demo_text())
    from_text = cells(text_report.splitlines()[2])
    from_ids = cells(lines[2])
    assert from_text[0] == from_ids[0] == "held-out perplexity"
    assert float(from_text[1]) > 1 and float(from_text[2]) > 1
    assert "held-out perplexity" not in demo_eval_report(teacher, student, tokenizer, None)
