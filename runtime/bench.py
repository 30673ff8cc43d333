"""`r1cpu bench`: prompt (pp) and generation (tg) speed like llama-bench, with what bounds them.

Measured in the same run: the machine's read bandwidth (a numba prange sum over 1 GiB), the bytes a
generated token touches (every tensor read per token, one embedding row, the routed experts the
router actually chose as ExpertStats counted them, and the latent cache), and tg against the roofline
bandwidth / bytes. With --llama-cpp, llama.cpp (llama-cpp-python) runs the same file with the same
threads in a subprocess, so its threads never compete with ours; the two alternate run by run, which
keeps a changing machine load from favouring either.

Each test is one warm-up run and then `reps` timed runs on a fresh context: pp evaluates p random
tokens at once (logits of the last only, as llama.cpp's logits_all=False), tg decodes n random tokens
one at a time from position 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import click
import numpy as np

from r1cpu.runtime.memory import read_bandwidth

EXPERT_TENSOR = re.compile(r"\.ffn_(gate|up|down|gate_up)_exps\.")
GB = 1e9


@dataclass
class Speed:
    """tokens/s of each timed run, and the cores it kept busy (process CPU time / wall time)."""

    runs: list[float] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.runs)) if self.runs else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.runs, ddof=1)) if len(self.runs) > 1 else 0.0


class R1cpu:
    """Our runtime on one file; counts the bytes each decoded token touches."""

    name = "r1cpu"

    def __init__(self, path: str, threads: int | None, n_ctx: int, max_ram: str | None = None):
        from r1cpu.runtime.model import load

        t = time.perf_counter()
        self.model = load(path, threads, max_ram=max_ram)
        self.load_s = time.perf_counter() - t
        self.n_ctx = n_ctx
        self.routed_bytes: list[float] = []  # per tg run: routed expert bytes per token
        self.tg_cache: dict[str, float] = {}  # --max-ram: expert-cache counters summed over tg runs, and tokens

    def pp(self, tokens: list[int]) -> tuple[float, float]:
        session = self.model.session(self.n_ctx)
        t, c = time.perf_counter(), time.process_time()
        session.prefill(tokens, last_only=True)
        return time.perf_counter() - t, time.process_time() - c

    def tg(self, tokens: list[int]) -> tuple[float, float]:
        session, stats = self.model.session(self.n_ctx), self.model.expert_stats
        before, cache = stats.bytes_read.sum(), self.model.expert_cache
        counts = cache.totals() if cache is not None else {}
        t, c = time.perf_counter(), time.process_time()
        for token in tokens:
            session.decode(token)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        self.routed_bytes.append((stats.bytes_read.sum() - before) / len(tokens))
        if cache is not None:
            after = cache.totals() | {"tokens": 0}
            self.tg_cache = {k: self.tg_cache.get(k, 0) + after[k] - counts.get(k, 0) for k in after}
            self.tg_cache["tokens"] += len(tokens)
        return elapsed, cpu

    def cache_report(self) -> dict:
        """--max-ram: budget and slots, and per generated token of the timed runs: hit rate, misses,
        disk bytes, prefetch accuracy; the process's peak RSS."""
        from r1cpu.runtime.memory import process_memory

        c, b = self.tg_cache, self.model.expert_cache.budget
        n, asked = max(c.get("tokens", 0), 1), max(c.get("hits", 0) + c.get("misses", 0), 1)
        return {"max_ram": b.max_ram, "resident_bytes": b.resident, "cache_bytes": b.cache_bytes,
                "slots_per_layer": b.n_slots, "n_expert": b.n_expert, "policy": self.model.expert_cache.policy,
                "tg_hit_rate": c.get("hits", 0) / asked, "tg_misses_per_token": c.get("misses", 0) / n,
                "tg_disk_bytes_per_token": c.get("disk_bytes", 0) / n,
                "tg_prediction_right": c.get("predicted_right", 0) / max(c.get("predicted", 0), 1),
                "tg_counters": c, "peak_rss": process_memory()["peak_rss"]}  # fmt: skip

    def bytes_per_token(self, n_tokens: int) -> dict[str, float]:
        """Bytes one generated token reads, by part (weights as stored in the file)."""
        cfg, tensors = self.model.config, self.model.gguf.tensors
        dense = sum(t.nbytes for name, t in tensors.items() if not EXPERT_TENSOR.search(name) and name != "token_embd.weight")
        embd = tensors["token_embd.weight"].nbytes
        dense += embd if "output.weight" not in tensors else embd // cfg.n_vocab  # tied: the whole table is the output
        mean_len = (n_tokens + 1) / 2  # cache rows attended, averaged over the positions 0..n-1
        kv = mean_len * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * cfg.n_layer
        routed = float(np.mean(self.routed_bytes)) if self.routed_bytes else 0.0
        return {"dense": float(dense), "routed_experts": routed, "kv_cache": kv, "total": dense + routed + kv}


