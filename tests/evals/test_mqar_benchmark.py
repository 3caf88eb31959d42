"""benchmarks/mqar.py: its MQAR chats reach the trainer as the probe's sequences with only the answers
learned, and a --quick run converts, distills and measures every row it is asked for."""

import json

import torch

from mixerswap.distill.data import Chat, PackedLoader
from mixerswap.distill.masks import next_token_labels
from mixerswap.evals.probes import MQARSpec, mqar_batch
from ..conftest import load_benchmark


def load_script():
    return load_benchmark("mqar")


def test_chats_pack_to_mqar_rows_with_answer_targets():
    bench = load_script()
    spec, length = MQARSpec(vocab_size=64, num_pairs=8), 64
    ids, positions, answers = mqar_batch(spec, length, 4, seed=5)
    chats = [Chat(messages) for messages in bench.mqar_chats(spec, length, 4, seed=5)]
    batch = next(iter(PackedLoader(chats, bench.word_tokenizer(64), seq_len=length, batch_size=4, shuffle=False)))
    assert torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["position_ids"], torch.arange(length).expand(4, -1))
    targets = next_token_labels(batch)
    assert torch.equal((targets != -100).nonzero()[:, 1].view(4, -1), positions.expand(4, -1))
    assert torch.equal(targets[:, positions], answers)


def test_quick_run_writes_one_row_per_student(tmp_path):
    out = tmp_path / "mqar.json"
    report = load_script().main(["--quick", "--kinds", "swa,gdn", "--keep", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["complete"]
    assert [(r["kind"], r["attention_kept"]) for r in report["rows"]] == [("swa", 0.0), ("gdn", 0.0)]
    for row in report["rows"]:
        assert 0.0 <= row["mqar_init"] <= 1.0 and 0.0 <= row["mqar_final"] <= 1.0
        assert row["tokens"] == 4096 and row["answer_ppl_final"] > 0
    assert report["rows"][0]["settings"]["mixer"] == {"window": 16, "sinks": 0}


def test_quick_run_compares_kl_selection_with_uniform(tmp_path):
    report = load_script().main(["--quick", "--kinds", "mamba2", "--keep", "0,0.5", "--select", "uniform,kl,kl-init"])
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["mamba2-0", "mamba2-50", "mamba2-50-kl", "mamba2-50-kl-init"]  # nothing to select at 0%
    assert rows["mamba2-50-kl"]["select"] == "kl" and rows["mamba2-50"]["select"] is None
    assert all(rows[n]["plan"].count("attention") == 1 for n in ("mamba2-50", "mamba2-50-kl", "mamba2-50-kl-init"))
