"""r1cpu: a quantized CPU runtime for DeepSeek-R1/V3-architecture models."""

__version__ = "0.1.0"


def load(path, threads=None, max_ram=None):
    """Open a GGUF file as a read-only memory map and return a runnable Model. max_ram (bytes or
    "1.5G"): keep the weights within it, reading routed experts on demand into a cache."""
    from r1cpu.runtime.model import load as _load

    return _load(path, threads=threads, max_ram=max_ram)
