"""--max-ram: the expert cache gives the same logits as the plain map, honours its budget, reads
only routed (or predicted) experts with preadv, and never reads a routed expert through the map."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from r1cpu.quant.tensor import Tensor
from r1cpu.runtime import expert_cache
from r1cpu.runtime.convert import convert
from r1cpu.runtime.expert_cache import EXPERT_TENSOR, SlotTable, simulate, split_budget
from r1cpu.runtime.memory import parse_size
from r1cpu.runtime.model import Model, load
from r1cpu.runtime.weights import MoEWeights

TOKENS = [5, 17, 300, 42, 99, 7, 512, 64, 3, 250, 11, 900]  # prefill the first 8, decode the rest


@pytest.fixture(scope="module")
def gguf(checkpoints, tmp_path_factory):
    """out_type -> tiny-v3 GGUF (8 experts, top-2, MoE layers 1 and 2)."""
    root, done = tmp_path_factory.mktemp("expert-cache"), {}

    def get(out_type: str = "f32"):
        if out_type not in done:
            done[out_type] = root / f"tiny-v3.{out_type}.gguf"
            convert(checkpoints["tiny-v3"], done[out_type], out_type)
        return done[out_type]

    return get


def run(model: Model) -> np.ndarray:
    """Logits of TOKENS: one prefill batch, then one decode per token."""
    s = model.session()
    rows = [s.prefill(TOKENS[:8])] + [s.decode(t)[None] for t in TOKENS[8:]]
    return np.concatenate(rows)


def budget_for(path, slots: int) -> int:
    m = load(path)
    b = split_budget(m.gguf, m.config, m.weights, 1 << 40)
    return b.resident + slots * b.expert_bytes


def routed(model: Model) -> dict[int, set[int]]:
    """MoE layer -> experts TOKENS route to (the same batches as run())."""
    out = {i: set() for i in range(model.config.n_layer) if model.config.is_moe_layer(i)}
    s = model.session()
    for batch in [TOKENS[:8]] + [[t] for t in TOKENS[8:]]:
        s.prefill(batch)
        for i in out:
            out[i] |= set(model.expert_stats.last_idx[i].ravel().tolist())
    return out


@pytest.mark.parametrize("out_type", ["f32", "q8_0"])
@pytest.mark.parametrize("slots,prefetch", [(2, False), (2, True), (5, True), (8, False)])
def test_cache_matches_the_map(gguf, out_type, slots, prefetch):
    path = gguf(out_type)
    ref = run(load(path))
    model = load(path, max_ram=budget_for(path, slots), prefetch=prefetch)
    assert model.expert_cache.budget.n_slots == slots
    np.testing.assert_array_equal(run(model), ref)  # same bytes, same kernels: bit for bit
    t = model.expert_cache.totals()
    assert t["hits"] + t["misses"] > 0 and t["disk_bytes"] > 0
    assert (t["predicted"] > 0) == prefetch  # guesses are made on the model's thread, loads in the background
    assert prefetch or t["prefetch_loads"] == 0


def test_budget_is_honoured(gguf):
    path = gguf("f32")
    model = load(path, max_ram=budget_for(path, 3) + 1000)
    cache, g = model.expert_cache, model.gguf
    resident = sum(t.nbytes for name, t in g.tensors.items() if not EXPERT_TENSOR.search(name))
    pools = sum(p.nbytes for lc in cache.layers.values() for p in lc.pools)
    assert cache.budget.resident == resident
    assert 0 < pools <= cache.budget.max_ram - resident
    run(model)
    assert sum(p.nbytes for lc in cache.layers.values() for p in lc.pools) == pools  # nothing grows


def test_too_small_budget_says_how_much_is_needed(gguf):
    path = gguf("f32")
    need = budget_for(path, 2)  # top-2: two slots per layer is the least that runs
    with pytest.raises(ValueError, match=r"too small .* use at least") as err:
        load(path, max_ram=need - 1)
    assert "\n" not in str(err.value)
    load(path, max_ram=need)


def test_reads_only_routed_experts_with_preadv(gguf, monkeypatch):
    path = gguf("q8_0")
    want = routed(load(path))
    model = load(path, max_ram=budget_for(path, 3), prefetch=False)
    spans = {i: lc.spans for i, lc in model.expert_cache.layers.items()}
    reads = []
    real = expert_cache._preadv
    def watched(fd, bufs, offset):
        reads.append((offset, sum(b.nbytes for b in bufs)))
        return real(fd, bufs, offset)

    monkeypatch.setattr(expert_cache, "_preadv", watched)
    run(model)

    def owner(offset, n):  # (layer, expert) whose slice [offset, offset + n) is, or None
        for i, layer_spans in spans.items():
            for base, stride, size in layer_spans:
                e, rest = divmod(offset - base, stride)
                if 0 <= e < model.config.n_expert and rest + n <= size:
                    return i, e
        return None

    got = {i: set() for i in want}
    for off, n in reads:
        i, e = owner(off, n)
        got[i].add(e)
    assert got == want


def test_poisoned_unrouted_experts_stay_unread(gguf, tmp_path):
    """NaN over every expert TOKENS never route to: the outputs stay finite and unchanged, with
    and without a budget (with prefetch, which may read but never uses a wrong guess)."""
    clean = gguf("f32")
    ref_model = load(clean)
    ref, want = run(ref_model), routed(ref_model)
    assert any(len(v) < ref_model.config.n_expert for v in want.values())
    poisoned = tmp_path / "poisoned.gguf"
    shutil.copy(clean, poisoned)
    base = ref_model.gguf.mmap.__array_interface__["data"][0]
    with open(poisoned, "r+b") as f:
        for i, used in want.items():
            w = ref_model.weights.layers[i].ffn
            for t in (w.gate_exps, w.up_exps, w.down_exps):
                for e in set(range(t.shape[0])) - used:
                    f.seek(t.data[e].__array_interface__["data"][0] - base)
                    f.write(np.full(t.data[e].size, np.nan, dtype=np.float32).tobytes())
    for model in (load(poisoned), load(poisoned, max_ram=budget_for(poisoned, 3))):
        np.testing.assert_array_equal(run(model), ref)


def test_budget_never_reads_experts_through_the_map(gguf):
    """With a budget, the stacked expert tensors (views of the map) are replaced by NaN: the model
    must not notice, since its experts come from the cache's pools."""
    path = gguf("f32")
    ref = run(load(path))
    model = load(path, max_ram=budget_for(path, 3))

    def nan_like(t: Tensor) -> Tensor:
        return Tensor(t.name, t.qtype, t.shape, np.full(t.data.shape, np.nan, dtype=t.data.dtype))

    def blinded(w: MoEWeights) -> MoEWeights:
        return dataclasses.replace(w, **{k: nan_like(getattr(w, k)) for k in ("gate_exps", "up_exps", "down_exps")})

    layers = [dataclasses.replace(lw, ffn=blinded(lw.ffn)) if isinstance(lw.ffn, MoEWeights) else lw
              for lw in model.weights.layers]  # fmt: skip
    blind = Model(model.gguf, model.config, dataclasses.replace(model.weights, layers=layers))
    blind.expert_cache, blind.prefetcher = model.expert_cache, model.prefetcher
    np.testing.assert_array_equal(run(blind), ref)


