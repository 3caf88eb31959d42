"""``mixerswap`` command line: thin wrappers over the Python API, with one-line errors."""

from __future__ import annotations

import functools
import logging
import shlex
import sys
from pathlib import Path

import click
import yaml

EXPECTED_ERRORS = (ValueError, KeyError, OSError)  # bad input; files and disks (missing, read-only, full)


def setup_logging(quiet: bool) -> None:
    """INFO logs, unless ``-q`` or on a process other than rank 0 of torchrun (warnings only). Libraries'
    progress bars are off then too, and when stderr is not a terminal (ours write plain lines there:
    :mod:`mixerswap.progress`)."""
    from .progress import is_main_process, is_terminal, silence_library_bars

    main = is_main_process()
    logging.basicConfig(
        level=logging.WARNING if quiet or not main else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("httpx", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet or not main or not is_terminal(sys.stderr):
        silence_library_bars()


def user_errors(fn):
    """Turn expected failures into a one-line ``Error: ...`` and exit status 1 (no traceback): bad input,
    file and disk errors, and mixerswap's own runtime errors (``DistillError``, a missing kernel backend)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*EXPECTED_ERRORS, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not type(err).__module__.startswith("mixerswap."):
                raise  # a bug (ours or a library's): the traceback is what helps
            raise click.ClickException(error_line(err)) from None

    return wrapper


def error_line(err: BaseException) -> str:
    """One line saying what went wrong (and what to do, where the error is about the machine)."""
    import errno

    from pydantic import ValidationError

    if isinstance(err, ValidationError):  # e.g. --batch-size 0: name the option, not the pydantic model
        ctx = click.get_current_context(silent=True)
        options = {p.name: p.opts[0] for p in ctx.command.params if p.opts[0].startswith("--")} if ctx else {}
        parts = []
        for e in err.errors():
            loc, msg = e["loc"], e["msg"][:1].lower() + e["msg"][1:]
            parts.append(f"{options.get(loc[0], '.'.join(map(str, loc)))} {e['input']!r}: {msg}" if loc else msg)
        message = "; ".join(parts)
    elif isinstance(err, KeyError) and err.args:
        message = err.args[0]
    elif isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        message = (f"no space left on the disk while writing {err.filename or 'the output'}: free some space or "
                   "write --out to another disk, then run again")
    elif isinstance(err, OSError) and err.errno == errno.EROFS:
        message = f"cannot write {err.filename or 'the output'}: read-only file system; choose an --out on a writable disk"
    else:
        message = str(err)
    return " ".join(str(message).split())


def parse_settings(pairs: tuple[str, ...]) -> dict:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def parse_extra_settings(args: list[str]) -> dict:
    """``--window 512 --sinks=4 --gate`` → ``{"window": 512, "sinks": 4, "gate": True}`` (YAML-typed values)."""
    settings, i = {}, 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise click.UsageError(f"unexpected argument {token!r}")
        name, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"
        settings[name.replace("-", "_")] = yaml.safe_load(value)
        i += 1
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mixerswap")
def main():
    """Turn a pretrained Hugging Face Transformer into a cheaper hybrid student."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("teacher")
@click.option("--to", "to", default="mamba2", show_default=True, help="Mixer kind for replaced layers.")
@click.option("--plan", type=click.Path(dir_okay=False), help="Plan YAML: kind and settings per layer (see README).")
@click.option("--calibration", default="teacher", show_default=True,
              help="Text file to fit each mixer to the teacher on (reported per layer); 'teacher': text the "
                   "teacher samples itself (seeded); 'none': no calibration.")
@click.option("--calibration-tokens", default=2048, show_default=True, help="Tokens of calibration text used.")
@click.option("--output-refit/--no-output-refit", default=False, show_default=True,
              help="With calibration: refit each mixer's output projection to the teacher's attention output "
                   "(ridge least squares, the ridge chosen on held-out calibration rows): a closer start, which "
                   "distillation at the default rates does not keep (benchmarks/RESULTS.md).")
@click.option("--keep-attention", type=float, help="Fraction of layers that keep attention, spread evenly (0..1); "
                                                  "rounded to the nearest count, at least one when above 0.")
@click.option("--attention-layers", help="Comma-separated indices of layers that keep attention, e.g. 0,8,16.")
@click.option("--select", type=click.Choice(["kl"]),
              help="Choose the --keep-attention layers by measured KL on the --calibration text (see `select`).")
@click.option("--select-align-steps", type=int,
              help="--select: alignment steps of each mixer before it is scored (default 100; 0: as converted).")
@click.option("--select-device", help="--select: where layers are scored: cpu, cuda, cuda:1 ... (default: cuda if "
                                      "available).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Mixer setting, e.g. chunk_size=128.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--seed", default=0, show_default=True, help="Seed for the parts attention does not determine.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--revision", help="Hub revision when TEACHER is a hub id.")
@click.option("--out", required=True, help="Output folder (a normal HF checkpoint).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bar.")
@click.pass_context
@user_errors
def convert(ctx, teacher, to, plan, calibration, calibration_tokens, output_refit, keep_attention, attention_layers,
            select, select_align_steps, select_device, settings, dtype, seed, max_shard_size, revision, out, overwrite,
            quiet):
    """Convert TEACHER (local HF folder, .gguf file or hub id) into a hybrid student folder.

    Any other --NAME VALUE is a setting of the mixer kind (same as --set NAME=VALUE), e.g.
    --to swa --window 512, or --chunk-size 128 for mamba2.
    """
    setup_logging(quiet)
    from .convert import convert as run_convert
    from .convert.selection import parse_layer_list

    layers = parse_layer_list(attention_layers) if attention_layers is not None else None
    calibration = None if calibration.lower() == "none" else calibration
    result = run_convert(
        teacher, out, to=to, plan=plan, calibration=calibration, calibration_tokens=calibration_tokens,
        output_refit=output_refit, keep_attention=keep_attention, attention_layers=layers, select=select,
        select_align_steps=select_align_steps, select_device=select_device,
        mixer_settings={**parse_settings(settings), **parse_extra_settings(ctx.args)}, dtype=dtype, seed=seed, max_shard_size=max_shard_size,
        overwrite=overwrite, revision=revision, progress=not quiet,
        command=shlex.join(["mixerswap", *sys.argv[1:]]),
    )
    kept = ",".join(map(str, result.attention_layers)) or "none"
    click.echo(f"wrote {result.out}: {len(result.plan)} layers, attention kept at {kept}, "
               f"{len(result.shards)} shard(s), {result.bytes_written / 1e6:.1f} MB")


@main.command("select", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("teacher")
@click.option("--to", "to", default="mamba2", show_default=True, help="Mixer kind the layers would be replaced by.")
@click.option("--data", default="teacher", show_default=True,
              help="Text file: calibration on its first tokens, scores on the next ones; 'teacher': samples the "
                   "teacher writes (scores on samples of another seed).")
@click.option("--keep-attention", type=float, help="Also pick this fraction of layers to keep attention (greedy, by "
                                                  "set KL); at least one layer when above 0.")
@click.option("--calibration-tokens", default=2048, show_default=True)
@click.option("--scoring-tokens", default=2048, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--align-steps", default=100, show_default=True,
              help="Alignment steps of each mixer on its layer before KL scores, as the align stage would "
                   "(0: score the calibrated conversion).")
@click.option("--mqar/--no-mqar", default=True, show_default=True,
              help="Score MQAR per layer (only when the teacher itself solves it).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Mixer setting, e.g. chunk_size=128.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="Where layers are scored: cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--out", help="Folder for selection.json / .md / .png and plan.yaml.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bar.")
@click.pass_context
@user_errors
def select_command(ctx, teacher, to, data, keep_attention, calibration_tokens, scoring_tokens, seq_len, align_steps,
                   mqar, settings, seed, device, out, overwrite, quiet):
    """Score every layer of TEACHER for replacement by --to and print them ranked.

    Each layer is scored alone (calibrated-init error, error after a short alignment, end-to-end KL,
    MQAR); with --keep-attention a set is chosen greedily by the KL of the whole set and compared with
    evenly spaced layers. Any other --NAME VALUE is a mixer setting.
    """
    setup_logging(quiet)
    from .convert.checkpoint_io import check_output
    from .convert.layer_scores import score_layers, selection_table, write_selection

    if out is not None:
        check_output(out, overwrite=overwrite, inputs=(teacher, data))
    mixer_settings = {**parse_settings(settings), **parse_extra_settings(ctx.args)}
    selection = score_layers(teacher, to=to, text=data, keep_attention=keep_attention, mixer_settings=mixer_settings,
                             calibration_tokens=calibration_tokens, scoring_tokens=scoring_tokens, seq_len=seq_len,
                             align_steps=align_steps, mqar=mqar, seed=seed, device=device, progress=not quiet)
    click.echo(selection_table(selection))
    if out is not None:
        write_selection(selection, out, settings=mixer_settings, overwrite=overwrite, inputs=(teacher, data))
        click.echo(f"wrote {out}")


@main.command()
@click.argument("student", required=False)
@click.option("--teacher", help="Teacher folder, .gguf file or hub id (default: the one recorded in "
                               "STUDENT/mixerswap.yaml, when that path exists).")
@click.option("--data", help="Plain text, JSON lines or parquet file (told by content: wikitext2-test.raw is text), "
                            "a folder of .txt/.jsonl/.parquet files, or a datasets name/path.")
@click.option("--stages", help="e.g. align:20M,hidden:40M,kd:200M (token budgets).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe; options given here override it.")
@click.option("--seq-len", type=int)
@click.option("--batch-size", type=int)
@click.option("--grad-accum", type=int)
@click.option("--seed", type=int)
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]),
              help="Autocast precision; weights train in fp32. fp16: CUDA with ddp only.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Dtype of the saved student (default auto: the teacher's).")
@click.option("--distributed", type=click.Choice(["ddp", "fsdp"]),
              help="Engine under torchrun/accelerate launch: data parallel (ddp, default) or FSDP2 sharding.")
@click.option("--checkpoint-every", type=int, help="Optimizer steps between checkpoints.")
@click.option("--text-field", help="Field/column holding the text in jsonl/parquet/datasets.")
@click.option("--held-out-docs", type=int, help="Documents kept out of training for perplexity (default 32).")
@click.option("--held-out-rows", type=int,
              help="Packed rows of --seq-len tokens of those documents scored for perplexity (default 8).")
@click.option("--validation-docs", type=int,
              help="The next documents, also kept out: a stage that raises their perplexity is undone (default 0: off).")
@click.option("--out", help="Output folder (a normal HF checkpoint).")
@click.option("--allow-other-teacher", is_flag=True, default=None,
              help="Distill from a teacher other than the one the student was converted from.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint of this --out.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--keep-checkpoints", is_flag=True, help="Keep OUT.work/ (checkpoints, metrics) after success.")
@click.option("--fail-after-step", type=int, hidden=True, help="Tests: crash after this many optimizer steps.")
@click.option("--quiet", "-q", is_flag=True)
@user_errors
def distill(student, teacher, data, stages, recipe, seq_len, batch_size, grad_accum, seed, mixed_precision, dtype,
            distributed, checkpoint_every, text_field, held_out_docs, held_out_rows, validation_docs, out, allow_other_teacher, resume, overwrite,
            keep_checkpoints, fail_after_step, quiet):
    """Distill STUDENT (a converted folder) from its teacher: align -> hidden -> kd."""
    setup_logging(quiet)
    from .distill.recipe import DistillRecipe, parse_stages
    from .distill.trainer import run_distill
    from .progress import is_main_process

    options = {"student": student, "teacher": teacher, "data": data, "out": out, "seq_len": seq_len,
               "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed, "mixed_precision": mixed_precision,
               "dtype": dtype, "distributed": distributed, "checkpoint_every": checkpoint_every,
               "text_field": text_field, "held_out_docs": held_out_docs, "held_out_rows": held_out_rows,
               "validation_docs": validation_docs,
               "allow_other_teacher": allow_other_teacher,
               "stages": parse_stages(stages) if stages else None}
    if recipe:
        settings = DistillRecipe.from_yaml(recipe, **options)
    else:
        settings = DistillRecipe.validated({k: v for k, v in options.items() if v is not None})
    try:
        result = run_distill(settings, resume=resume, overwrite=overwrite, progress=not quiet,
                             keep_checkpoints=keep_checkpoints, _fail_after_step=fail_after_step)
    except OSError as err:  # a full disk: say what survived, so the run can go on from there
        import errno

        from .distill.checkpoint import latest_checkpoint
        from .distill.trainer import work_dir

        last = latest_checkpoint(work_dir(settings.out) / "checkpoints")
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or last is None:
            raise
        raise click.ClickException(f"no space left on the disk while writing {err.filename or settings.out}; the last "
                                   f"good checkpoint {last} is kept: free some space, then run the same command "
                                   "with --resume") from None
    if is_main_process():  # one line per run, not per process
        stages = "".join(f" -> {_fmt(s['perplexity'])} ({s['stage']}{', undone' if s.get('reverted') else ''})"
                         for s in result.stage_perplexity)
        click.echo(f"wrote {result.out}; held-out perplexity {_fmt(result.perplexity_before)}{stages}; "
                   f"teacher {_fmt(result.perplexity_teacher)}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


@main.command()
@click.argument("student")
@click.option("--out", required=True, help="Output folder (a stock transformers checkpoint).")
@click.option("--format", "format_", help="Stock architecture to write (deepseek_v3, granitemoehybrid); default: the "
                                          "one that expresses the student's mixers.")
@click.option("--allow-approximate", is_flag=True, help="Write the format even where it cannot express the student "
                                                        "exactly; the measured logit error is printed and in the card.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors; no progress bar.")
@user_errors
def export(student, out, format_, allow_approximate, max_shard_size, overwrite, quiet):
    """Write STUDENT as a stock transformers architecture that loads with no custom code."""
    setup_logging(quiet)
    from .export import export_student

    result = export_student(student, out, format=format_, allow_approximate=allow_approximate,
                            max_shard_size=max_shard_size, overwrite=overwrite, progress=not quiet,
                            command=shlex.join(["mixerswap", *sys.argv[1:]]))
    diff = "not measured" if result.max_logit_diff is None else f"{result.max_logit_diff:.3g}"
    click.echo(f"wrote {result.out} as {result.format}: {'exact' if result.exact else 'APPROXIMATE'}, max |logit "
               f"difference| vs the student {diff}" + "".join(f"\n  not expressed: {i}" for i in result.issues))


def _check_local_model(model: str) -> None:
    """``out/no_such_student`` looks like a hub id, but when ``out/`` is a folder here it is a typo of a
    local path: say so instead of asking the hub."""
    path = Path(model)
    if not path.exists() and len(path.parts) > 1 and Path(path.parts[0]).is_dir():
        raise FileNotFoundError(f"no such model folder: {model} ({path.parts[0]}/ exists here, so this is not a hub "
                                "id); check the path")


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-new-tokens", default=50, show_default=True)
@click.option("--sample/--greedy", default=False, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--chat", is_flag=True, help="PROMPT is a user message: apply the tokenizer's chat template, print the reply.")
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--quiet", "-q", is_flag=True)
@user_errors
def generate(model, prompt, max_new_tokens, sample, temperature, top_p, seed, chat, dtype, device, quiet):
    """Generate a continuation of PROMPT with MODEL (a student or any HF causal LM folder); --chat for a reply."""
    setup_logging(quiet)
    from .generation import generate_text, load_model_and_tokenizer

    _check_local_model(model)
    lm, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device)
    text = generate_text(lm, tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature, top_p=top_p, seed=seed, chat=chat)
    click.echo(text)
    if chat and not text.strip():
        click.echo("(empty reply: the model ended it at its first token; a converted student often does before "
                   "`mixerswap distill`)", err=True)


@main.command()
@click.option("--out", default=None, help="Keep the demo's corpus and students here (default: a temp folder).")
@click.option("--stories", default=160, show_default=True, help="Stories the teacher writes (its corpus).")
@click.option("--distill-tokens", default=60_000, show_default=True, help="Token budget of the demo distillation.")
@click.option("--quiet", "-q", is_flag=True)
@user_errors
def demo(out, stories, distill_tokens, quiet):
    """Convert and distill a real trained teacher shipped with the package (no download), and report."""
    setup_logging(quiet)
    from .demo import run_demo

    run_demo(out, stories=stories, distill_tokens=distill_tokens, progress=not quiet, echo=click.echo)


@main.command()
@click.option("--path", "folder_only", is_flag=True, help="Print only the folder, for lm_eval's --include_path.")
def tasks(folder_only):
    """List the offline lm-eval tasks shipped with mixerswap, and the folder that holds them.

    `mixerswap eval --tasks NAME` finds them by itself; plain lm-eval needs the folder:

    \b
    lm_eval --model hf --model_args pretrained=MODEL,trust_remote_code=True \\
      --tasks mixerswap_stories --include_path "$(mixerswap tasks --path)"
    """
    from .evals import TASKS_DIR, bundled_tasks

    if folder_only:
        click.echo(TASKS_DIR)
        return
    for tag, names in bundled_tasks().items():
        click.echo(f"{tag}: {', '.join(names)}")
    click.echo(f"folder (lm_eval --include_path): {TASKS_DIR}")


def _lengths_option(ctx, param, value):
    """Click callback: ``1k,4k`` → ``[1024, 4096]`` (None stays None)."""
    from .evals.lengths import parse_lengths

    if value is None:
        return None
    try:
        return parse_lengths(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _quiet_eval_logs(quiet: bool) -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)


@main.command("eval")
@click.argument("model")
@click.option("--tasks", help="Comma-separated lm-eval task names and/or task folders, e.g. mixerswap_stories or "
                              "./my_tasks/.")
@click.option("--include-path", multiple=True, help="Extra folder of lm-eval task YAMLs (repeatable).")
@click.option("--vs", help="Reference model (e.g. the teacher), evaluated side by side.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--limit", type=float, help="lm-eval documents per task (a fraction if below 1).")
@click.option("--num-fewshot", type=int)
@click.option("--perplexity", "ppl_file", type=click.Path(dir_okay=False),
              help="Text file, or jsonl with a 'text' field per line.")
@click.option("--ppl-context", type=int, help="Perplexity window in tokens (default: model limit, at most 4096).")
@click.option("--ppl-stride", type=int, help="Tokens scored per window after the first (default: context/2).")
@click.option("--passkey", callback=_lengths_option, help="Passkey retrieval lengths, e.g. 1k,4k,16k.")
@click.option("--needle", callback=_lengths_option, help="Needle-in-a-haystack lengths, e.g. 1k,4k.")
@click.option("--needle-depths", default="0,0.25,0.5,0.75,1", show_default=True)
@click.option("--haystack", type=click.Path(dir_okay=False), help="Haystack text (default: the bundled stories).")
@click.option("--mqar", is_flag=True, help="Multi-query associative recall.")
@click.option("--mqar-lengths", callback=_lengths_option, help="Default: 64,256,1k within the model's limit.")
@click.option("--mqar-pairs", default=8, show_default=True, help="Key-value pairs per MQAR sequence.")
@click.option("--samples", default=5, show_default=True, help="Prompts per passkey length and needle cell.")
@click.option("--seed", default=0, show_default=True, help="Seed of the probes (lm-eval keeps its defaults).")
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--out", default="eval-results", show_default=True, help="Folder for results.json, summary.md, plots.")
@click.option("--quiet", "-q", is_flag=True)
@user_errors
def eval_command(model, tasks, include_path, vs, batch_size, limit, num_fewshot, ppl_file, ppl_context, ppl_stride,
                 passkey, needle, needle_depths, haystack, mqar, mqar_lengths, mqar_pairs, samples, seed, dtype,
                 device, out, quiet):
    """Evaluate MODEL (and --vs, side by side): lm-eval tasks, perplexity, long-context probes."""
    setup_logging(quiet)
    _quiet_eval_logs(quiet)
    from .evals.evaluate import EvalOptions, evaluate

    _check_local_model(model)
    if vs:
        _check_local_model(vs)
    options = EvalOptions(
        tasks=[t for t in (tasks or "").split(",") if t.strip()], include_path=list(include_path),
        batch_size=batch_size, limit=int(limit) if limit and limit >= 1 else limit, num_fewshot=num_fewshot,
        perplexity=ppl_file, ppl_context=ppl_context, ppl_stride=ppl_stride, passkey=passkey or [],
        needle=needle or [], needle_depths=[float(d) for d in needle_depths.split(",")], haystack=haystack,
        mqar=mqar or bool(mqar_lengths), mqar_lengths=mqar_lengths, mqar_pairs=mqar_pairs, probe_samples=samples,
        seed=seed, dtype=dtype, device=device,
    )
    report = evaluate(model, options, vs=vs, out=out, echo=(lambda _: None) if quiet else click.echo, progress=not quiet)
    click.echo(report.text())
    click.echo(f"wrote {report.out / 'results.json'}" + "".join(f", {p}" for p in report.plots))


@main.command()
@click.argument("model")
@click.option("--vs", help="Reference model (e.g. the teacher); ratios are MODEL / VS.")
@click.option("--context", "contexts", default="1k,4k", show_default=True, callback=_lengths_option)
@click.option("--batch", "batches", default="1,8", show_default=True, callback=_lengths_option)
@click.option("--decode-tokens", default=32, show_default=True, help="Timed decode steps per configuration.")
@click.option("--warmup", default=1, show_default=True, help="Untimed repetitions per configuration.")
@click.option("--repeats", default=5, show_default=True,
              help="Timed repetitions per configuration; tokens/s are medians with [min-max].")
@click.option("--timing", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="CPU only: wall clock, or this process's CPU time (steadier on a shared machine).")
@click.option("--prefill-chunk", type=int, help="Prefill this many tokens per forward (default: whole prompt).")
@click.option("--interleave/--sequential", default=None,
              help="Models take turns within each configuration, ratios from rounds (default on CPU), or run "
                   "one after another, each loaded only for its turn (default on CUDA).")
@click.option("--max-memory", help="CUDA only: cap allocations, e.g. 40GB (runs over it are recorded as oom).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG plot here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--quiet", "-q", is_flag=True)
@user_errors
def bench(model, vs, contexts, batches, decode_tokens, warmup, repeats, timing, prefill_chunk, interleave,
          max_memory, plot, json_path, dtype, device, quiet):
    """Prefill/decode speed, latency and memory of MODEL (and --vs) over context lengths and batch sizes."""
    setup_logging(quiet)
    from .convert.checkpoint_io import parse_size
    from .evals.loading import model_labels
    from .evals.plots import plot_bench
    from .evals.speed import bench_paths, save_report

    labels = model_labels(model, vs)
    reference = next((label for label, (_, role) in labels.items() if role == "vs"), None)
    report = bench_paths({label: path for label, (path, _) in labels.items()}, contexts=contexts, batches=batches,
                         decode_tokens=decode_tokens, dtype=dtype, device=device, reference=reference, warmup=warmup,
                         repeats=repeats, timing=timing, prefill_chunk=prefill_chunk, interleave=interleave,
                         max_memory_bytes=parse_size(max_memory) if max_memory else None,
                         echo=None if quiet else click.echo)
    click.echo(report.table())
    click.echo(f"kernels: {report.kernels['requested']} -> " +
               ", ".join(f"{op}={backend}" for op, backend in report.kernels["ops"].items()))
    for line in report.notes():
        click.echo(line)
    if json_path:
        click.echo(f"wrote {save_report(report, json_path)}")
    if plot:
        click.echo(f"wrote {plot_bench(report.to_dict(), plot)}")


if __name__ == "__main__":  # pragma: no cover
    main()
