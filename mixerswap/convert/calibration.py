"""Calibration: what the teacher's attention does on real text, recorded once for every replaced layer.

``convert --calibration FILE`` runs the teacher over a little text (a few thousand tokens; with
``--calibration teacher``, the default of the command line, text the teacher samples itself) and keeps,
for every layer the plan replaces, the attention module's inputs, the keyword arguments it was called
with (RoPE ``position_embeddings``, ``position_ids``), the per-head attention outputs (the input of
the output projection), the attention output, and how far back each head attends (from the
attention probabilities). Converters use these :class:`LayerStats` to set
what attention has no counterpart for (e.g. Mamba-2's per-head output scale); with ``output_refit``
the pipeline then refits every mixer's output projection (the one its kind declares as
``output_projection``) to the teacher's attention output by ridge least squares, the ridge chosen on
held-out calibration rows (:func:`refit_output_projection`). The pipeline reports, per layer, how
close each converted mixer's output is to the attention output it replaces.

The refit's measured effect (``benchmarks/RESULTS.md``, "Conversion before any training"): before any
training it halves the held-out perplexity of a half-Mamba-2 SmolLM2-135M (202 → 100) and divides that
of an all-Mamba-2 one by 8; but distillation at the default stage rates does not keep the gain (least
squares shrinks the output of layers that point away from the teacher, which shrinks the gradient
upstream, and the align stage moves the fitted projection off its optimum), so it is off by default.

The teacher is loaded whole for this pass (fp32, then freed before the streaming conversion).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..architectures.families import family_for
from .converters import LayerStats

logger = logging.getLogger(__name__)

TEACHER_SAMPLES = "teacher"  # ``--calibration teacher``: the teacher writes its own calibration text
REFIT_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # candidate ridges of the output projection's refit, relative to its gram
REFIT_MIN_GAIN = 1e-3  # the refit must lower the held-out error by this share, else the converted weight stays


def read_calibration_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"calibration text {path} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"calibration text {path} is empty")
    return text


def calibration_rows(tokenizer, text: str, *, tokens: int, seq_len: int, skip: int = 0) -> torch.Tensor:
    """Tokens ``skip .. skip + tokens`` of ``text`` as rows ``[N, seq_len]`` (``seq_len`` shrinks to fit a
    short text); every row starts at position 0 like a document of its own."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][skip : skip + tokens]
    if len(ids) < 2:
        raise ValueError(f"the calibration text has fewer than 2 tokens{f' after the first {skip}' if skip else ''}")
    seq_len = min(seq_len, len(ids))
    return torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        raise ValueError(f"calibration needs the teacher's tokenizer, and {model_dir} has none") from None


