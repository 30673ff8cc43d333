"""Shared fixtures: the tiny test checkpoints, generated once per session (deterministic)."""

import pytest

from r1cpu.tools.make_checkpoint import make_checkpoint

TINY_PRESETS = ("tiny-v3", "tiny-v3-fp8", "tiny-v2", "tiny-moonlight")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """preset name -> checkpoint folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {p: make_checkpoint(p, root / p) for p in TINY_PRESETS}


@pytest.fixture(scope="session")
def reference():
    """preset -> the committed transformers logits (tokens int32 [T], logits float32 [T, vocab])."""
    import numpy as np
    from pathlib import Path

    root = Path(__file__).parent / "fixtures" / "reference"

    def load(preset):
        return dict(np.load(root / f"{preset}.npz"))

    return load


@pytest.fixture(scope="session")
def llama_converted(checkpoints, tmp_path_factory):
    """preset -> F32 GGUF written by llama.cpp's own convert_hf_to_gguf.py (needs its source and torch).

    The source tree comes from $LLAMA_CPP_DIR or .cache/llama.cpp (`make test-interop` fetches it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    llama_dir = Path(os.environ.get("LLAMA_CPP_DIR", Path(__file__).parents[1] / ".cache" / "llama.cpp"))
    if not (llama_dir / "convert_hf_to_gguf.py").exists():
        pytest.skip(f"llama.cpp source not found at {llama_dir}")
    root = tmp_path_factory.mktemp("llama-converted")
    out = {}
    for preset, src in checkpoints.items():
        out[preset] = root / f"{preset}.f32.gguf"
        cmd = [sys.executable, "-m", "r1cpu.tools.llama_convert", str(llama_dir), str(src), str(out[preset])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return out
