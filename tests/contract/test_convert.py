"""Converting to every kind: exact all-attention students, declared fp32 parameters, plan files and their errors."""

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mixerswap.architectures import MixerSwapConfig, MixerSwapForCausalLM, PlanError
from mixerswap.architectures.mixers import fp32_parameter_names, mixer_kind
from mixerswap.convert import convert

from .conftest import FAMILIES, KINDS, plan_file, random_ids, short_reach, tunable


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_all_attention_plan_reproduces_the_teacher_exactly(family, kind, teacher_dir, teacher, tmp_path):
    convert(teacher_dir(family), tmp_path / "s", to=kind, keep_attention=1.0, progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    assert student.config.layer_kinds() == ["attention"] * 3
    ids = random_ids(2, 21)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(family)(ids).logits)


def stored_dtypes(folder) -> dict[str, str]:
    dtypes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            dtypes |= {name: f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_conversion_keeps_declared_fp32_parameters(family, kind, teacher_dir, tmp_path):
    convert(teacher_dir(family), tmp_path / "s", to=kind, attention_layers=[1], dtype="bfloat16", progress=False)
    stored = stored_dtypes(tmp_path / "s")
    with torch.device("meta"):
        fp32 = fp32_parameter_names(MixerSwapForCausalLM(MixerSwapConfig.from_pretrained(tmp_path / "s")))
    assert bool(fp32) == bool(mixer_kind(kind).module.fp32_parameters)  # replaced layers 0 and 2 have them
    assert {name: dtype for name, dtype in stored.items() if name in fp32} == {name: "F32" for name in fp32}
    assert {dtype for name, dtype in stored.items() if name not in fp32} == {"BF16"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.bfloat16)
    for name, param in loaded.named_parameters():
        assert param.dtype == (torch.float32 if name in fp32 else torch.bfloat16), name


def test_plan_file_with_every_kind_in_one_model(mixed_student_dir):
    """Attention in layer 0, then one layer per kind (the last one through ``default``), with the
    kinds' short-reach settings; the student generates with its cache as without."""
    model = AutoModelForCausalLM.from_pretrained(mixed_student_dir(tuple(KINDS)), dtype=torch.float64).eval()
    assert model.config.layer_kinds()[: len(KINDS) + 1] == ["attention", *KINDS]
    for i, kind in enumerate(KINDS, start=1):
        assert isinstance(model.layer_mixer(i), mixer_kind(kind).module)
        assert all(model.config.plan[i][k] == v for k, v in short_reach(kind).items())
    prompt = random_ids(1, 9)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def untunable(kind: str) -> str:
    """A setting of ``kind`` that follows from the teacher: ``n_heads`` where the kind has one."""
    fixed = sorted(set(mixer_kind(kind).module.Settings.model_fields) - tunable(kind))
    return "n_heads" if "n_heads" in fixed else fixed[0]


BAD_PLANS = {
    "unknown-kind": (lambda k: {"layers": [{"layers": 0, "kind": "rwkv"}], "default": k},
                     r"layer 0: unknown mixer kind 'rwkv'"),
    "layer-out-of-range": (lambda k: {"layers": [{"layers": "1-3", "kind": k}], "default": "attention"},
                           r"plan entry 1: layer 3 is out of range"),
    "overlapping-ranges": (lambda k: {"layers": [{"layers": "0-1", "kind": "attention"}, {"layers": "1-2", "kind": k}]},
                           r"layer 1 is in plan entries 1 and 2"),
    "uncovered-layers": (lambda k: {"layers": [{"layers": [0, 2], "kind": k}]}, r"layer 1 is in no plan entry"),
    "untunable-setting": (lambda k: {"layers": [{"layers": "0-1", "kind": "attention"},
                                                {"layers": 2, "kind": k, untunable(k): 2}]}, r"layer 2 \({kind}\)"),
    "unknown-setting": (lambda k: {"layers": [{"layers": 1, "kind": k, "no_such_setting": 1}], "default": "attention"},
                        r"layer 1 \({kind}\).*no_such_setting"),
    "chunk-size-zero": (lambda k: {"layers": [{"layers": 1, "kind": k, "chunk_size": 0}], "default": "attention"},
                        r"layer 1 \({kind}\): .*chunk_size"),
    "settings-on-attention": (lambda k: {"layers": [{"layers": 0, "kind": "attention", "chunk_size": 7}], "default": k},
                              r"plan entry 1: attention takes no settings"),
}


def bad_plan_cases() -> list:
    """Every bad plan for every kind (``chunk-size-zero`` for kinds that have a ``chunk_size``)."""
    return [pytest.param(kind, case, id=f"{kind}-{case}") for kind in KINDS for case in BAD_PLANS
            if case != "chunk-size-zero" or "chunk_size" in tunable(kind)]


@pytest.mark.parametrize("kind, case", bad_plan_cases())
def test_bad_plan_is_refused_in_one_line_and_nothing_is_written(kind, case, teacher_dir, tmp_path):
    spec, message = BAD_PLANS[case]
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=message.format(kind=kind)) as err:
        convert(teacher_dir("llama"), out, plan=plan_file(tmp_path / "plan.yaml", spec(kind)), progress=False)
    assert "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_calibrated_conversion_refits_the_declared_output_projection(kind, teacher_dir, tmp_path):
    """``output_projection`` names the ``nn.Linear`` whose output is the mixer's output (the refit's premise:
    the output is linear in its weight); calibration refits it, records the ridge and held-out errors, and no
    layer ends further from the teacher's attention output on the calibration tokens than without the refit."""
    module = mixer_kind(kind).module
    assert module.output_projection, f"{kind} declares no output_projection"
    reports = {}
    for refit in (True, False):
        out = tmp_path / f"s-{refit}"
        convert(teacher_dir("llama"), out, to=kind, attention_layers=[1], calibration="teacher",
                calibration_tokens=512, output_refit=refit, progress=False)
        reports[refit] = yaml.safe_load((out / "mixerswap.yaml").read_text())["calibration"]
    assert reports[True]["output_refit"] and not reports[False]["output_refit"]
    for idx in (0, 2):
        fitted, plain = reports[True]["layers"][idx], reports[False]["layers"][idx]
        assert "output_refit" not in plain
        before, after = fitted["output_refit"]["held_out_rel_error"]
        assert after <= before
        assert fitted["after"]["rel_error"] <= plain["after"]["rel_error"] + 1e-4, (idx, fitted, plain)

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s-True", dtype=torch.float32).eval()
    seen = {}
    for idx in (0, 2):
        mixer = student.model.layers[idx].self_attn
        mixer.register_forward_hook(lambda m, a, out, idx=idx: seen.__setitem__(("mixer", idx), out[0]))
        mixer.get_submodule(module.output_projection).register_forward_hook(
            lambda m, a, out, idx=idx: seen.__setitem__(("proj", idx), out))
    with torch.no_grad():
        student(random_ids(2, 13))
    for idx in (0, 2):
        assert torch.equal(seen[("mixer", idx)], seen[("proj", idx)])
