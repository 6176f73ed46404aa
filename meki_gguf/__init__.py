"""meki-gguf: run MeKi language models through llama.cpp.

Pipeline, one module per stage:
  checkpoint (read Megatron-LM / HF-style) -> fold -> write (GGUF) -> quantize -> runtime (llama.cpp)
"""
from .errors import MekiError

__all__ = ["MekiError"]
