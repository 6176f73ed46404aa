"""meki-gguf: run MeKi language models through llama.cpp.

Pipeline, one module per stage:
  checkpoint (read Megatron-LM / HF-style) -> fold -> write (GGUF) -> quantize -> runtime (llama.cpp)

Importing meki_gguf registers the MeKi model with transformers' Auto classes (model_type "meki"),
so `AutoModelForCausalLM.from_pretrained(folder)` loads a MeKi folder (docs/FORMAT.md); it does
so when transformers gets imported, so a program that only runs GGUF files never imports
transformers or torch (meki_gguf.runtime imports in ~0.5 s instead of ~6). In an
installed wheel it also points llama-cpp-python at the patched llama.cpp the wheel carries
(meki_gguf/native.py), so import meki_gguf before llama_cpp and gguf.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from . import native

native.activate()   # before anything imports gguf or llama_cpp

from .errors import MekiError  # noqa: E402

__all__ = ["MekiError", "MekiConfig", "MekiForCausalLM"]


def __getattr__(name: str):
    # the transformers classes, imported on first use: torch and transformers take ~5 s to import,
    # which `from meki_gguf import runtime` and the CLI's llama.cpp commands do not need
    if name in ("MekiConfig", "MekiForCausalLM"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'meki_gguf' has no attribute {name!r}")


def _register() -> None:
    # meki_gguf.model registers its classes when it runs; when it is the module importing
    # transformers, it is in sys.modules already and registers at its end
    importlib.import_module(f"{__name__}.model")


class _RegisterWhenTransformersLoads(importlib.abc.MetaPathFinder):
    """Registers the MeKi classes as soon as transformers is imported: the registration happens
    whichever of the two a program imports first, and costs nothing to a program that never uses
    transformers."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _register()

        spec.loader.exec_module = exec_module       # this spec's own loader object
        return spec


if "transformers" in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())