def test_expert_stats_under_a_budget_equal_routing(gguf):
    path = gguf("q8_0")
    plain, cached = load(path), load(path, max_ram=budget_for(path, 2))
    run(plain), run(cached)
    np.testing.assert_array_equal(cached.expert_stats.bytes_read, plain.expert_stats.bytes_read)
    np.testing.assert_array_equal(cached.expert_stats.tokens, plain.expert_stats.tokens)


def test_slot_table_policies():
    def hot_then_scan(policy):
        t = SlotTable(n_expert=6, n_slots=2, half_life=expert_cache.POLICIES[policy])
        for _ in range(5):
            t.admit(np.array([0]))  # expert 0 is hot
        t.admit(np.array([1]))
        t.admit(np.array([2]))  # a miss with slots {0, 1} full
        return set(t.holder.tolist())

    assert hot_then_scan("lru") == {1, 2}  # evicts the least recent: the hot expert 0
    assert hot_then_scan("lfu") == {0, 2}  # evicts the least used: 1
    assert hot_then_scan("lrfu") == {0, 2}


def test_admit_never_evicts_what_the_call_needs():
    t = SlotTable(n_expert=8, n_slots=3, half_life=0.0)
    t.admit(np.array([0, 1, 2]))
    hit, loads = t.admit(np.array([2, 5, 6]))
    assert hit.tolist() == [True, False, False]
    assert sorted(e for e, _ in loads) == [5, 6]
    assert set(t.holder.tolist()) == {2, 5, 6}


