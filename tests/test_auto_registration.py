"""``import mixerswap`` registers the student with the Auto classes, whatever is imported first, and is cheap.

Each case runs in a fresh interpreter: the registration depends on import order, which one process
can only go through once.
"""

import subprocess
import sys

import pytest

CHECK = """
from transformers import AutoConfig, AutoModelForCausalLM
from mixerswap.architectures.configuration import MixerSwapConfig
from mixerswap.architectures.modeling import MixerSwapForCausalLM
assert type(AutoConfig.for_model("mixerswap")) is MixerSwapConfig
assert AutoModelForCausalLM._model_mapping[MixerSwapConfig] is MixerSwapForCausalLM
"""

ORDERS = {
    "mixerswap-first": "import mixerswap\n",
    "transformers-auto-first": "from transformers import AutoModelForCausalLM\nimport mixerswap\n",
    "our-modeling-directly": "import mixerswap.architectures.modeling\n",
    "package-attribute": "from mixerswap import MixerSwapForCausalLM\n",
    "transformers-attribute": "import mixerswap, transformers\ntransformers.AutoModelForCausalLM\n",
    "stock-model-class-after": "import mixerswap\nfrom transformers import LlamaForCausalLM\n",
}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("first", list(ORDERS.values()), ids=list(ORDERS))
def test_student_is_registered_whatever_comes_first(first):
    result = run_python(first + CHECK)
    assert result.returncode == 0, result.stderr[-2000:]


def test_import_and_help_do_not_import_torch_or_transformers():
    code = ("import sys, mixerswap, mixerswap.cli\n"
            "heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'datasets', 'matplotlib', 'peft', 'accelerate',"
            " 'sklearn') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "mixerswap", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "convert" in result.stdout


def test_remote_code_shims_import_the_classes():
    code = ("import importlib.util, pathlib, mixerswap\n"
            "folder = pathlib.Path(mixerswap.__file__).parent / 'architectures' / 'remote'\n"
            "for name in ('configuration_mixerswap', 'modeling_mixerswap'):\n"
            "    spec = importlib.util.spec_from_file_location(name, folder / f'{name}.py')\n"
            "    module = importlib.util.module_from_spec(spec)\n"
            "    spec.loader.exec_module(module)\n" + CHECK)
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
