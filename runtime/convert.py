"""`r1cpu convert`: Hugging Face DeepSeek checkpoint folder -> llama.cpp-compatible GGUF, streaming.

Flow: read config + safetensors headers -> plan every output tensor (shape, type) -> write the GGUF
header -> stream each tensor: float32 row chunks -> numba quantizer -> file. The output is written to a
temporary name beside the target and renamed only when complete.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from r1cpu.kernels_numba.quantize import quantize_rows
from r1cpu.kernels_numba.threads import set_threads
from r1cpu.quant.registry import GGMLType
from r1cpu.runtime import convert_meta
from r1cpu.runtime.convert_tensors import plan
from r1cpu.runtime.gguf_writer import GGUFWriter
from r1cpu.runtime.hf_checkpoint import Checkpoint
from r1cpu.runtime.recipes import choose, parse_tensor_types, recipe


@dataclass(frozen=True)
class Summary:
    path: Path
    n_tensors: int
    n_params: int
    n_bytes: int  # file size
    data_bytes: int  # tensor data only
    seconds: float
    types: dict[str, int]  # storage type name -> tensor count

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.data_bytes / max(1, self.n_params)

    def __str__(self) -> str:
        mb = self.n_bytes / 1e6
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.types.items()))
        return (f"wrote {self.path}: {self.n_tensors} tensors ({kinds}), {self.n_params / 1e6:.1f} M params, "
                f"{mb:.1f} MB, {self.bits_per_weight:.2f} bits/weight, {self.seconds:.1f} s ({mb / max(self.seconds, 1e-9):.0f} MB/s)")  # fmt: skip


def convert(src_dir, out_path, out_type: str = "f16", *, force: bool = False, threads: int | None = None,
            progress: bool = False, tensor_types: Sequence[str] = ()) -> Summary:  # fmt: skip
    """tensor_types: `PATTERN=TYPE` overrides of the recipe, as llama-quantize's --tensor-type."""
    t0 = time.perf_counter()
    src, out_path = Path(src_dir), Path(out_path)
    rec, overrides = recipe(out_type), parse_tensor_types(tensor_types)
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path} exists (use --force to overwrite)")
    set_threads(threads)
    ckpt = Checkpoint(src)
    arch = convert_meta.check_architecture(ckpt.config, src)
    tensors = plan(ckpt)
    writer = GGUFWriter()
    convert_meta.write_hparams(writer, ckpt.config, src.name or arch, rec.file_type)
    convert_meta.write_tokenizer(writer, src, int(ckpt.config["vocab_size"]), ckpt.config)
    types = {}
    for t, qtype in zip(tensors, choose(rec, [(t.name, t.shape) for t in tensors], overrides)):
        writer.add_tensor_info(t.name, t.shape, qtype)
        types[t.name] = qtype
    with _atomic_output(out_path) as f, tqdm(total=writer.total_bytes, unit="B", unit_scale=True,
                                              desc="convert", disable=not progress) as bar:  # fmt: skip
        writer.write_header(f)
        for t in tensors:
            for chunk in _prefetch(t.produce()):
                data = quantize_rows(np.ascontiguousarray(chunk, dtype=np.float32), types[t.name])
                writer.write_data(f, data)
                bar.update(data.nbytes)
        writer.finish()
    counts: dict[str, int] = {}
    for q in types.values():
        counts[GGMLType(q).name] = counts.get(GGMLType(q).name, 0) + 1
    n_params = sum(int(np.prod(t.shape)) for t in tensors)
    size = out_path.stat().st_size
    return Summary(out_path, len(tensors), n_params, size, writer.total_bytes, time.perf_counter() - t0, counts)


def _prefetch(chunks, depth: int = 2):
    """Run the chunk producer (disk reads, FP8/BF16 widening) one step ahead in a thread, so reading
    overlaps quantizing. Exceptions from the producer are re-raised here."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def work():
        try:
            for chunk in chunks:
                while True:
                    if stop.is_set():
                        return
                    try:
                        q.put((chunk, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
            q.put((None, None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put((None, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            chunk, err = q.get()
            if err is not None:
                raise err
            if chunk is None:
                return
            yield chunk
    finally:
        stop.set()


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def _atomic_output(path: Path):
    """Write to a temporary name beside `path`; rename on success, delete on any error or signal."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if previous is signal.SIG_DFL:  # make SIGTERM unwind like Ctrl-C so the temporary file is removed
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # name the file; the bare errno does not
            raise OSError(e.errno, f"{path}: {os.strerror(e.errno)} while writing (partial output removed)") from None
        raise
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs; the CLI exits with 128 + signum."""

    signum = signal.SIGTERM


def _raise_interrupt(signum, frame):
    raise Terminated(f"signal {signum}")

