"""meki-gguf: run MeKi language models through llama.cpp.

Pipeline, one module per stage:
  checkpoint (read Megatron-LM / HF-style) -> fold -> write (GGUF) -> quantize -> runtime (llama.cpp)

Importing meki_gguf registers the MeKi model with transformers' Auto classes (model_type "meki"),
so `AutoModelForCausalLM.from_pretrained(folder)` loads a MeKi folder (docs/FORMAT.md).
"""
from .errors import MekiError
from .model import MekiConfig, MekiForCausalLM


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MekiConfig.model_type, MekiConfig, exist_ok=True)
    AutoModelForCausalLM.register(MekiConfig, MekiForCausalLM, exist_ok=True)


_register()
__all__ = ["MekiError", "MekiConfig", "MekiForCausalLM"]
