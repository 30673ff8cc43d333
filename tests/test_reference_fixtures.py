"""The committed reference logits still describe what tools/make_checkpoint.py generates.

Regenerate them with `python tools/make_reference.py --out tests/fixtures/reference` (needs torch
and transformers) whenever the generator changes on purpose.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from r1cpu.tools.make_checkpoint import checkpoint_sha256, make_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
TINY = ["tiny-v3", "tiny-v3-fp8", "tiny-v2", "tiny-moonlight"]


@pytest.mark.parametrize("preset", TINY)
def test_fixture_matches_a_fresh_checkpoint(preset, tmp_path):
    ckpt = make_checkpoint(preset, tmp_path / preset)
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    with np.load(FIXTURES / f"{preset}.npz") as ref:
        assert str(ref["weights_sha256"]) == checkpoint_sha256(ckpt)
        assert (
            str(ref["config_sha256"])
            == hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()
        )
        assert ref["tokens"].dtype == np.int32 and ref["tokens"].shape == (64,)
        assert ref["tokens"].min() >= 0 and ref["tokens"].max() < vocab
        assert ref["logits"].dtype == np.float32 and ref["logits"].shape == (64, vocab)
        assert np.isfinite(ref["logits"]).all()
