"""Measured layer selection: which layers should keep attention, scored on the teacher's own text.

Evenly spaced attention layers are the usual default; measuring does better. One calibrated student
with *every* layer replaced is converted once, then the teacher's attention modules are put back
wherever a candidate set keeps attention, so every set is scored with the same mixers and one
teacher pass. Per layer (that layer alone replaced, all others attention):

* ``init_error``: relative error ``||m(x) - a(x)|| / ||a(x)||`` of the calibrated mixer's output
  against the attention output it replaces, on the teacher's own layer inputs;
* ``align_error``: the same after a short alignment of that mixer alone (``align_steps`` Adam steps on
  the relative squared error of its own layer, on the calibration rows; 0 skips it);
* ``kl``: end-to-end ``KL(teacher || student)`` in nats per token on the scoring rows, with the aligned
  mixer when ``align_steps > 0`` (the greedy set below uses the aligned mixers too);
* ``mqar``: MQAR accuracy of that student, when the teacher itself solves MQAR (a teacher without
  a recall circuit has nothing to lose, and the column is left out).

The set: ``keep`` layers are chosen greedily by the KL *of the set* — adding attention back one layer
at a time to the all-replaced student (or replacing one layer at a time, whichever takes fewer steps),
each step taking the layer that lowers the set's KL most — and compared with evenly spaced layers.
Scoring uses the tokens after the calibration tokens when the text has enough of them.

Why aligned mixers: distillation starts with ``align``, so what a kept attention layer must be kept for
is what a mixer cannot learn to do, not how far the raw conversion starts from it. The two differ. On a
4-layer Llama trained on MQAR (``benchmarks/mqar.py --layers 4 --keep 0.25 --select uniform,kl,kl-init``),
the KL of the calibrated conversion keeps layer 0, whose replacement starts furthest from the teacher,
and its Mamba-2 / gdn students end at MQAR 0.85 / 0.88 after distillation: local mixing is what a mixer
relearns easily. With 100 alignment steps per mixer first, the set's KL keeps layer 1: 0.985 / 0.985,
against 0.976 / 0.987 for the evenly spaced layer 2 (benchmarks/RESULTS.md, "Layer selection on a
recall teacher").

Cost: the models a step compares differ from one base model (the teacher while scoring layers, the
current set during a greedy step) in one layer each, so the base model's layer outputs are recorded
once per step and a candidate that differs from layer ``i`` on runs only layers ``i`` and above
(about half a forward on average; the KL is the same). Aligning adds ``align_steps`` forward and
backward passes of each mixer alone over the calibration rows; on SmolLM2-135M (30 layers, keeping 8,
one CPU thread with other work beside) the whole selection took about 46 minutes against 37 without.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..architectures import MixerSwapForCausalLM, family_for
from ..devices import pick_device
from ..progress import progress_bar
from .calibration import describe_calibration, load_calibration_rows, load_teacher_fp32, output_match, record_layer_stats
from .checkpoint_io import resolve_model_dir
from .selection import attention_count, evenly_spaced

logger = logging.getLogger(__name__)

MQAR_MIN_TEACHER_ACCURACY = 0.2
# Each mixer is aligned before it is scored, with the align stage's default rates (distill.recipe's
# DEFAULT_LR["align"] and DEFAULT_FAST_LR_SCALE; a test keeps them equal).
SELECT_ALIGN_STEPS = 100
ALIGN_LR = 3e-3
FAST_LR_SCALE = 10.0


@dataclass
class LayerScore:
    layer: int
    init_error: float
    kl: float
    align_error: float | None = None
    mqar: float | None = None


@dataclass
class Selection:
    """Scores of every layer and the kept set; ``path`` is the greedy order with the set's KL after each step."""

    kind: str
    teacher: str
    text: str
    calibration_tokens: int
    scoring_tokens: int
    scored_on_held_out: bool
    scores: list[LayerScore]
    keep: list[int] = field(default_factory=list)
    keep_kl: float | None = None
    uniform: list[int] = field(default_factory=list)
    uniform_kl: float | None = None
    all_replaced_kl: float | None = None
    path: list[dict] = field(default_factory=list)
    teacher_mqar: float | None = None
    align_steps: int = 0  # alignment steps of every mixer before the KL scores (0: the calibrated conversion)

    def ranked(self) -> list[LayerScore]:
        """Layers from the one that matters least (cheapest to replace) to the one that matters most."""
        return sorted(self.scores, key=lambda s: s.kl)

    def to_dict(self) -> dict:
        return asdict(self)


