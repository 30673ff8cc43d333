"""Shared fixtures: the tiny test checkpoints, generated once per session (deterministic)."""

import pytest

from r1cpu.tools.make_checkpoint import make_checkpoint

TINY_PRESETS = ("tiny-v3", "tiny-v3-fp8", "tiny-v2", "tiny-moonlight")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """preset name -> checkpoint folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {p: make_checkpoint(p, root / p) for p in TINY_PRESETS}
