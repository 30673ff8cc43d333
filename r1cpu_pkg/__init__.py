"""r1cpu: a quantized CPU runtime for DeepSeek-R1/V3-architecture models."""

__version__ = "0.1.0"


def load(path, threads=None):
    """Open a GGUF file as a read-only memory map and return a runnable Model."""
    from r1cpu.runtime.model import load as _load

    return _load(path, threads=threads)
