"""Opt-in (interop): our k-quant quantizers against ggml's own reference quantizers.

ggml's `quantize_row_*_ref`, which llama-quantize runs when no imatrix is given, is called through
ctypes in llama-cpp-python's libggml-base. Checked: the same bytes, a weighted RMSE that is no
worse (the table is printed), and that the committed fixture used by tests/test_kquants.py still
equals ggml's output. Regenerate the fixture with

    .venv/bin/python tests/test_kquants_ggml.py
"""

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).parent))
from test_kquants import FIXTURE, TYPES, tricky_rows  # noqa: E402

from r1cpu.quant import registry  # noqa: E402

pytestmark = pytest.mark.interop
DISTRIBUTIONS = {
    "normal": lambda rng, shape: rng.standard_normal(shape),
    "student-t3": lambda rng, shape: rng.standard_t(3, shape),
    "scaled": lambda rng, shape: rng.standard_normal(shape) * rng.lognormal(0, 1, (shape[0], 1)),
}


def ggml_library() -> ctypes.CDLL:
    llama_cpp = pytest.importorskip("llama_cpp")
    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))


def ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype) -> np.ndarray:
    """ggml's quantize_row_<type>_ref on each row of x float32[rows, n] -> uint8[rows, row_bytes]."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    name = qtype.name.lower().replace("_k", "_K")
    fn = getattr(lib, f"quantize_row_{name}_ref")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def weighted_rmse(x: np.ndarray, y: np.ndarray) -> float:
    """sqrt(sum w (x - y)^2 / sum w x^2) with ggml's Q4_K/Q5_K search weights w = |x| + rms(row)."""
    x = x.astype(np.float64)
    w = np.abs(x) + np.sqrt(np.mean(x**2, axis=1, keepdims=True))
    return float(np.sqrt(np.sum(w * (x - y) ** 2) / np.sum(w * x**2)))


@pytest.fixture(scope="module")
def lib():
    return ggml_library()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_same_bytes_as_ggml(lib, qtype):
    x = np.vstack([tricky_rows(1024, seed=s) for s in range(4)])
    assert np.array_equal(registry.quantize(x, qtype), ggml_quantize(lib, x, qtype))


def test_committed_fixture_is_ggml_output(lib):
    ref = np.load(FIXTURE)
    for qtype in TYPES:
        assert np.array_equal(ref[qtype.name], ggml_quantize(lib, ref["x"], qtype)), qtype.name


def test_rmse_not_worse_than_ggml(lib, capsys):
    rng = np.random.default_rng(0)
    lines = ["| type | data | ours wRMSE | ggml wRMSE | ours RMSE | ggml RMSE | same bytes |", "|---" * 7 + "|"]
    for qtype in TYPES:
        for dist, draw in DISTRIBUTIONS.items():
            x = draw(rng, (256, 1024)).astype(np.float32)
            ours, theirs = registry.quantize(x, qtype), ggml_quantize(lib, x, qtype)
            y, z = registry.dequantize(ours, qtype), registry.dequantize(theirs, qtype)
            w_ours, w_ggml = weighted_rmse(x, y), weighted_rmse(x, z)
            rel = lambda a: float(np.sqrt(np.sum((x - a) ** 2.0) / np.sum(x.astype(np.float64) ** 2)))  # noqa: E731
            lines.append(f"| {qtype.name} | {dist} | {w_ours:.5f} | {w_ggml:.5f} | {rel(y):.5f} | {rel(z):.5f} | "
                         f"{'yes' if np.array_equal(ours, theirs) else 'no'} |")  # fmt: skip
            assert w_ours <= w_ggml * (1 + 1e-12), (qtype.name, dist)
    with capsys.disabled():
        print("\nRMSE relative to the RMS of x; wRMSE weighted by |x| + rms(row):\n" + "\n".join(lines))


def write_fixture(path: Path = FIXTURE) -> None:
    lib = ggml_library()
    x = tricky_rows(512, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=x, **{t.name: ggml_quantize(lib, x, t) for t in TYPES})


if __name__ == "__main__":
    write_fixture()
    print(f"wrote {FIXTURE}")
