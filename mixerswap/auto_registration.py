"""The student's registration with ``AutoConfig`` / ``AutoModelForCausalLM``, done once both sides are imported.

``import mixerswap`` must make transformers' Auto classes know the student, but importing those Auto
classes costs seconds (``modeling_utils``, ``generation`` and what they pull in: accelerate,
scikit-learn when it is installed), which ``mixerswap --help`` or a failing option check should
not pay. So :func:`install` (called by ``mixerswap/__init__.py``) puts an import hook on
``sys.meta_path`` that registers

- the config as soon as ``transformers.models.auto.configuration_auto`` has been imported,
- the model as soon as ``transformers.models.auto.modeling_auto`` has been imported,

importing our side (``mixerswap.architectures``) at that moment if nobody has yet. Every way to
look a model type up goes through these two modules, so after ``import mixerswap`` the student is
always found, and before the user's ``from transformers import AutoModelForCausalLM`` returns.

Importing our side while some module of transformers or of ours is half-imported could meet that
module half-done (``modeling_layers`` imports ``modeling_auto``; our ``modeling`` imports it too), so
while registrations are pending the hook counts the transformers and mixerswap modules being
imported and registers only when the outermost one has finished.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

WATCHED = {  # transformers' module -> what to register once it is imported
    "transformers.models.auto.configuration_auto": "config",
    "transformers.models.auto.modeling_auto": "model",
}
_in_flight = 0  # transformers / mixerswap modules whose code is running (counted while registrations are pending)
_finished: set[str] = set()  # watched modules whose code ran to the end (importlib marks them done only later)
_registered: set[str] = set()


def _is_loaded(name: str) -> bool:
    if name in _finished:
        return True
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _register(what: str) -> None:
    if what == "config":
        from transformers import AutoConfig

        from .architectures.configuration import MixerSwapConfig

        AutoConfig.register(MixerSwapConfig.model_type, MixerSwapConfig, exist_ok=True)
    else:
        from transformers import AutoModelForCausalLM

        from .architectures.modeling import MixerSwapConfig, MixerSwapForCausalLM

        AutoModelForCausalLM.register(MixerSwapConfig, MixerSwapForCausalLM, exist_ok=True)


def _settle() -> None:
    """Register what is due, unless an import is half-way (its end calls this again)."""
    if _in_flight:
        return
    for theirs, what in WATCHED.items():
        if what not in _registered and _is_loaded(theirs):
            _registered.add(what)
            _register(what)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' and our modules with ``PathFinder`` and counts them while their code runs."""

    def find_spec(self, name, path, target=None):
        if len(_registered) == len(WATCHED) or not name.startswith(("transformers.", "mixerswap.")):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module  # PathFinder makes one loader per module: patching it touches nothing else

        def exec_module(module):
            global _in_flight
            _in_flight += 1
            try:
                run(module)
            finally:
                _in_flight -= 1
            if name in WATCHED:
                _finished.add(name)
            _settle()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the hook in place (once) and register what can be registered already."""
    if not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    _settle()