def test_simulate_counts_like_the_live_cache(gguf):
    path = gguf("q8_0")
    model = load(path, max_ram=budget_for(path, 3), prefetch=False)
    trace = {i: [] for i in model.expert_cache.layers}
    s = model.session()
    for batch in [TOKENS[:8]] + [[t] for t in TOKENS[8:]]:
        s.prefill(batch)
        for i in trace:
            trace[i].append(model.expert_stats.last_idx[i].ravel())
    hits = sum(simulate(tr, model.config.n_expert, 3, "lru")[0] for tr in trace.values())
    assert hits == model.expert_cache.totals()["hits"]


@pytest.mark.parametrize("text,expected", [("1.5G", 3 << 29), ("1GB", 10**9), ("512MiB", 512 << 20), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "1.5Q", "-1G", "G"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_generate_and_chat_report_the_cache(gguf):
    from click.testing import CliRunner

    from r1cpu.runtime.cli import main

    path = gguf("q8_0")
    budget = str(budget_for(path, 3))
    args = ["generate", str(path), "-p", "Hi", "-n", "3", "--temp", "0", "--json", "--max-ram", budget]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["expert_cache"]
    assert report["hits"] + report["misses"] > 0 and report["disk_bytes"] > 0
    r = CliRunner().invoke(main, ["chat", str(path), "-n", "3", "--max-ram", budget], input="Hi there\n/stats\n")
    assert r.exit_code == 0, r.output
    assert "last answer experts:" in r.output and "since load  experts:" in r.output
    r = CliRunner().invoke(main, ["generate", str(path), "-p", "Hi", "--max-ram", "100K"])
    assert r.exit_code == 1 and "is too small" in r.output and "use at least" in r.output


def test_bench_reports_the_cache(gguf):
    from r1cpu.runtime import bench

    path = gguf("q8_0")
    res = bench.run(str(path), p=8, n=4, reps=1, threads=1, bandwidth_gib=0.05, max_ram=budget_for(path, 3))
    c = res["expert_cache"]
    assert c["slots_per_layer"] == 3 and c["tg_counters"]["tokens"] == 4  # the timed tg run only
    assert 0 <= c["tg_hit_rate"] <= 1 and c["tg_disk_bytes_per_token"] > 0
    assert "--max-ram" in bench.format_table(res)


def test_failed_read_frees_its_slot(gguf, monkeypatch):
    path = gguf("q8_0")
    model = load(path, max_ram=budget_for(path, 3), prefetch=False)
    layer, lc = next(iter(model.expert_cache.layers.items()))

    def broken(fd, bufs, offset):
        raise OSError("disk gone")

    monkeypatch.setattr(expert_cache, "_preadv", broken)
    with pytest.raises(OSError, match="disk gone"):
        lc.prefetch(np.array([4]), lc.expect(np.array([4])))
    assert lc.table.slot_of[4] == -1 and not lc.loading  # nobody will be handed a half-read slot
    monkeypatch.undo()
    gate, up, down, slots = lc.resolve(np.array([4, 5]))
    w = model.weights.layers[layer].ffn
    for pool, t in ((gate, w.gate_exps), (up, w.up_exps), (down, w.down_exps)):
        np.testing.assert_array_equal(pool[slots], t.data[[4, 5]])  # the file's bytes, read afresh
