"""Live check of the committed reference logits against transformers (`pytest -m reference`)."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from r1cpu.tools.make_reference import TINY_PRESETS, compare, reference  # noqa: E402

pytestmark = pytest.mark.reference
FIXTURES = Path(__file__).parent / "fixtures" / "reference"


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_transformers_reproduces_the_committed_logits(preset):
    with np.load(FIXTURES / f"{preset}.npz") as committed:
        assert compare(reference(preset), dict(committed)) == []
