"""Fuzzing in the default suite: hypothesis draws the same mutations `make fuzz` applies (header
fields set to boundary values, bit flips, byte runs, insertions, deletions, truncation) to valid tiny
files; every result must load and run to finite logits, or fail with one of our one-line errors.
Also: the harness itself notices what it is meant to catch (other exceptions, hangs, crashes)."""

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import r1cpu
from r1cpu.runtime.convert import convert
from r1cpu.tools import fuzz_gguf
from r1cpu.tools.fuzz_gguf import INTERESTING, Seed, Tally, apply, run_case

CASE_TIMEOUT = 60.0  # generous: the first forward of a new tensor layout may compile kernels


@pytest.fixture(scope="module")
def seeds(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    files = [convert(checkpoints["tiny-v3"], root / "v3.q8_0.gguf", "q8_0").path,
             convert(checkpoints["tiny-v2"], root / "v2.q4_0.gguf", "q4_0").path]  # fmt: skip
    return [Seed.read(p) for p in files]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-cases") / "case.gguf"


def field_mutation(seed: Seed):
    value = st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1))
    return st.tuples(st.just("field"), st.integers(0, len(seed.fields) - 1), value)


def byte_mutation(seed: Seed):
    anywhere = st.integers(0, len(seed.raw) - 1)
    pos = st.one_of(st.integers(0, seed.header_end - 1), anywhere)
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("run"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("truncate"), pos, st.just(0)),
    )


def check(seed: Seed, mutations, path: Path) -> None:
    path.write_bytes(apply(seed, mutations))
    outcome, message = run_case(path, CASE_TIMEOUT)
    assert outcome in ("loaded", "error"), f"{outcome}: {message} (mutations {mutations!r:.300})"


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(data=st.data())
def test_header_field_mutations(seeds, scratch, data):
    seed = data.draw(st.sampled_from(seeds))
    check(seed, data.draw(st.lists(field_mutation(seed), min_size=1, max_size=3)), scratch)


@FAST
@given(data=st.data())
def test_byte_mutations(seeds, scratch, data):
    seed = data.draw(st.sampled_from(seeds))
    check(seed, data.draw(st.lists(byte_mutation(seed), min_size=1, max_size=3)), scratch)


def test_unmutated_seeds_load_and_run(seeds, scratch):
    for seed in seeds:
        assert check(seed, [], scratch) is None


def test_harness_reports_other_exceptions(seeds, scratch, monkeypatch):
    scratch.write_bytes(seeds[0].raw)
    monkeypatch.setattr(r1cpu, "load", lambda path, threads=None: {}["no such key"])
    outcome, message = run_case(scratch, CASE_TIMEOUT)
    assert outcome == "finding" and message.startswith("KeyError")


def test_harness_reports_hangs(seeds, scratch, monkeypatch):
    scratch.write_bytes(seeds[0].raw)
    monkeypatch.setattr(r1cpu, "load", lambda path, threads=None: time.sleep(30))
    t0 = time.perf_counter()
    assert run_case(scratch, 0.2) == ("hang", "no answer within 0.2 s")
    assert time.perf_counter() - t0 < 5


def test_harness_counts_a_dead_worker_as_a_crash(seeds, tmp_path):
    tally = Tally(tmp_path, seeds, master=0)
    assert fuzz_gguf._worker_ended(-11, 41, 100, tally) == 42
    assert tally.outcomes["crash"] == 1 and (tmp_path / "findings" / "crash-41.gguf").exists()
    assert fuzz_gguf._worker_ended(0, None, 100, tally) == 100


def test_cases_replay_identically(seeds):
    a, b = fuzz_gguf.case(seeds, 7, 1234), fuzz_gguf.case(seeds, 7, 1234)
    assert a[0] is b[0] and a[1] == b[1] and apply(*a) == apply(*b)
