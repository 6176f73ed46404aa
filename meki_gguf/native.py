"""Where the patched llama.cpp is: its tools, its libraries, its Python code (gguf-py, conversion).

Two layouts, one build (scripts/build_llama.py):
- an installed wheel carries it in meki_gguf/llama/: bin/ holds the tools and the shared
  libraries, python/ the patched gguf-py and llama.cpp's conversion package;
- a checkout (scripts/install.sh) has it in build/: the tools in build/cmake/bin, the libraries
  also copied into .venv's llama_cpp, gguf-py and conversion installed into .venv.

Importing meki_gguf runs `activate()`: with a wheel's layout it points llama-cpp-python at our
libraries (LLAMA_CPP_LIB_PATH, unless the user set it) and puts python/ first on sys.path, as
llama.cpp's own convert_hf_to_gguf.py does with its gguf-py. The llama-cpp-python package stays
the one the environment has (the pinned release, as published): a script that imports llama_cpp
without meki_gguf still gets that package's own library.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "llama"                    # a wheel's payload
CHECKOUT_BIN = Path(__file__).resolve().parents[1] / "build" / "cmake" / "bin"

LIB_PATH_VAR = "LLAMA_CPP_LIB_PATH"      # llama-cpp-python reads it when llama_cpp is first imported


def installed() -> bool:
    """True for an installed wheel, False for a checkout."""
    return (PACKAGED / "bin").is_dir()


def bin_dir() -> Path:
    """The folder of the patched tools: $MEKI_LLAMA_BIN, else the wheel's, else the checkout's."""
    if os.environ.get("MEKI_LLAMA_BIN"):
        return Path(os.environ["MEKI_LLAMA_BIN"])
    return PACKAGED / "bin" if installed() else CHECKOUT_BIN


_IMPORTED_BEFORE = False     # llama_cpp had loaded its library before activate() could choose ours


def activate() -> None:
    global _IMPORTED_BEFORE
    if not installed():
        return
    _IMPORTED_BEFORE = "llama_cpp.llama_cpp" in sys.modules
    os.environ.setdefault(LIB_PATH_VAR, str(PACKAGED / "bin"))
    python = str(PACKAGED / "python")
    if python not in sys.path:
        # before an installed PyPI gguf (same version, without the MeKi constants)
        sys.path.insert(0, python)
    gguf = sys.modules.get("gguf")
    if gguf is not None and not hasattr(gguf.MODEL_ARCH, "MEKI"):
        raise ImportError(f"gguf was imported from {gguf.__file__} before meki_gguf, and it lacks the MeKi "
                          f"constants: import meki_gguf first (it uses the gguf-py in {python})")


def library_note() -> str:
    """'' when llama-cpp-python runs our libllama (or has not loaded one yet), else where it got
    another one, for the error of a refused MeKi file."""
    lib = getattr(sys.modules.get("llama_cpp.llama_cpp"), "_lib", None)
    if lib is None:
        return ""
    folder = Path(lib._name).resolve().parent
    override = os.environ.get(LIB_PATH_VAR)
    if installed():
        ours = folder == (PACKAGED / "bin").resolve()
    else:                                  # the checkout copies its libraries into the binding
        ours = not override or folder == CHECKOUT_BIN.resolve()
    if ours:
        return ""
    why = "llama_cpp was imported before meki_gguf" if _IMPORTED_BEFORE else f"{LIB_PATH_VAR}={override}"
    return f"llama-cpp-python uses the llama.cpp in {folder} ({why}), not meki-gguf's"
