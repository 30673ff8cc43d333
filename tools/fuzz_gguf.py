"""Mutation fuzzer for the GGUF reader and model loading (`make fuzz`).

    python -m r1cpu.tools.fuzz_gguf [--cases N] [--seed S] [--batch B] [--timeout T] [--out DIR]

Seeds are valid tiny files (tiny-v3 and tiny-v2 checkpoints converted to q8_0/q4_0/f16). Case i is
mutated deterministically from (seed, i): bit flips, byte runs, inserted/deleted bytes, truncation,
and header fields (counts, lengths, types, dims, offsets, values) set to boundary values. Each file is
opened with `r1cpu.load` and, if that succeeds, run for 2 tokens. The only acceptable outcomes are a
load + finite logits, or one of our errors (GGUFError / ConfigError / NumericalError) with a one-line
message naming the file. Anything else is a finding: another exception type, a multi-line message,
non-finite logits, a hang (in-process watchdog; a stuck native call is killed by the parent) or a
crash (cases run in batches in worker processes, so a segfault is counted, not fatal).
Findings are saved under OUT/findings as the mutated file plus a line in findings.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEED_FILES = [(p, t) for p in ("tiny-v3", "tiny-v2") for t in ("q8_0", "q4_0", "f16")]
PREFIX = "@@fuzz "  # marks the worker's protocol lines on stdout
SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
# Boundary values for integer fields (masked to the field's width).
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 13, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1 << 15, (1 << 16) - 1,
               1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1,
               1 << 63, (1 << 64) - 1]  # fmt: skip
FLOAT_BITS = {4: [0x7FC00000, 0x7F800000, 0xFF800000, 0x00000001, 0x80000000],
              8: [0x7FF8000000000000, 0x7FF0000000000000, 0xFFF0000000000000, 1]}  # fmt: skip
SAME_SIZE_TYPES = {1: [0, 1, 7], 2: [2, 3], 4: [4, 5, 6], 8: [10, 11, 12]}


# --- the seed's layout -------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    offset: int
    size: int  # bytes, little-endian unsigned
    kind: str  # version count strlen kvtype value arrtype arrlen ndims dim ttype toffset
    label: str


class _Walker:
    """Records where every header field of a *valid* file lies (no checks: seeds are ours)."""

    def __init__(self, raw: bytes):
        self.raw, self.pos, self.fields = raw, 4, []

    def field(self, size: int, kind: str, label: str) -> int:
        self.fields.append(Field(self.pos, size, kind, label))
        self.pos += size
        return int.from_bytes(self.raw[self.pos - size : self.pos], "little")

    def string(self, label: str, record: bool = True) -> str:
        n = self.field(8, "strlen", label) if record else self._skip(8)
        self.pos += n
        return self.raw[self.pos - n : self.pos].decode()

    def _skip(self, size: int) -> int:
        self.pos += size
        return int.from_bytes(self.raw[self.pos - size : self.pos], "little")

    def value(self, vtype: int, key: str) -> None:
        if vtype == STRING:
            self.string(f"length of {key}")
        elif vtype == ARRAY:
            etype = self.field(4, "arrtype", f"element type of {key}")
            count = self.field(8, "arrlen", f"length of {key}")
            for i in range(count):  # record the first two elements only: arrays are long
                if etype == STRING:
                    self.string(f"element {i} of {key}", record=i < 2)
                elif i < 2:
                    self.field(SCALAR_SIZE[etype], "value", f"element {i} of {key}")
                else:
                    self.pos += SCALAR_SIZE[etype]
        else:
            self.field(SCALAR_SIZE[vtype], "value", key)

    def walk(self) -> int:
        self.field(4, "version", "version")
        n_tensors = self.field(8, "count", "tensor count")
        n_kv = self.field(8, "count", "metadata count")
        for _ in range(n_kv):
            key = self.string("key length")
            self.value(self.field(4, "kvtype", f"type of {key}"), key)
        for _ in range(n_tensors):
            name = self.string("tensor name length")
            for _ in range(self.field(4, "ndims", f"n_dims of {name}")):
                self.field(8, "dim", f"dim of {name}")
            self.field(4, "ttype", f"type of {name}")
            self.field(8, "toffset", f"offset of {name}")
        return self.pos


@dataclass
class Seed:
    name: str
    raw: bytes
    fields: list[Field]
    header_end: int
    by_kind: dict[str, list[Field]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> "Seed":
        raw = path.read_bytes()
        w = _Walker(raw)
        end = w.walk()
        by_kind: dict[str, list[Field]] = {}
        for f in w.fields:
            by_kind.setdefault(f.kind, []).append(f)
        return cls(path.name, raw, w.fields, end, by_kind)


# --- mutations: plain tuples (op, a, b), so hypothesis can draw them as well -------------------


def apply(seed: Seed, mutations) -> bytes:
    out = bytearray(seed.raw)
    for op, a, b in mutations:
        n = len(out)
        if op == "flip" and n:
            out[a % n] ^= 1 << (b % 8)
        elif op == "run" and n:
            pos = a % n
            out[pos : pos + len(b)] = b[: n - pos]
        elif op == "insert":
            out[a % (n + 1) : a % (n + 1)] = b
        elif op == "delete" and n:
            del out[a % n : a % n + b]
        elif op == "truncate":
            del out[a % (n + 1) :]
        elif op == "field":
            f = seed.fields[a % len(seed.fields)]
            if f.offset + f.size <= n:
                out[f.offset : f.offset + f.size] = (b % (1 << (8 * f.size))).to_bytes(f.size, "little")
    return bytes(out)


def _position(rng: random.Random, seed: Seed) -> int:
    """Mostly inside the header, where the structure is; sometimes in the tensor data."""
    return rng.randrange(seed.header_end) if rng.random() < 0.85 else rng.randrange(len(seed.raw))


def _field_value(rng: random.Random, seed: Seed, f: Field) -> int:
    old = int.from_bytes(seed.raw[f.offset : f.offset + f.size], "little")
    if f.kind == "kvtype" and rng.random() < 0.5:
        return rng.choice(SAME_SIZE_TYPES.get(SCALAR_SIZE.get(old, 0), list(range(13))))  # retype in place
    if f.kind in ("kvtype", "arrtype") and rng.random() < 0.5:
        return rng.randrange(14)
    if f.kind == "ttype" and rng.random() < 0.5:
        return rng.randrange(42)
    if f.kind == "value" and f.size in FLOAT_BITS and rng.random() < 0.2:
        return rng.choice(FLOAT_BITS[f.size])
    return rng.choice(INTERESTING + [old - 1, old + 1, old * 2, old // 2, old + 8, old - 8, rng.getrandbits(64)])


def _one_mutation(rng: random.Random, seed: Seed):
    op = rng.choices(["field", "value", "flip", "run", "insert", "delete", "truncate"], [30, 20, 20, 10, 6, 6, 8])[0]
    if op in ("field", "value"):
        # "value": a metadata value or its type in place, so the file still parses and the config
        # and weight checks are reached. "field": any kind first, as string lengths would swamp the rest.
        kind = rng.choice(["value", "kvtype"] if op == "value" else sorted(seed.by_kind))
        f = rng.choice(seed.by_kind[kind])
        return "field", seed.fields.index(f), _field_value(rng, seed, f)
    if op == "flip":
        return op, _position(rng, seed), rng.randrange(8)
    if op in ("run", "insert"):
        length = rng.choice([1, 2, 4, 8, rng.randrange(1, 64)])
        fill = rng.choice([b"\x00", b"\xff", b"\x7f", bytes([rng.randrange(256)])])
        data = fill * length if rng.random() < 0.7 else rng.randbytes(length)
        return op, _position(rng, seed), data
    if op == "delete":
        return op, _position(rng, seed), rng.choice([1, 2, 4, 8, rng.randrange(1, 64)])
    return op, _position(rng, seed), 0


def case(seeds: list[Seed], master: int, i: int) -> tuple[Seed, list]:
    """The mutations of case i: a pure function of (master seed, i), so any case can be replayed."""
    rng = random.Random(master * 1_000_003 + i)
    seed = seeds[rng.randrange(len(seeds))]
    return seed, [_one_mutation(rng, seed) for _ in range(rng.choice([1, 1, 1, 2, 3]))]


# --- one case, in-process ----------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the watchdog alarm; a BaseException so no `except Exception` in the code swallows it."""


