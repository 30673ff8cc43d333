"""The shipped tiny R1: the embedded GGUF is exactly what `r1cpu convert` makes of the committed
checkpoint (tools/data/tiny-r1), and it, and the other storage types, answer a held-out question
correctly with greedy decoding, thinking first."""

from pathlib import Path

import pytest

from r1cpu.runtime import tasks
from r1cpu.runtime.chat_cli import DEFAULT_MODEL
from r1cpu.runtime.convert import convert
from r1cpu.runtime.eval_tasks import Answerer

CHECKPOINT = Path(__file__).resolve().parents[1] / "tools" / "data" / "tiny-r1"
QUESTION = ("mul", 0)  # (kind, index) in tasks.heldout_tasks: "What is 370 * 2?"


def _question() -> tasks.Task:
    kind, index = QUESTION
    task = tasks.heldout_tasks(index + 1, kinds=(kind,))[index]
    assert tasks.is_heldout(task.question)
    return task


def _answer(path) -> str:
    import r1cpu

    text, n_tokens = Answerer(r1cpu.load(path, threads=1))(_question())
    assert n_tokens > 20  # it reasoned before answering
    return text


def test_shipped_model_reasons_and_answers():
    text, task = _answer(DEFAULT_MODEL), _question()
    assert tasks.is_correct(task, text), text
    assert text == task.response  # every worked step as in training, then it stopped (EOS)


def test_shipped_model_is_the_conversion_of_the_checkpoint(tmp_path):
    out = convert(CHECKPOINT, tmp_path / DEFAULT_MODEL.name, "q8_0", threads=1).path
    assert Path(out).read_bytes() == DEFAULT_MODEL.read_bytes()


@pytest.mark.parametrize("out_type", ["f16", "q4_0"])
def test_other_types_answer(tmp_path, out_type):
    out = convert(CHECKPOINT, tmp_path / f"tiny-r1.{out_type}.gguf", out_type, threads=1).path
    assert tasks.is_correct(_question(), _answer(out))


@pytest.mark.reference
def test_training_script_writes_a_release_layout_checkpoint(tmp_path):
    """Two training steps: the folder loads back through transformers with the MTP layer, converts,
    and the r1cpu logits of the F32 file match transformers' (needs torch + transformers)."""
    import numpy as np
    import torch

    import r1cpu
    from r1cpu.tools import train_tiny_r1 as tr

    out = tmp_path / "hf"
    tr.main(["--out", str(out), "--steps", "2", "--eval-every", "0", "--final-n", "1"])
    model, mtp = tr.load_checkpoint(out)  # raises on missing, unexpected or mismatched tensors
    assert sum(p.numel() for p in mtp.parameters()) > 0
    tokens = [0, *range(10, 40)]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    got = r1cpu.load(convert(out, tmp_path / "f32.gguf", "f32").path).logits(tokens)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