def load_teacher_fp32(model_dir: str | Path) -> nn.Module:
    """The teacher in fp32 with eager attention (it returns the probabilities each head's reach is read from)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def teacher_sample_rows(model: nn.Module, *, tokens: int, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """Rows ``[N, seq_len]`` the teacher writes itself: sampled at temperature 1 from its BOS token
    (seeded; end-of-text suppressed so every row is full), ``N = ceil(tokens / seq_len)``.

    The default calibration: unlike any fixed text it is in the teacher's own domain, language and
    tokenizer (a TinyStories model, a code model, a multilingual one alike), and needs no data.
    """
    config = model.config
    start = config.bos_token_id if config.bos_token_id is not None else (config.eos_token_id or 0)
    if isinstance(start, list):
        start = start[0]
    rows = -(-tokens // seq_len)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        prompt = torch.full((rows, 1), int(start), dtype=torch.long, device=model.device)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                             pad_token_id=int(start))
    finally:
        torch.random.set_rng_state(generator_state)
    return out[:, :seq_len].cpu()


def describe_calibration(calibration: str | Path) -> str:
    return "samples the teacher wrote" if str(calibration) == TEACHER_SAMPLES else str(calibration)


def load_calibration_rows(model: nn.Module, model_dir: str | Path, calibration: str | Path, *, tokens: int,
                          seq_len: int = 256, held_out: bool = False, seed: int = 0) -> torch.Tensor | None:
    """Calibration rows from a text file or, for ``"teacher"``, from :func:`teacher_sample_rows`.

    ``held_out`` asks for rows the calibration rows do not contain: the text's next tokens (``None``
    when the text is too short for them) or samples of another seed.
    """
    if str(calibration) == TEACHER_SAMPLES:
        return teacher_sample_rows(model, tokens=tokens, seq_len=seq_len, seed=seed + int(held_out))
    tokenizer = load_tokenizer(model_dir)
    text = read_calibration_text(calibration)
    if not held_out:
        return calibration_rows(tokenizer, text, tokens=tokens, seq_len=seq_len)
    first = calibration_rows(tokenizer, text, tokens=tokens, seq_len=seq_len).numel()
    if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < first + 2 * seq_len:
        return None
    return calibration_rows(tokenizer, text, tokens=tokens, seq_len=seq_len, skip=first)


def collect_layer_stats(model_dir: str | Path, layers: list[int], calibration: str | Path, *, tokens: int = 2048,
                        seq_len: int = 256, seed: int = 0) -> dict[int, LayerStats]:
    """Teacher statistics of each layer in ``layers`` on the first ``tokens`` tokens of the calibration
    text file, or of ``tokens`` tokens the teacher samples (``calibration="teacher"``)."""
    model = load_teacher_fp32(model_dir)
    rows = load_calibration_rows(model, model_dir, calibration, tokens=tokens, seq_len=seq_len, seed=seed)
    return record_layer_stats(model, layers, rows)


@torch.no_grad()
def record_layer_stats(model: nn.Module, layers: list[int], rows: torch.Tensor) -> dict[int, LayerStats]:
    """Run ``model`` (a loaded teacher) over ``rows`` and record the :class:`LayerStats` of ``layers``."""
    family = family_for(model.config.model_type)
    blocks = _layers(model, family.layers_path)
    records: dict[int, dict] = {i: {} for i in layers}
    handles = []
    for i in layers:
        attention = family.mixer_of(blocks[i])
        handles.append(attention.register_forward_hook(_attention_hook(records[i]), with_kwargs=True))
        handles.append(getattr(attention, family.o).register_forward_pre_hook(_o_proj_hook(records[i])))
    try:
        model(input_ids=rows, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    logger.info("calibration: %d x %d tokens through the teacher", *rows.shape)
    return {i: LayerStats(**r) for i, r in records.items()}


def _layers(model: nn.Module, path: str) -> nn.ModuleList:
    for name in path.split("."):
        model = getattr(model, name)
    return model


def _attention_hook(record: dict):
    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        record["inputs"] = hidden.detach()
        record["outputs"] = (output[0] if isinstance(output, tuple) else output).detach()
        record["kwargs"] = {k: kwargs[k] for k in ("position_embeddings", "position_ids") if kwargs.get(k) is not None}
        if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
            record["attention_reach"] = attention_reach(output[1].detach())

    return hook


def _o_proj_hook(record: dict):
    def hook(module, args):
        record["head_outputs"] = args[0].detach()

    return hook


def attention_reach(probs: torch.Tensor) -> torch.Tensor:
    """Per head, how far back attention looks: ``[B, H, T, T]`` probabilities → ``[H]`` distances.

    For each query, the weighted *median* distance ``i - j`` of its attention (the mean would be
    dominated by the mass many heads park on the first token, an attention sink); then the median
    over queries and rows.
    """
    batch, heads, length, _ = probs.shape
    steps = torch.arange(length, device=probs.device)
    distance = (steps[:, None] - steps[None, :]).clamp_min(0)  # [i, j]
    order = distance.argsort(dim=-1)  # per query, keys from nearest to farthest (future keys: weight 0)
    mass = probs.gather(-1, order.expand(batch, heads, length, length)).cumsum(-1)
    crossing = (mass < 0.5).sum(-1).clamp_max(length - 1)  # [B, H, i]: where the mass reaches one half
    per_query = distance.gather(-1, order).expand(batch, heads, length, length).gather(-1, crossing[..., None])
    return per_query[..., 0].transpose(0, 1).flatten(1).float().median(dim=-1).values


@torch.no_grad()
def head_output_scales(mixer: nn.Module, stats: LayerStats, *, heads: int, capture: str) -> torch.Tensor:
    """Per head, the scale that brings the mixer's layer output closest to the teacher's (least squares).

    The mixer's output projection (``capture``, an ``nn.Linear`` holding the teacher's ``W_o``) maps
    head ``h``'s output ``y_h`` (its input slice) to a contribution ``c_h = W_o,h y_h``. The scales
    ``s`` minimize ``||sum_h s_h c_h + b - o||^2`` over the calibration tokens, ``o`` the teacher's
    attention output: a small linear least-squares problem (``heads`` unknowns, solved jointly, so
    heads that say the same thing share the work). A head whose output does not point the teacher's
    way is shrunk towards zero: a layer that adds little beats one that adds noise. Returns
    ``[heads]`` fp32, to be folded into whatever scales each head's output (a norm weight, the
    projection's columns).
    """
    _, y = replay_mixer(mixer, stats, capture=capture)
    proj = mixer.get_submodule(capture)
    weight = proj.weight.double()  # [hidden, heads * P]
    y = y.double().reshape(-1, heads, y.shape[-1] // heads)  # [N, H, P]
    contributions = torch.einsum("nhp,ohp->hno", y, weight.view(weight.shape[0], heads, -1))  # [H, N, hidden]
    target = stats.outputs.double().reshape(-1, weight.shape[0])
    if proj.bias is not None:
        target = target - proj.bias.double()
    flat = contributions.flatten(1)  # [H, N * hidden]
    gram = flat @ flat.T
    rhs = flat @ target.flatten()
    ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(heads, dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge, rhs).float()


@torch.no_grad()
def refit_output_projection(mixer: nn.Module, stats: LayerStats, *, capture: str,
                            ridges: tuple[float, ...] = REFIT_RIDGES) -> tuple[torch.Tensor, dict]:
    """The mixer's output projection refitted to the teacher's attention output (ridge least squares).

    The output is linear in the projection (``capture``, an ``nn.Linear``): ``o = W y + b``, ``y`` its input,
    the heads' outputs. Attention's ``W_o`` (as the converter left it) expects attention's head outputs; the
    mixer's differ, and ``W`` can read them better. ``W`` minimizes ``||W Y - O||^2 + mu ||W - W_0||^2`` over
    the calibration tokens (``O`` the teacher's attention output less the bias, ``W_0`` the converted weight,
    ``mu = ridge * mean(diag(Y Y^T))``): closed form, pulled towards ``W_0`` where the tokens say little.
    The ridge is chosen on held-out calibration rows (the last quarter; a quarter of the tokens with fewer
    than 4 rows) among ``ridges``, then ``W`` is fitted on every row; if no ridge beats ``W_0`` on the held-out
    rows (by ``REFIT_MIN_GAIN`` of its error), ``W_0`` stays. Returns the weight (fp32, ``[hidden, in]``) and a
    report: the chosen ``ridge`` (``None``: kept) and the held-out relative error before and after.
    """
    _, y = replay_mixer(mixer, stats, capture=capture)
    proj = mixer.get_submodule(capture)
    w0 = proj.weight.double()
    target = stats.outputs.double()
    if proj.bias is not None:
        target = target - proj.bias.double()
    rows, tokens = y.shape[0], y.shape[0] * y.shape[1]
    fit = torch.zeros(rows, y.shape[1], dtype=torch.bool)
    if rows >= 4:
        fit[: rows - rows // 4] = True
    else:
        fit.view(-1)[: tokens - tokens // 4] = True
    y, target = y.double().reshape(tokens, -1), target.reshape(tokens, -1)
    fit = fit.view(-1)

    def solve(mask: torch.Tensor, ridge: float) -> torch.Tensor:
        ys, ts = y[mask], target[mask]
        gram = ys.T @ ys
        mu = ridge * gram.diagonal().mean().clamp_min(1e-30)
        return torch.linalg.solve(gram + mu * torch.eye(len(gram), dtype=gram.dtype), ys.T @ ts + mu * w0.T).T

    def held_out_error(w: torch.Tensor) -> float:
        ref = target[~fit]
        return ((y[~fit] @ w.T - ref).norm() / ref.norm().clamp_min(1e-30)).item()

    before = held_out_error(w0)
    errors = {ridge: held_out_error(solve(fit, ridge)) for ridge in ridges}
    best = min(errors, key=errors.get)
    if errors[best] >= (1 - REFIT_MIN_GAIN) * before:
        return proj.weight.detach().float().clone(), {"ridge": None, "held_out_rel_error": [round(before, 4)] * 2}
    return solve(torch.ones_like(fit), best).float(), {"ridge": best,
                                                      "held_out_rel_error": [round(before, 4), round(errors[best], 4)]}


def output_match(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """How close a mixer's output is to the teacher attention output it replaces, over all tokens.

    ``rms_ratio`` = RMS(output) / RMS(target) (1 is the right scale) and ``cosine`` between the two
    flattened outputs (1 is the right direction); ``rel_error`` = ||output - target|| / ||target||.
    """
    out, ref = output.double().flatten(), target.double().flatten()
    ref_norm = ref.norm().clamp_min(1e-30)
    return {
        "rms_ratio": round((out.norm() / ref_norm).item(), 4),
        "cosine": round((out @ ref / (out.norm() * ref_norm).clamp_min(1e-30)).item(), 4),
        "rel_error": round(((out - ref).norm() / ref_norm).item(), 4),
    }


@torch.no_grad()
def replay_mixer(mixer: nn.Module, stats: LayerStats, *, capture: str | None = None):
    """Run ``mixer`` (fp32) on the calibration inputs it replaces; returns its output and, with
    ``capture`` naming a submodule, that submodule's input too (e.g. ``"out_proj"``)."""
    seen = {}
    handle = None
    if capture is not None:
        handle = mixer.get_submodule(capture).register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        output, _ = mixer.float().eval()(stats.inputs.float(), **stats.kwargs)
    finally:
        if handle is not None:
            handle.remove()
    return (output, seen["x"]) if capture is not None else output