def _alarm(signum, frame):
    raise Hang


def run_case(path: Path, timeout: float) -> tuple[str, str]:
    """-> (outcome, message): "loaded", "error" (one of ours, well formed), "hang" or "finding"."""
    from r1cpu.runtime.config import ConfigError
    from r1cpu.runtime.gguf_reader import GGUFError
    from r1cpu.runtime.guards import NumericalError

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return _load_and_run(path)
    except Hang:
        return "hang", f"no answer within {timeout:g} s"
    except (GGUFError, ConfigError, NumericalError) as e:
        msg = str(e)
        if "\n" in msg or str(path) not in msg:
            return "finding", f"badly formed {type(e).__name__} (not one line naming the file): {msg!r:.300}"
        return "error", msg
    except Exception as e:  # noqa: BLE001 -- every other exception is what the fuzzer looks for
        where = traceback.extract_tb(e.__traceback__)[-1]
        return "finding", f"{type(e).__name__}: {str(e)[:300]!r} at {Path(where.filename).name}:{where.lineno}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _load_and_run(path: Path) -> tuple[str, str]:
    import r1cpu

    model = r1cpu.load(path, threads=1)
    n = model.config.n_vocab
    logits = model.logits([1 % n, 2 % n])
    if logits.shape != (2, n) or not np.isfinite(logits).all():
        return "finding", f"forward returned {logits.shape} logits, finite: {bool(np.isfinite(logits).all())}"
    return "loaded", ""


