"""r1cpu plan: the converter's tensor list from a config.json, exact byte sizes per recipe (against
converted files), and the published sizes of DeepSeek-R1 and V2-Lite."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from r1cpu.runtime import plan as P
from r1cpu.runtime.cli import main
from r1cpu.runtime.convert import convert
from r1cpu.runtime.expert_cache import split_budget
from r1cpu.runtime.gguf_reader import GGUFFile
from r1cpu.runtime.model import load

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
R1, V2_LITE = CONFIGS / "deepseek-r1.config.json", CONFIGS / "deepseek-v2-lite.config.json"
SPEED = P.Speed(20.0, "given", 2.0, "given")


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    root, done = tmp_path_factory.mktemp("plan"), {}

    def get(preset: str, out_type: str) -> Path:
        if (preset, out_type) not in done:
            done[preset, out_type] = root / f"{preset}.{out_type}.gguf"
            convert(checkpoints[preset], done[preset, out_type], out_type)
        return done[preset, out_type]

    return get


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2", "tiny-moonlight"])
def test_hf_tensors_are_what_convert_writes(checkpoints, converted, preset):
    config = json.loads((checkpoints[preset] / "config.json").read_text())
    written = [(t.name, tuple(t.shape)) for t in GGUFFile(converted(preset, "f32")).tensors.values()]
    assert P.hf_tensors(config) == written


@pytest.mark.parametrize("out_type", ["q8_0", "q4_k_m", "q2_k"])
def test_sizes_equal_the_converted_file(checkpoints, converted, out_type):
    g = GGUFFile(converted("tiny-v3", out_type))
    arch, tensors = P.read_source(checkpoints["tiny-v3"], out_type)
    assert [t for _, _, t in tensors] == [t.qtype for t in g.tensors.values()]
    assert P.sizes(arch, tensors).file == sum(t.nbytes for t in g.tensors.values())
    # the file itself planned with its own types, and re-planned from f32 with the recipe
    for source, kind in ((g.path, None), (converted("tiny-v3", "f32"), out_type)):
        assert P.sizes(*P.read_source(source, kind)).file == sum(t.nbytes for t in g.tensors.values())


def test_budget_slots_match_the_expert_cache(converted):
    path = converted("tiny-v3", "q8_0")
    arch, tensors = P.read_source(path, None)
    s = P.sizes(arch, tensors)
    m = load(path)
    for max_ram in (s.resident + 2 * s.expert_slot, s.resident + 5 * s.expert_slot + 7, 1 << 30):
        b = split_budget(m.gguf, m.config, m.weights, max_ram)
        assert (b.resident, b.expert_bytes, b.n_slots) == (s.resident, s.expert_slot, P.expert_slots(arch, s, max_ram))


@pytest.mark.parametrize("out_type,lo,hi", [("q4_k_m", 395e9, 410e9), ("q8_0", 705e9, 720e9)])
def test_deepseek_r1_sizes(out_type, lo, hi):
    arch, tensors = P.read_source(R1, out_type)
    s = P.sizes(arch, tensors)
    assert lo < s.file < hi  # published R1 GGUFs: Q4_K_M 404 GB, Q8_0 713 GB
    assert abs(s.params - 671.03e9) < 0.05e9
    assert 36e9 < s.active_params < 38e9
    assert s.experts > 0.95 * s.file  # almost everything is routed experts
    assert arch.n_layer == 61 and arch.n_expert == 256 and arch.n_expert_used == 8


def test_deepseek_r1_kv_cache():
    arch, _ = P.read_source(R1, "q4_k_m")
    kv = P.kv_bytes(arch, 32768)
    assert kv["latent_f16"] == 576 * 61 * 32768 * 2  # 2.14 GiB
    assert kv["latent_f32"] == 2 * kv["latent_f16"]
    assert kv["full_f16"] == 2 * 128 * (192 + 128) * 61 * 32768  # 152.5 GiB
    assert round(kv["full_f16"] / 2**30, 1) == 152.5


def test_v2_lite_sizes():
    arch, tensors = P.read_source(V2_LITE, "q4_k_m")
    s = P.sizes(arch, tensors)
    assert abs(s.params - 15.71e9) < 0.05e9 and 2.3e9 < s.active_params < 2.6e9
    assert 10.0e9 < s.file < 10.8e9  # published V2-Lite Q4_K_M: 10.4 GB
    assert arch.n_layer == 27 and arch.n_head == 16 and arch.n_expert == 64


def test_decode_rate_is_bytes_over_bandwidth_plus_misses_over_disk():
    arch, tensors = P.read_source(R1, "q4_k_m")
    s = P.sizes(arch, tensors)
    ram = P.token_bytes(arch, s) + P.kv_bytes(arch, 1024)["latent_f32"]
    rate, spill = P.decode_rate(arch, s, SPEED, 1024, None)
    assert spill == 0 and rate == pytest.approx(20e9 / ram)
    slots = P.expert_slots(arch, s, 200 << 30)
    rate, spill = P.decode_rate(arch, s, SPEED, 1024, slots)
    assert spill == int((1 - slots / 256) * 8 * s.expert_slot)
    assert rate == pytest.approx(1 / (ram / 20e9 + spill / 2e9))


def test_plan_command():
    opts = ["--type", "q4_k_m", "--ctx", "32768", "--max-ram", "200G", "--bandwidth", "20", "--disk", "2"]
    out = CliRunner().invoke(main, ["plan", str(R1)] + opts)
    assert out.exit_code == 0, out.output
    assert "404.5 GB" in out.output and "152.50 GiB" in out.output and "slots per layer" in out.output


@pytest.mark.parametrize("args,message", [
    (["--ctx", "0"], "--ctx 0: must be at least 1"),
    (["--max-ram", "lots"], "bad size 'lots'"),
])  # fmt: skip
def test_plan_command_errors(args, message):
    out = CliRunner().invoke(main, ["plan", str(R1), "--bandwidth", "20"] + args)
    assert out.exit_code == 1 and message in out.output and out.output.count("\n") == 1
