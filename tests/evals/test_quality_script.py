"""benchmarks/quality.py end to end on the packaged stories260k teacher at a toy budget: rows, table, merge."""

import json
import lzma
import sys

import pytest

from ..conftest import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def test_quality_rows_table_and_merge(quality, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q.json"
    extra = tmp_path / "extra.jsonl.xz"
    with lzma.open(extra, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": f"Tom saw a red ball number {i}. He was happy."}) + "\n" for i in range(3)))
    monkeypatch.setattr(sys, "argv", [
        "quality.py", "--rows", "mamba2-50,swa-25", "--stories", "60", "--tokens", "3k", "--seq-len", "64",
        "--batch-size", "4", "--gen-prompts", "2", "--gen-tokens", "8", "--agreement-tokens", "256",
        "--passkey-samples", "1", "--cache-lengths", "64,128", "--out", str(out), "--workdir", str(tmp_path / "w"),
        "--keep-students", "--train-text", str(extra), "--device", "cpu"])
    quality.main()
    report = json.loads(out.read_text())
    # the extra documents train (after the stories' own training part); held-out and calibration stay the stories'
    assert report["data"].endswith("and 3 training documents of extra.jsonl.xz") and report["mixed_precision"] == "no"
    assert report["held_out_rows"] == 8 and report["calibration_docs"] == 40  # the stories' defaults
    corpus = (tmp_path / "w" / "corpus.jsonl").read_text().splitlines()
    assert len(corpus) == 60 - 40 + 3 and json.loads(corpus[-1])["text"].startswith("Tom saw a red ball number 2")
    assert report["complete"] and [r["name"] for r in report["rows"]] == ["mamba2-50", "swa-25"]
    for row in report["rows"]:
        assert list(row["stage_ppl"]) == ["align", "hidden", "kd"]
        assert row["student_ppl_final"] == row["stage_ppl"]["kd"] and row["teacher_ppl"] < row["student_ppl_init"] * 1.05
        assert 0 <= row["gen_agreement"] <= 1 and 0 <= row["next_token_agreement"] <= 1
        assert list(row["cache_bytes_per_token"]) == ["64", "128"] and row["tokens"] == 3000
        assert row["stage_tokens"] == {"align": 750, "hidden": 750, "kd": 1500}
    mamba = report["rows"][0]
    assert mamba["plan"].count("attention") == 2 and mamba["student_ppl_final"] < mamba["student_ppl_init"]
    # the packaged teacher cannot retrieve a passkey in its 256 positions: the column says so
    assert report["passkey"] is None and mamba["passkey"] is None
    for name in ("mamba2-50", "swa-25"):  # --keep-students: both models of each row stay for further evaluation
        assert all((tmp_path / "w" / name / model / "config.json").exists() for model in ("student", "distilled"))
    printed = capsys.readouterr().out
    assert "| cache B/tok 64 | 128 | s |" in printed and "| mamba2-50 | 0.40 | x10 |" in printed

    again = tmp_path / "again.json"
    report["rows"] = [dict(report["rows"][1], name="swa-25-other")]
    again.write_text(json.dumps(report))
    quality.merge([out, again], tmp_path / "merged.json")
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [r["name"] for r in merged["rows"]] == ["mamba2-50", "swa-25", "swa-25-other"]
    assert (tmp_path / "merged.png").exists()


def test_passkey_cell_shows_exact_answers_and_the_share_of_digits(quality):
    assert quality.passkey_cell({"passkey": None}) == "n/a"
    assert quality.passkey_cell({"passkey": 0.0}) == "0.00"  # rows measured before the digits were
    assert quality.passkey_cell({"passkey": 0.0, "passkey_digits": 0.42}) == "0.00 (0.42)"


def test_keep_students_needs_a_workdir(quality, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["quality.py", "--rows", "mamba2-50", "--keep-students"])
    with pytest.raises(SystemExit, match="give --workdir DIR"):
        quality.main()


def test_training_text_reads_jsonl_and_paragraphs_and_names_bad_lines(quality, tmp_path):
    plain, jsonl, bad = tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    plain.write_text("First paragraph\nstill first.\n\n  \nSecond one.\n")
    jsonl.write_text(json.dumps({"text": "from jsonl", "source": "x"}) + "\n\n")
    assert quality.read_training_text([plain, jsonl]) == ["First paragraph\nstill first.", "Second one.", "from jsonl"]
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(SystemExit, match="line 2 of .*c.jsonl has no string 'text' field"):
        quality.read_training_text([bad])
    with pytest.raises(SystemExit, match="does not exist"):
        quality.read_training_text([tmp_path / "missing.jsonl"])


def test_resume_continues_a_stopped_row_to_the_uninterrupted_result(quality, tmp_path, monkeypatch, capsys):
    def argv(name, *more):
        return ["quality.py", "--rows", "mamba2-50", "--stories", "60", "--tokens", "3k", "--seq-len", "64",
                "--batch-size", "4", "--gen-prompts", "1", "--gen-tokens", "4", "--agreement-tokens", "128",
                "--passkey-samples", "1", "--cache-lengths", "64", "--checkpoint-every", "2",
                "--out", str(tmp_path / f"{name}.json"), "--workdir", str(tmp_path / name), *more]

    monkeypatch.setattr(sys, "argv", argv("whole"))
    quality.main()
    real = quality.run_distill
    monkeypatch.setattr(quality, "run_distill", lambda recipe, **options: real(recipe, **options, _fail_after_step=5))
    monkeypatch.setattr(sys, "argv", argv("stopped"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        quality.main()
    monkeypatch.setattr(quality, "run_distill", real)
    monkeypatch.setattr(sys, "argv", argv("stopped", "--resume"))
    quality.main()
    assert "mamba2-50: resuming the distillation of" in capsys.readouterr().out
    whole, resumed = (json.loads((tmp_path / f"{n}.json").read_text())["rows"][0] for n in ("whole", "stopped"))
    assert resumed["stage_ppl"] == whole["stage_ppl"] and resumed["plan"] == whole["plan"] and resumed["resumed"]

    # without --resume a stopped row starts afresh (its checkpoints go) instead of failing on them
    monkeypatch.setattr(quality, "run_distill", lambda recipe, **options: real(recipe, **options, _fail_after_step=5))
    monkeypatch.setattr(sys, "argv", argv("stopped"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        quality.main()
    monkeypatch.setattr(quality, "run_distill", real)
    quality.main()
    assert "starting afresh" in capsys.readouterr().out
    assert json.loads((tmp_path / "stopped.json").read_text())["rows"][0]["stage_ppl"] == whole["stage_ppl"]


def test_teacher_samples_continue_training_paragraphs_and_are_kept(quality, tmp_path, monkeypatch, capsys):
    sentences = ["Tom had a red ball and he liked to play with it in the park near his house every day.",
                 "One day the ball rolled away, and Tom ran after it until he found it under a big green tree."]
    text = "".join(f" = Story {i} = \n\n {sentences[0]} {sentences[1]} {sentences[i % 2]} {sentences[0]} \n\n"
                   f" {sentences[1]} {sentences[0]} \n\n" for i in range(46))
    articles = tmp_path / "articles.raw"
    articles.write_text(text)
    argv = ["quality.py", "--text", str(articles), "--held-out-docs", "2", "--rows", "swa-25", "--tokens", "2k",
            "--seq-len", "64", "--batch-size", "4", "--held-out-rows", "2", "--gen-prompts", "1", "--gen-tokens", "4",
            "--agreement-tokens", "64", "--passkey-samples", "1", "--cache-lengths", "64", "--teacher-samples", "5",
            "--sample-tokens", "12", "--sample-batch", "2", "--workdir", str(tmp_path / "w"),
            "--out", str(tmp_path / "q.json")]
    monkeypatch.setattr(sys, "argv", argv)
    quality.main()
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["data"].endswith("and 5 teacher samples of 12 tokens after the first 32 of a training paragraph")
    samples = json.loads((tmp_path / "w" / "samples.json").read_text())["samples"]
    corpus = [json.loads(line)["text"] for line in (tmp_path / "w" / "corpus.jsonl").read_text().splitlines()]
    # as few calibration articles as hold the 4096 tokens calibration and --select read, left out of training
    calib = report["calibration_docs"]
    docs = quality.split_articles(text)
    assert 0 < calib < 40 and (tmp_path / "w" / "calibration.txt").read_text() == "\n\n".join(docs[2 : 2 + calib])
    assert len(samples) == 5 and corpus[-5:] == samples and len(corpus) == 46 - calib + 5
    # paragraphs in turn (each article's title line is too short to start from)
    assert [sample[:7] for sample in samples] == ["Tom had", "One day", "Tom had", "One day", "Tom had"]
    quality.main()  # a second run reads the samples back
    assert "reusing the 5 teacher samples" in capsys.readouterr().out

    monkeypatch.setattr(sys, "argv", ["quality.py", "--teacher-samples", "3"])
    with pytest.raises(SystemExit, match="continues --text paragraphs"):
        quality.main()


def test_even_mla_rows_cache_the_fraction_in_every_layer(quality):
    """stories260k: 4 KV heads of 8 channels, 64 values per token and layer; a quarter is 16: the RoRoPE key's
    default 4 slots (8 values) and 8 latent channels, or fewer slots and a wider latent."""
    from transformers import AutoConfig

    from mixerswap.demo import packaged_teacher

    rows = quality.rows_for(AutoConfig.from_pretrained(packaged_teacher()))
    for name, slots in (("mla-kv25-even", 4), ("mla-kv25-even-rope75", 3), ("mla-kv25-even-rope50", 2),
                        ("mla-kv25-even-rope25", 1)):
        settings = rows[name]["settings"]
        assert len(settings["rope_freqs"]) == slots and settings["kv_rank"] + 2 * slots == 16, settings


def test_split_shares_the_budget_between_stages_and_leaves_out_a_zero_share(quality, monkeypatch):
    from mixerswap.demo import distill_stages

    assert [(s["name"], s["tokens"]) for s in distill_stages(1000)] == [("align", 250), ("hidden", 250), ("kd", 500)]
    assert [(s["name"], s["tokens"]) for s in distill_stages(1001, (1, 1, 8))] == [
        ("align", 100), ("hidden", 100), ("kd", 801)]  # kd takes what rounding leaves: the budget adds up
    assert [s["name"] for s in distill_stages(1000, (0, 1, 3))] == ["hidden", "kd"]
    for bad in ((1, 1, 0), (1, -1, 2), (1, 2)):
        with pytest.raises(ValueError, match="split takes three"):
            distill_stages(1000, bad)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--split", "1:1", "--list"])
    with pytest.raises(SystemExit, match="--split takes three shares"):
        quality.main()


def test_calibration_takes_the_fewest_documents_that_hold_its_tokens(quality, monkeypatch):
    """With --text the calibration articles are counted by tokens: 2 and 3 tokens each reach 4 tokens at the
    second document (whitespace tokens, with the blank line that joins them counted)."""

    class Words:
        def __call__(self, text):
            return {"input_ids": text.split()}

    assert quality.calibration_doc_count(["a b", "c d e", "f"], Words(), tokens=4) == 2
    assert quality.calibration_doc_count(["a b", "c d e", "f"], Words(), tokens=5) == 2
    assert quality.calibration_doc_count(["a b", "c d e", "f"], Words(), tokens=6) == 3
    assert quality.calibration_doc_count(["a b", "c d e", "f"], Words(), tokens=60) == 3
    monkeypatch.setattr(sys, "argv", ["quality.py", "--stories", "60", "--calibration-docs", "60", "--rows", "swa-25"])
    with pytest.raises(SystemExit, match="--calibration-docs 60: there are 54 documents after the held-out ones"):
        quality.main()