# --- worker process: a batch of cases, one protocol line before and after each -----------------


def worker(seed_paths: list[Path], master: int, start: int, count: int, timeout: float) -> None:
    seeds = [Seed.read(p) for p in seed_paths]
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    path = scratch / "case.gguf"
    try:
        for i in range(start, start + count):
            seed, mutations = case(seeds, master, i)
            path.write_bytes(apply(seed, mutations))
            _say("begin", i)
            t0 = time.perf_counter()
            outcome, message = run_case(path, timeout)
            _say("end", i, outcome, message.replace(str(path), "FILE"), time.perf_counter() - t0)
    finally:
        path.unlink(missing_ok=True)
        scratch.rmdir()


def _say(*parts) -> None:
    sys.stdout.write(PREFIX + json.dumps(parts) + "\n")
    sys.stdout.flush()


# --- parent: seeds, batches in worker processes, tally, report ---------------------------------

STARTUP_S = 300.0  # a fresh worker imports numba and loads its cached kernels
BETWEEN_S = 60.0  # from one case's end to the next one's begin (writing a file)
GRACE_S = 15.0  # beyond the in-process watchdog, for a case stuck in native code


@dataclass
class Tally:
    out: Path
    seeds: list[Seed]
    master: int
    tried: int = 0
    outcomes: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)  # normalised error message -> count
    findings: list = field(default_factory=list)  # (case, outcome, message)
    slowest: tuple[float, int] = (0.0, -1)  # seconds, case

    def record(self, i: int, outcome: str, message: str, seconds: float = 0.0) -> None:
        self.tried += 1
        self.outcomes[outcome] += 1
        self.slowest = max(self.slowest, (seconds, i))
        if outcome == "error":
            self.messages[normalise(message)] += 1
        elif outcome != "loaded":
            self.findings.append((i, outcome, message))
            self._save(i, outcome, message)

    def _save(self, i: int, outcome: str, message: str) -> None:
        folder = self.out / "findings"
        folder.mkdir(parents=True, exist_ok=True)
        seed, mutations = case(self.seeds, self.master, i)
        (folder / f"{outcome}-{i}.gguf").write_bytes(apply(seed, mutations))
        with open(folder / "findings.txt", "a") as f:
            f.write(f"case {i} {outcome} seed={seed.name} mutations={mutations!r:.300}: {message}\n")


def normalise(message: str) -> str:
    """Numbers and quoted values vary per case; what is left is the kind of error and where."""
    message = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "'S'", message)
    return re.sub(r"(?<![\w-])(?:0x[0-9a-fA-F]+|-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)", "N", message)


def make_seeds(folder: Path) -> list[Path]:
    """The valid files every case starts from, built once and kept in `folder`."""
    from r1cpu.runtime.convert import convert
    from r1cpu.tools.make_checkpoint import make_checkpoint

    paths = []
    for preset, qtype in SEED_FILES:
        path = folder / f"{preset}.{qtype}.gguf"
        if not path.exists():
            ckpt = folder / preset
            if not (ckpt / "config.json").exists():
                make_checkpoint(preset, ckpt)
            convert(ckpt, path, qtype)
        outcome, message = run_case(path, 600.0)
        if outcome != "loaded":
            raise SystemExit(f"seed {path} does not load cleanly: {message}")
        paths.append(path)
    return paths


