"""Sampling filters keep exactly the right candidates and the seeded draws follow the filtered softmax."""

import numpy as np
import pytest

from r1cpu.runtime.sampler import (
    R1_TEMPERATURE,
    R1_TOP_P,
    SamplerSettings,
    apply_repetition_penalty,
    make_sampler,
    min_p,
    softmax,
    top_k,
    top_p,
)


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def test_top_k_keeps_the_k_largest():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=5000).astype(np.float32)
    ids, kept = top_k(np.arange(5000), logits, 37)
    assert len(ids) == 37 and set(ids) == set(np.argsort(logits)[-37:])
    assert np.array_equal(kept, logits[ids])
    assert len(top_k(np.arange(5000), logits, 0)[0]) == 5000  # 0 = off


@pytest.mark.parametrize("p, expected", [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.4, {0}), (1.0, {0, 1, 2, 3})])
def test_top_p_small_example(p, expected):
    ids, _ = top_p(np.arange(4), logits_of([0.5, 0.3, 0.15, 0.05]), p)
    assert set(ids) == expected


@pytest.mark.parametrize("vocab, scale", [(50_000, 3.0), (50_000, 0.01)])  # peaked, and flat (> first cut)
def test_top_p_keeps_the_smallest_set_reaching_p(vocab, scale):
    logits = (np.random.default_rng(1).normal(size=vocab) * scale).astype(np.float32)
    probs = softmax(logits)
    ids, _ = top_p(np.arange(vocab), logits, 0.9)
    mass = probs[ids].sum()
    assert mass >= 0.9 and mass - probs[ids].min() < 0.9  # reaches p, and one fewer would not
    assert probs[ids].min() >= np.delete(probs, ids).max()  # it is the most likely tokens


def test_min_p_threshold_relative_to_best():
    ids, _ = min_p(np.arange(4), logits_of([0.6, 0.3, 0.06, 0.04]), 0.15)  # keep p >= 0.09
    assert set(ids) == {0, 1}
    ids, _ = min_p(np.arange(4), logits_of([0.6, 0.3, 0.06, 0.04]), 0.05)  # keep p >= 0.03
    assert set(ids) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = np.array([2.0, -2.0, 1.0, 3.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1, 0], 2.0)  # repeats count once
    assert np.array_equal(out, np.array([1.0, -4.0, 1.0, 3.0], dtype=np.float32))
    assert logits[0] == 2.0  # the input is not modified


def test_greedy_is_argmax_after_penalty():
    logits = np.array([5.0, 4.0, 1.0], dtype=np.float32)
    assert make_sampler(temperature=0.0)(logits, []) == 0
    assert make_sampler(temperature=0.0, repetition_penalty=1.5)(logits, [0]) == 1  # 5/1.5 < 4


def draw(sampler, logits, n=20_000):
    return np.bincount([sampler(logits, []) for _ in range(n)], minlength=len(logits)) / n


def test_draws_follow_the_tempered_softmax():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    freq = draw(make_sampler(temperature=0.5, top_p=1.0, seed=0), logits_of(probs))
    expected = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    assert np.abs(freq - expected).max() < 0.015


def test_draws_stay_inside_the_filters():
    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
    freq = draw(make_sampler(temperature=1.0, top_k=2, top_p=1.0, seed=1), logits_of(probs), 5000)
    assert freq[2:].sum() == 0 and abs(freq[0] - 4 / 7) < 0.03
    freq = draw(make_sampler(temperature=1.0, top_p=0.85, seed=2), logits_of(probs), 5000)
    assert freq[3:].sum() == 0 and abs(freq[2] - 0.2 / 0.9) < 0.03  # renormalised over the nucleus


def test_seeded_runs_repeat_and_seeds_differ():
    logits = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    samplers = [make_sampler(seed=s) for s in (7, 7, 8)]  # R1 defaults: temperature 0.6, top-p 0.95
    seq = [[f(logits, []) for _ in range(50)] for f in samplers]
    assert seq[0] == seq[1] and seq[0] != seq[2]


def test_r1_defaults_and_bad_settings():
    s = SamplerSettings()
    assert (s.temperature, s.top_p) == (R1_TEMPERATURE, R1_TOP_P) == (0.6, 0.95)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"min_p": 1.0}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            SamplerSettings(**bad)
