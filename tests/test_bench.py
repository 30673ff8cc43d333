"""`r1cpu bench` on a tiny model: what it reports and how it counts bytes (no speed is asserted)."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from r1cpu.runtime import bench
from r1cpu.runtime.cli import main
from r1cpu.runtime.convert import convert


@pytest.fixture(scope="module")
def tiny_q8(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny-v3.q8_0.gguf"
    convert(checkpoints["tiny-v3"], out, "q8_0")
    return out


def test_run_reports_every_figure(tiny_q8):
    res = bench.run(str(tiny_q8), p=8, n=4, reps=2, threads=1, bandwidth_gib=0.05)
    for key in ("r1cpu pp", "r1cpu tg"):
        assert len(res["speed"][key]["runs"]) == 2 and res["speed"][key]["mean"] > 0
    assert res["threads"] == 1 and res["read_bandwidth_GBps"] > 0
    b = res["bytes_per_token"]
    assert b["total"] == pytest.approx(b["dense"] + b["routed_experts"] + b["kv_cache"])
    assert res["roofline_tg"] == pytest.approx(res["read_bandwidth_GBps"] * 1e9 / b["total"])
    assert res["startup"]["time_to_first_token_s"] >= res["startup"]["load_s"]
    table = bench.format_table(res)
    assert re.search(r"\| r1cpu \| tiny-v3\.q8_0\.gguf \(Q8_0\) \|.*\| pp8 \| [\d.]+ ± [\d.]+ \| [\d.]+ \|", table)
    assert all(len(s["cores_busy"]) == 2 for s in res["speed"].values())
    assert "tg4" in table and "load average" in table and "llama.cpp" not in table


def test_routed_bytes_are_what_routing_implies(tiny_q8):
    # every decoded token runs exactly K experts in every MoE layer, each read once
    ours = bench.R1cpu(str(tiny_q8), 1, 32)
    cfg = ours.model.config
    ours.tg([5, 6, 7])
    moe_layers = [lw.ffn for lw in ours.model.weights.layers if hasattr(lw.ffn, "expert_nbytes")]
    assert moe_layers
    per_token = sum(cfg.n_expert_used * w.expert_nbytes(0) for w in moe_layers)
    assert ours.bytes_per_token(3)["routed_experts"] == per_token
    dense = sum(t.nbytes for name, t in ours.model.gguf.tensors.items() if "_exps." not in name)
    embd = ours.model.gguf.tensors["token_embd.weight"]
    assert ours.bytes_per_token(3)["dense"] == dense - embd.nbytes + embd.nbytes // cfg.n_vocab


def test_cli_json(tiny_q8):
    result = CliRunner().invoke(main, ["bench", str(tiny_q8), "-p", "8", "-n", "2", "-r", "1", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["p"] == 8 and res["n"] == 2 and set(res["speed"]) == {"r1cpu pp", "r1cpu tg"}
    assert np.isfinite(res["speed"]["r1cpu tg"]["mean"])


def test_cli_bad_model(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    result = CliRunner().invoke(main, ["bench", str(bad), "-r", "1"])
    assert result.exit_code == 1 and str(bad) in result.output