class _Swapper:
    """A student with every layer replaced, whose attention can be put back per layer."""

    def __init__(self, student: MixerSwapForCausalLM, teacher: nn.Module):
        family = family_for(teacher.config.model_type)
        self.attr = family.attention_attr
        self.layers = student.decoder_layers()
        self.mixers = {i: getattr(layer, self.attr) for i, layer in enumerate(self.layers)}
        teacher_layers = teacher.get_submodule(family.layers_path)
        self.attention = {i: family.mixer_of(layer) for i, layer in enumerate(teacher_layers)}
        self.student = student

    def use(self, replaced: set[int]) -> MixerSwapForCausalLM:
        for i, layer in enumerate(self.layers):
            setattr(layer, self.attr, self.mixers[i] if i in replaced else self.attention[i])
        return self.student


def _store(outputs: list, index: int):
    def hook(_module, _args, output):
        outputs[index] = output
    return hook


class _LayerOutputs:
    """What every decoder layer of the swapper's current model returns for each scoring batch, so a model
    that differs from it only from layer ``i`` on can skip layers ``0 .. i-1`` (they replay their outputs)."""

    def __init__(self, swap: _Swapper, rows: torch.Tensor, batch: int):
        self.layers = swap.layers
        self.saved: list[list] = []
        for start in range(0, len(rows), batch):
            outputs = [None] * len(self.layers)
            handles = [layer.register_forward_hook(_store(outputs, i)) for i, layer in enumerate(self.layers)]
            try:
                with torch.no_grad():
                    swap.student(input_ids=rows[start : start + batch], use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
            self.saved.append(outputs)

    @contextmanager
    def replaying(self, batch_index: int, below: int):
        """Layers ``0 .. below-1`` return what they returned for batch ``batch_index`` without computing."""
        saved = self.saved[batch_index]
        for i in range(below):
            output = saved[i].clone() if i == below - 1 and isinstance(saved[i], torch.Tensor) else saved[i]
            self.layers[i].forward = lambda *args, _output=output, **kwargs: _output
        try:
            yield
        finally:
            for i in range(below):
                del self.layers[i].forward


@torch.no_grad()
def _teacher_logprobs(model: nn.Module, rows: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [model(input_ids=rows[i : i + batch], use_cache=False).logits.float().log_softmax(-1)
            for i in range(0, len(rows), batch)]


@torch.no_grad()
def _kl(model: nn.Module, rows: torch.Tensor, reference: list[torch.Tensor], batch: int,
        base: _LayerOutputs | None = None, first_changed: int = 0) -> float:
    """Mean ``KL(teacher || model)`` over every next-token prediction of ``rows``, in nats. With ``base``
    (recorded on a model equal to ``model`` below layer ``first_changed``) the layers below replay."""
    total = 0.0
    for index, (chunk, ref) in enumerate(zip(range(0, len(rows), batch), reference)):
        with base.replaying(index, first_changed) if base is not None else nullcontext():
            logp = model(input_ids=rows[chunk : chunk + batch], use_cache=False).logits.float().log_softmax(-1)
        total += (ref.exp() * (ref - logp)).sum().item()
    return total / rows.numel()


def _align(mixer: nn.Module, stats, steps: int, lr: float, fast_lr_scale: float) -> float:
    """Align ``mixer`` in place for ``steps`` Adam steps on the relative squared error of its own layer's
    output; returns the relative output error after. Every parameter trains (what the mixer can learn to
    do over the whole distillation, not only what the ``align`` stage trains: gdn's align leaves its
    projections alone), the declared ``fast_parameters`` at ``fast_lr_scale`` times ``lr`` as in distill."""
    mixer.float().train()
    fast = {id(p) for p in mixer.parameters_matching(mixer.fast_parameters)}
    params = [p for p in mixer.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": [p for p in params if id(p) not in fast], "lr": lr},
              {"params": [p for p in params if id(p) in fast], "lr": lr * fast_lr_scale}]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    target = stats.outputs.float()
    scale = target.square().mean().clamp_min(1e-30)
    for _ in range(steps):
        out, _ = mixer(stats.inputs.float(), **stats.kwargs)
        loss = (out - target).square().mean() / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        out, _ = mixer.eval()(stats.inputs.float(), **stats.kwargs)
    return output_match(out, target)["rel_error"]


def _mqar(model: nn.Module, length: int, samples: int) -> float:
    from ..evals.probes import mqar_accuracy

    return mqar_accuracy(model, [length], samples=samples, batch_size=samples)[0].accuracy


def score_layers(
    teacher: str | Path,
    *,
    to: str,
    text: str | Path,
    keep_attention: float | None = None,
    mixer_settings: dict | None = None,
    calibration_tokens: int = 2048,
    scoring_tokens: int = 2048,
    seq_len: int = 256,
    align_steps: int = SELECT_ALIGN_STEPS,
    align_lr: float = ALIGN_LR,
    fast_lr_scale: float = FAST_LR_SCALE,
    mqar: bool = False,
    mqar_length: int = 128,
    mqar_samples: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Selection:
    """Score every layer of ``teacher`` for replacement by ``to`` and, with ``keep_attention``, pick the
    layers that keep attention (see the module docstring). ``text`` is a calibration text file or
    ``"teacher"`` (the teacher's own samples; the scores then use samples of another seed). Teacher, student,
    alignment and scoring run on ``device`` (default: CUDA when available, else the CPU), in fp32; the
    conversion itself runs on the CPU."""
    from .pipeline import convert

    device = pick_device(device)
    model_dir = resolve_model_dir(teacher)
    teacher_model = load_teacher_fp32(model_dir).to(device)
    logger.info("select: scoring on %s", device)
    calib_rows = load_calibration_rows(teacher_model, model_dir, text, tokens=calibration_tokens, seq_len=seq_len,
                                       seed=seed).to(device)
    rows = load_calibration_rows(teacher_model, model_dir, text, tokens=scoring_tokens, seq_len=seq_len,
                                 held_out=True, seed=seed)
    rows = None if rows is None else rows.to(device)
    held_out = rows is not None
    if not held_out:
        logger.warning("the text has too few tokens to score on text the calibration did not see; scoring on the "
                       "calibration tokens (give more text for a held-out score)")
        rows = calib_rows[: max(1, scoring_tokens // calib_rows.shape[1])]
    num_layers = teacher_model.config.num_hidden_layers
    with tempfile.TemporaryDirectory(prefix="mixerswap-select-") as tmp:
        convert(model_dir, Path(tmp) / "student", to=to, keep_attention=0.0, mixer_settings=mixer_settings,
                dtype="float32", seed=seed, calibration=text, calibration_tokens=calibration_tokens, progress=False)
        student = MixerSwapForCausalLM.from_pretrained(Path(tmp) / "student", dtype=torch.float32,
                                                       attn_implementation="eager").eval().to(device)
    swap = _Swapper(student, teacher_model)
    everything = set(range(num_layers))
    reference = _teacher_logprobs(teacher_model, rows, batch_size)
    stats = record_layer_stats(teacher_model, list(everything), calib_rows)
    teacher_mqar = _mqar(teacher_model, mqar_length, mqar_samples) if mqar else None
    use_mqar = teacher_mqar is not None and teacher_mqar >= MQAR_MIN_TEACHER_ACCURACY
    if mqar and not use_mqar:
        logger.warning("the teacher's own MQAR accuracy is %.2f (< %.2f): no recall to lose, MQAR left out of the "
                       "scores", teacher_mqar, MQAR_MIN_TEACHER_ACCURACY)

    swap.use(set())
    teacher_outputs = _LayerOutputs(swap, rows, batch_size)
    scores = []
    for i in progress_bar(range(num_layers), desc="score layers", enabled=progress):
        model = swap.use({i})
        with torch.no_grad():
            out, _ = swap.mixers[i](stats[i].inputs, **stats[i].kwargs)
        init_error = output_match(out, stats[i].outputs)["rel_error"]
        align_error = _align(swap.mixers[i], stats[i], align_steps, align_lr, fast_lr_scale) if align_steps else None
        scores.append(LayerScore(
            layer=i, init_error=init_error, align_error=align_error,
            kl=round(_kl(model, rows, reference, batch_size, teacher_outputs, i), 5),
            mqar=round(_mqar(model, mqar_length, mqar_samples), 4) if use_mqar else None,
        ))
    del teacher_outputs
    selection = Selection(kind=to, teacher=str(teacher), text=describe_calibration(text), calibration_tokens=calib_rows.numel(),
                          scoring_tokens=rows.numel(), scored_on_held_out=held_out, scores=scores,
                          teacher_mqar=teacher_mqar, align_steps=align_steps)
    selection.all_replaced_kl = round(_kl(swap.use(everything), rows, reference, batch_size), 5)
    if keep_attention is not None:
        count = attention_count(num_layers, keep_attention)
        _greedy(selection, swap, rows, reference, batch_size, count, progress)
        selection.uniform = evenly_spaced(num_layers, count) if count else []
        selection.uniform_kl = round(_kl(swap.use(everything - set(selection.uniform)), rows, reference, batch_size), 5)
    swap.use(everything)
    return selection


def _greedy(selection: Selection, swap: _Swapper, rows, reference, batch_size: int, count: int, progress: bool):
    """Keep ``count`` attention layers chosen greedily by the KL of the whole set."""
    num_layers = len(selection.scores)
    everything = set(range(num_layers))
    kept: set[int] = set()
    adding = count <= num_layers - count  # fewer steps from the all-replaced end
    if not adding:
        kept = set(everything)
    steps = count if adding else num_layers - count
    for _ in progress_bar(range(steps), desc="greedy set", enabled=progress):
        candidates = sorted(everything - kept if adding else kept)
        swap.use(everything - kept)
        base = _LayerOutputs(swap, rows, batch_size)
        trials = {}
        for i in candidates:
            trial = kept | {i} if adding else kept - {i}
            trials[i] = _kl(swap.use(everything - trial), rows, reference, batch_size, base, i)
        del base
        best = min(trials, key=trials.get)
        kept = kept | {best} if adding else kept - {best}
        selection.path.append({"layer": best, "action": "keep" if adding else "replace", "kl": round(trials[best], 5)})
    selection.keep = sorted(kept)
    selection.keep_kl = round(_kl(swap.use(everything - kept), rows, reference, batch_size), 5)


def selection_table(selection: Selection) -> str:
    """Markdown table, layers ranked from cheapest to replace to most costly."""
    has_align = any(s.align_error is not None for s in selection.scores)
    has_mqar = any(s.mqar is not None for s in selection.scores)
    head = ["rank", "layer", "KL alone (nats/token)", "init rel. error"]
    head += ["aligned rel. error"] * has_align + ["MQAR alone"] * has_mqar + ["kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, s in enumerate(selection.ranked(), 1):
        row = [rank, s.layer, f"{s.kl:.4f}", f"{s.init_error:.3f}"]
        if has_align:
            row.append(f"{s.align_error:.3f}")
        if has_mqar:
            row.append(f"{s.mqar:.2f}")
        row.append("attention" if s.layer in selection.keep else "")
        lines.append("| " + " | ".join(map(str, row)) + " |")
    summary = [f"All layers replaced: KL {selection.all_replaced_kl:.4f} nats/token."]
    if selection.keep_kl is not None:
        summary.append(f"Kept {selection.keep} (greedy by set KL): KL {selection.keep_kl:.4f}; evenly spaced "
                       f"{selection.uniform}: KL {selection.uniform_kl:.4f}.")
    if selection.teacher_mqar is not None:
        summary.append(f"Teacher MQAR accuracy {selection.teacher_mqar:.2f}.")
    where = "tokens the calibration did not see" if selection.scored_on_held_out else "the calibration tokens"
    summary.append(f"Scored on {selection.scoring_tokens} {where} ({selection.text}).")
    return "\n".join([*lines, "", " ".join(summary)])


def plot_selection(selection: Selection, path: str | Path) -> Path | None:
    """Bar chart of each layer's KL when replaced alone, kept layers marked; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'mixerswap[eval]'): no plot written")
        return None
    layers = [s.layer for s in selection.scores]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(layers) + 2), 3.2))
    colors = ["tab:orange" if i in selection.keep else "tab:blue" for i in layers]
    ax.bar(layers, [s.kl for s in selection.scores], color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("KL when replaced alone (nats/token)")
    ax.set_title(f"{selection.kind}: layer scores (orange: keeps attention)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_selection(selection: Selection, out: str | Path, *, settings: dict | None = None, overwrite: bool = False,
                    inputs=()) -> Path:
    """Write ``selection.json``, ``selection.md``, ``selection.png`` and, with a kept set, a ``plan.yaml``
    that ``convert --plan`` takes, into the folder ``out`` (atomically)."""
    import json

    import yaml

    from .checkpoint_io import atomic_output_dir

    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        (tmp / "selection.json").write_text(json.dumps(selection.to_dict(), indent=2) + "\n")
        (tmp / "selection.md").write_text(selection_table(selection) + "\n")
        plot_selection(selection, tmp / "selection.png")
        if selection.keep_kl is not None:
            plan = {"default": {"kind": selection.kind, **(settings or {})}}
            if selection.keep:
                plan["layers"] = [{"layers": ",".join(map(str, selection.keep)), "kind": "attention"}]
            header = (f"# layers keeping attention chosen by KL on {selection.text} (mixerswap select); "
                      f"use: mixerswap convert {selection.teacher} --plan plan.yaml --out DIR\n")
            (tmp / "plan.yaml").write_text(header + yaml.safe_dump(plan, sort_keys=False))
    return Path(out)