def run_batch(args, seed_paths: list[Path], start: int, count: int, tally: Tally) -> int:
    """Run cases [start, start+count) in one worker; returns the first case not yet run."""
    cmd = [sys.executable, "-m", "r1cpu.tools.fuzz_gguf", "--worker", "--seed", str(args.seed),
           "--start", str(start), "--count", str(count), "--timeout", str(args.timeout), *map(str, seed_paths)]  # fmt: skip
    with open(args.out / "worker.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
    current, limit = None, STARTUP_S
    while True:
        try:
            line = lines.get(timeout=limit)
        except queue.Empty:
            proc.kill()
            proc.wait()
            if current is None:
                raise SystemExit(f"worker for cases {start}.. stalled outside any case") from None
            tally.record(current, "hang", f"killed after {limit:g} s without an answer (stuck outside Python)")
            return current + 1
        if line is None:
            return _worker_ended(proc.wait(), current, start + count, tally)
        if line.startswith(PREFIX):
            what, i, *rest = json.loads(line[len(PREFIX) :])
            if what == "begin":
                current, limit = i, args.timeout + GRACE_S
            else:
                tally.record(i, *rest)
                current, limit = None, BETWEEN_S


def _worker_ended(rc: int, current: int | None, end: int, tally: Tally) -> int:
    if current is not None:  # it died inside a case: a crash (segfault, abort, out of memory kill)
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        tally.record(current, "crash", f"worker died with {how}")
        return current + 1
    if rc:
        raise SystemExit(f"worker failed between cases (exit code {rc}); see worker.log")
    return end


def report(tally: Tally, seconds: float) -> str:
    o = tally.outcomes
    lines = [
        f"files tried: {tally.tried} in {seconds:.0f} s ({tally.tried / max(seconds, 1e-9):.1f}/s)",
        f"loaded and ran: {o['loaded']}, clean errors: {o['error']}, findings: {o['finding']}, "
        f"hangs: {o['hang']}, crashes: {o['crash']}",
        f"slowest case: {tally.slowest[0]:.2f} s (case {tally.slowest[1]})",
        f"distinct error messages (normalised): {len(tally.messages)}",
    ]
    lines += [f"  {n:7d}  {m}" for m, n in tally.messages.most_common(25)]
    lines += [f"finding: case {i} {kind}: {msg}" for i, kind, msg in tally.findings[:50]]
    return "\n".join(lines)


def fuzz(args) -> Tally:
    args.out.mkdir(parents=True, exist_ok=True)
    seed_paths = make_seeds(args.out)
    tally = Tally(args.out, [Seed.read(p) for p in seed_paths], args.seed)
    t0, i = time.perf_counter(), 0
    while i < args.cases:
        i = run_batch(args, seed_paths, i, min(args.batch, args.cases - i), tally)
        rate = tally.tried / (time.perf_counter() - t0)
        print(f"{tally.tried}/{args.cases} cases, {rate:.1f}/s, {dict(tally.outcomes)}", flush=True)
    text = report(tally, time.perf_counter() - t0)
    summary = {"tried": tally.tried, "outcomes": dict(tally.outcomes), "slowest": tally.slowest,
               "messages": dict(tally.messages.most_common()), "findings": tally.findings}  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(summary, indent=1))
    (args.out / "report.txt").write_text(text + "\n")
    print(text)
    return tally


def replay(args) -> None:
    """Rebuild case --replay N into OUT/replay.gguf and run it here, with a full traceback on failure."""
    seeds = [Seed.read(p) for p in make_seeds(args.out)]
    seed, mutations = case(seeds, args.seed, args.replay)
    path = args.out / "replay.gguf"
    path.write_bytes(apply(seed, mutations))
    print(f"case {args.replay}: seed {seed.name}, mutations {mutations!r:.500}")
    print(run_case(path, args.timeout))
    _load_and_run(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0, help="master seed: case i is a function of (seed, i)")
    ap.add_argument("--batch", type=int, default=2000, help="cases per worker process")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a case counts as a hang")
    ap.add_argument("--out", type=Path, default=Path("out/fuzz"))
    ap.add_argument("--replay", type=int, default=None, help="rebuild and run one case")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("seed_files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.seed_files, args.seed, args.start, args.count, args.timeout)
    elif args.replay is not None:
        replay(args)
    else:
        fuzz(args)


if __name__ == "__main__":
    main()
