"""Plan YAML parsing: ranges, defaults and errors that name the entry or the layer."""

import pytest

from mixerswap.architectures.plan import PlanError
from mixerswap.convert.plan_file import parse_plan_spec, read_plan_file


def kinds(plan):
    return [kind for kind, _ in plan]


def test_ranges_lists_negative_indices_and_default():
    spec = {"default": {"kind": "mamba2", "chunk_size": 16},
            "layers": [{"layers": "0-1,-1", "kind": "attention"}, {"layers": [3], "kind": "mamba2", "conv_kernel": 2}]}
    plan = parse_plan_spec(spec, 6)
    assert kinds(plan) == ["attention", "attention", "mamba2", "mamba2", "mamba2", "attention"]
    assert plan[3][1] == {"conv_kernel": 2} and plan[2][1] == {"chunk_size": 16}
    assert kinds(parse_plan_spec({"default": "attention", "layers": [{"layers": "-3--2", "kind": "mamba2"}]}, 6)) == [
        "attention", "attention", "attention", "mamba2", "mamba2", "attention"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"layers": [{"layers": "0-3", "kind": "attention"}]}, "layer 4 is in no plan entry"),
        ({"layers": [{"layers": "0-4", "kind": "mamba2"}, {"layers": "4-5", "kind": "attention"}]},
         "layer 4 is in plan entries 1 and 2"),
        ({"layers": [{"layers": "0-6", "kind": "mamba2"}]}, "plan entry 1: layer 6 is out of range"),
        ({"layers": [{"layers": "3-1", "kind": "mamba2"}]}, "runs backwards"),
        ({"layers": [{"layers": "a-b", "kind": "mamba2"}]}, "cannot read layer range 'a-b'"),
        ({"layers": [{"layers": "0-5"}]}, "plan entry 1: needs a 'kind'"),
        ({"layers": [{"layers": "0-5", "kind": "attention", "window": 4}]}, "attention takes no settings"),
        ({"layers": [], "defaults": "mamba2"}, "unknown plan key"),
    ],
    ids=["uncovered", "overlap", "out-of-range", "backwards", "unreadable", "no-kind", "attention-settings", "typo"],
)
def test_bad_plans_name_the_problem(spec, message):
    with pytest.raises(PlanError, match=message):
        parse_plan_spec(spec, 6)


def test_plan_file_errors_name_the_file(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("layers: [{layers: '0-9', kind: mamba2}]\n")
    with pytest.raises(PlanError, match="plan.yaml: plan entry 1: layer 9 is out of range"):
        read_plan_file(path, 6)
    path.write_text("layers: [unclosed\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        read_plan_file(path, 6)
