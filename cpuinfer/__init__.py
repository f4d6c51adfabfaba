"""cpuinfer: CPU-only LLM inference for GGUF models, bounded by memory bandwidth.

    import cpuinfer
    m = cpuinfer.load("model.gguf")
    for piece in m.chat([{"role": "user", "content": "Hi"}]):
        print(piece, end="")
"""
from .errors import CpuinferError
from .model import Model, Session, load


def load_tokenizer(path):
    """The tokenizer of a GGUF file (works on vocab-only files)."""
    from .tokenizer import load_tokenizer as _load
    return _load(path)


__all__ = ["CpuinferError", "Model", "Session", "load", "load_tokenizer"]
__version__ = "0.1.0"
