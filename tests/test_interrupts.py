"""Interrupted work: Ctrl-C, SIGTERM and a full disk during `r1cpu convert` leave neither the output
nor the temporary file behind, and end with the documented exit code or a one-line error."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from r1cpu.runtime.cli import main as cli
from r1cpu.runtime.gguf_writer import GGUFWriter
from r1cpu.tools.make_checkpoint import make_checkpoint

R1CPU = Path(sys.executable).parent / "r1cpu"  # the console script of this environment


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """tiny-v3 with 16 layers: ~300 tensors, so converting takes seconds, not milliseconds."""
    return make_checkpoint("tiny-v3", tmp_path_factory.mktemp("deep") / "ckpt", layers=16)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _wait_for_tmp(proc: subprocess.Popen, folder: Path, timeout: float = 120.0) -> None:
    """Block until the converter has started writing its temporary file."""
    end = time.monotonic() + timeout
    while not list(folder.glob(".*.tmp")):
        assert proc.poll() is None, f"convert ended before writing: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < end, "convert never started writing"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, existing", [(signal.SIGINT, 130, None), (signal.SIGTERM, 143, None),
                                                 (signal.SIGTERM, 143, b"the previous model")])  # fmt: skip
def test_signal_during_convert_leaves_nothing(deep_checkpoint, tmp_path, sig, code, existing):
    """Nothing new is left; with --force, a file already under the final name stays as it was."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if existing:
        (out_dir / "m.gguf").write_bytes(existing)
    cmd = [str(R1CPU), "convert", str(deep_checkpoint), "-o", str(out_dir / "m.gguf"), "--type", "q8_0", "--threads", "1", "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_tmp(proc, out_dir)
        time.sleep(0.2)  # well inside the tensor stream
        assert proc.poll() is None, "convert finished before the signal: the checkpoint is too small"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert _leftovers(out_dir) == (["m.gguf"] if existing else [])
    assert not existing or (out_dir / "m.gguf").read_bytes() == existing


def _convert_cli(src, out: Path):
    return CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--type", "f16"])


def _error_line(res) -> str:
    """The last line of the output (before it: the progress bar's carriage-return updates)."""
    assert res.output.endswith("\n") and "Traceback" not in res.output
    return res.output.splitlines()[-1].rsplit("\r", 1)[-1]


def test_full_disk_is_one_line_and_removes_the_temporary(checkpoints, tmp_path, monkeypatch):
    """ENOSPC from the middle of the tensor stream, as a full disk reports it."""
    real, calls = GGUFWriter.write_data, {"n": 0}

    def fill_up(self, f, chunk):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, f, chunk)

    monkeypatch.setattr(GGUFWriter, "write_data", fill_up)
    res = _convert_cli(checkpoints["tiny-v3"], tmp_path / "m.gguf")
    assert res.exit_code == 1 and calls["n"] == 20
    out = tmp_path / "m.gguf"
    assert _error_line(res) == f"Error: [Errno 28] {out}: No space left on device while writing (partial output removed)"
    assert _leftovers(tmp_path) == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (needs root and mount; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_really_full_disk(checkpoints, tiny_disk):
    res = _convert_cli(checkpoints["tiny-v3"], tiny_disk / "m.gguf")  # f16 needs ~700 KB
    assert res.exit_code == 1
    assert _error_line(res).endswith("m.gguf: No space left on device while writing (partial output removed)")
    assert _leftovers(tiny_disk) == []