class LlamaCpp:
    """llama.cpp through llama-cpp-python, in a worker subprocess driven over a pipe."""

    name = "llama.cpp"

    def __init__(self, path: str, threads: int, n_ctx: int):
        cmd = [sys.executable, "-m", "r1cpu.runtime.bench", path, str(threads), str(n_ctx)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, op: str, tokens: list[int]) -> tuple[float, float]:
        self.proc.stdin.write(json.dumps({"op": op, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        return reply["s"], reply["cpu_s"]

    def pp(self, tokens: list[int]) -> tuple[float, float]:
        return self._ask("pp", tokens)

    def tg(self, tokens: list[int]) -> tuple[float, float]:
        return self._ask("tg", tokens)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _worker(path: str, threads: int, n_ctx: int) -> None:
    """The llama.cpp side: load, then answer {"op", "tokens"} lines with {"s", "cpu_s"} seconds."""
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                logits_all=False, verbose=False)  # fmt: skip
    print(json.dumps({"load_s": time.perf_counter() - t}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm.reset()
        t, c = time.perf_counter(), time.process_time()
        if req["op"] == "pp":
            llm.eval(req["tokens"])
        else:
            for token in req["tokens"]:
                llm.eval([token])
        print(json.dumps({"s": time.perf_counter() - t, "cpu_s": time.process_time() - c}), flush=True)


def _jit_counts() -> tuple[int, int]:
    """(signatures loaded from numba's disk cache, signatures compiled) over r1cpu's kernels."""
    from numba.core.registry import CPUDispatcher

    hits = misses = 0
    for name, mod in list(sys.modules.items()):
        if name.startswith("r1cpu.") and mod is not None:
            for obj in vars(mod).values():
                if isinstance(obj, CPUDispatcher):
                    hits += sum(obj.stats.cache_hits.values())
                    misses += sum(obj.stats.cache_misses.values())
    return hits, misses


def run(path: str, p: int = 512, n: int = 128, reps: int = 5, threads: int | None = None, llama_cpp: bool = False,
        progress=None, bandwidth_gib: float = 1.0, max_ram: str | None = None) -> dict:  # fmt: skip
    """Everything `r1cpu bench` reports, as a dict (see format_table)."""
    from r1cpu.kernels_numba.threads import get_threads

    say = progress or (lambda msg: None)
    load_before = os.getloadavg()
    start = time.perf_counter()
    ours = R1cpu(path, threads, p + n + 8, max_ram)
    threads = get_threads()
    vocab = ours.model.config.n_vocab
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, p).tolist()
    gen = rng.integers(0, vocab, n).tolist()
    say("warm-up")  # page cache, JIT, buffers: untimed, but it is our time to first token
    warm = {"pp": ours.pp(prompt)[0]}
    warm["first_token_s"] = time.perf_counter() - start
    warm["jit_cache_loaded"], warm["jit_compiled"] = _jit_counts()
    warm["tg"] = ours.tg(gen)[0]
    ours.routed_bytes.clear()
    ours.tg_cache.clear()
    runners = [ours] + ([LlamaCpp(path, threads, p + n + 8)] if llama_cpp else [])
    speeds = {(r.name, test): Speed() for test in ("pp", "tg") for r in runners}
    try:
        for r in runners[1:]:
            r.pp(prompt), r.tg(gen)
        for rep in range(1, reps + 1):
            say(f"run {rep}/{reps}")
            for test, tokens in (("pp", prompt), ("tg", gen)):
                for r in runners:
                    wall, cpu = getattr(r, test)(tokens)
                    speeds[r.name, test].runs.append(len(tokens) / wall)
                    speeds[r.name, test].cores.append(cpu / wall)
    finally:
        for r in runners[1:]:
            r.close()
    say("bandwidth")
    bandwidth = read_bandwidth(bandwidth_gib)
    nbytes = ours.bytes_per_token(n)
    roof = bandwidth * GB / nbytes["total"]
    result = {
        "model": os.path.basename(path),
        "size_bytes": os.path.getsize(path),
        "types": _type_counts(ours.model),
        "threads": threads, "p": p, "n": n, "reps": reps,
        "speed": {f"{name} {test}": {"mean": s.mean, "std": s.std, "runs": s.runs, "cores_busy": s.cores}
                  for (name, test), s in speeds.items()},
        "read_bandwidth_GBps": bandwidth, "bandwidth_gib": bandwidth_gib,
        "bytes_per_token": nbytes,
        "roofline_tg": roof,
        "startup": {"load_s": ours.load_s, "first_pp_s": warm["pp"], "steady_pp_s": p / speeds["r1cpu", "pp"].mean,
                    "first_tg_s": warm["tg"], "time_to_first_token_s": warm["first_token_s"],
                    "jit_cache_loaded": warm["jit_cache_loaded"], "jit_compiled": warm["jit_compiled"]},
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }  # fmt: skip
    if llama_cpp:
        result["startup"]["llama_cpp_load_s"] = runners[1].load_s
    if ours.model.expert_cache is not None:
        result["expert_cache"] = ours.cache_report()
    return result


def _type_counts(model) -> dict[str, int]:
    from r1cpu.quant.registry import GGMLType

    counts: dict[str, int] = {}
    for t in model.gguf.tensors.values():
        counts[GGMLType(t.qtype).name] = counts.get(GGMLType(t.qtype).name, 0) + 1
    return counts


def format_table(res: dict) -> str:
    """llama-bench's markdown table (plus the cores each run kept busy: CPU time / wall time, which
    shows a shared machine's share), then ratios, bandwidth, bytes per token, roofline and start-up."""
    p, n, th = res["p"], res["n"], res["threads"]
    main_type = max((k for k in res["types"] if k != "F32"), key=res["types"].get, default="F32")
    size = f"{res['size_bytes'] / 2**30:.2f} GiB"
    lines = ["| runtime | model | size | threads | test | t/s | cores busy |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, s in res["speed"].items():
        name, test = key.split()
        label = f"pp{p}" if test == "pp" else f"tg{n}"
        busy = float(np.mean(s["cores_busy"]))
        lines.append(f"| {name} | {res['model']} ({main_type}) | {size} | {th} | {label} | {s['mean']:.2f} ± {s['std']:.2f} | {busy:.2f} |")
    out = ["\n".join(lines), ""]
    sp = res["speed"]
    if "llama.cpp pp" in sp:
        ratio = lambda t: sp[f"r1cpu {t}"]["mean"] / sp[f"llama.cpp {t}"]["mean"]  # noqa: E731
        out.append(f"r1cpu / llama.cpp: pp{p} {ratio('pp'):.2f}x, tg{n} {ratio('tg'):.2f}x")
    b, roof = res["bytes_per_token"], res["roofline_tg"]
    out.append(f"read bandwidth (numba prange sum over {res['bandwidth_gib']:g} GiB, {th} threads): {res['read_bandwidth_GBps']:.1f} GB/s")
    out.append(f"bytes per generated token: {b['total'] / 1e6:.1f} MB (every-token tensors {b['dense'] / 1e6:.1f}, "
               f"routed experts {b['routed_experts'] / 1e6:.1f} as counted by ExpertStats, latent cache {b['kv_cache'] / 1e6:.1f})")  # fmt: skip
    frac = "; ".join(f"{key.split()[0]} {s['mean'] / roof:.0%}" for key, s in sp.items() if key.endswith("tg"))
    out.append(f"tg roofline (bandwidth / bytes): {roof:.1f} tok/s; reached: {frac}")
    st = res["startup"]
    out.append(f"start-up: load {st['load_s']:.2f} s, first pp{p} {st['first_pp_s']:.2f} s (steady {st['steady_pp_s']:.2f} s; "
               f"JIT: {st['jit_cache_loaded']} kernels from the disk cache, {st['jit_compiled']} compiled), "
               f"time to first token {st['time_to_first_token_s']:.2f} s, first tg{n} {st['first_tg_s']:.2f} s")  # fmt: skip
    if "expert_cache" in res:
        c = res["expert_cache"]
        out.append(f"--max-ram {c['max_ram'] / 2**30:.2f} GiB ({c['policy']}): {c['slots_per_layer']}/{c['n_expert']} slots "
                   f"per layer; tg: {c['tg_hit_rate']:.0%} hits, {c['tg_misses_per_token']:.1f} misses and "
                   f"{c['tg_disk_bytes_per_token'] / 1e6:.1f} MB from disk per token, prefetch guesses "
                   f"{c['tg_prediction_right']:.0%} right; peak RSS {c['peak_rss'] / 2**30:.2f} GiB")  # fmt: skip
    la = res["load_average"]
    out.append(f"load average (1/5/15 min): before {'/'.join(f'{x:.1f}' for x in la['before'])}, "
               f"after {'/'.join(f'{x:.1f}' for x in la['after'])}")  # fmt: skip
    return "\n".join(out)


@click.command("bench")
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("-p", "n_prompt", type=click.IntRange(1), default=512, show_default=True, help="prompt tokens (pp test)")
@click.option("-n", "n_gen", type=click.IntRange(1), default=128, show_default=True, help="generated tokens (tg test)")
@click.option("-r", "reps", type=click.IntRange(1), default=5, show_default=True, help="timed runs per test")
@click.option("--threads", type=int, default=None, help="compute threads (default: the physical cores)")
@click.option("--json", "as_json", is_flag=True, help="print every figure as JSON instead of the table")
@click.option("--llama-cpp", "llama_cpp", is_flag=True,
              help="also run llama.cpp (llama-cpp-python) on the same file and threads, alternating runs")  # fmt: skip
@click.option("--max-ram", default=None, metavar="SIZE", help="r1cpu's weight budget (experts read on demand)")
def bench_command(model, n_prompt, n_gen, reps, threads, as_json, llama_cpp, max_ram):
    """Prompt and generation speed (like llama-bench), read bandwidth, bytes per token, roofline."""
    if llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        raise click.ClickException("--llama-cpp needs llama-cpp-python (make install-interop)")
    try:
        res = run(model, n_prompt, n_gen, reps, threads, llama_cpp, progress=lambda m: click.echo(m, err=True),
                  max_ram=max_ram)
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(res, indent=2) if as_json else format_table(res))


if __name__ == "__main__":  # the llama.cpp worker: MODEL THREADS N_CTX
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
