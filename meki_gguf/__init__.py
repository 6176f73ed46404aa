"""meki-gguf: run MeKi language models through llama.cpp.

Pipeline, one module per stage:
  checkpoint (read Megatron-LM / HF-style) -> fold -> write (GGUF) -> quantize -> runtime (llama.cpp)

Importing meki_gguf registers the MeKi model with transformers' Auto classes (model_type "meki"),
so `AutoModelForCausalLM.from_pretrained(folder)` loads a MeKi folder (docs/FORMAT.md). In an
installed wheel it also points llama-cpp-python at the patched llama.cpp the wheel carries
(meki_gguf/native.py), so import meki_gguf before llama_cpp and gguf.
"""
from . import native

native.activate()   # before anything imports gguf or llama_cpp

from .errors import MekiError  # noqa: E402
from .model import MekiConfig, MekiForCausalLM  # noqa: E402


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MekiConfig.model_type, MekiConfig, exist_ok=True)
    AutoModelForCausalLM.register(MekiConfig, MekiForCausalLM, exist_ok=True)


_register()
__all__ = ["MekiError", "MekiConfig", "MekiForCausalLM"]
