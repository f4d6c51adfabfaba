"""Sampler: the chain against a naive full-sort reference, reproducibility, exclusions, errors."""
import numpy as np
import pytest

from cpuinfer.errors import CpuinferError
from cpuinfer.sampling import Sampler, SamplerParams


def reference_distribution(logits, history, p: SamplerParams):
    """Naive llama.cpp chain with a full stable sort: returns {id: prob}."""
    x = logits.astype(np.float64).copy()
    if p.repeat_penalty != 1.0 and p.repeat_last_n != 0:
        tail = history if p.repeat_last_n < 0 else history[-p.repeat_last_n:]
        for t in set(tail):
            x[t] = x[t] * p.repeat_penalty if x[t] <= 0 else x[t] / p.repeat_penalty
    x = x.astype(np.float32).astype(np.float64)
    if p.temperature <= 0:
        return {int(np.argmax(x)): 1.0}
    order = np.lexsort((np.arange(len(x)), -x))          # best first, ties by id
    if 0 < p.top_k < len(x):
        order = order[:p.top_k]
    probs = np.exp(x[order] - x[order[0]])
    probs /= probs.sum()
    if p.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p * (1 - 1e-12))) + 1
        order, probs = order[:keep], probs[:keep]
    if p.min_p > 0:
        keep = probs >= p.min_p * probs[0]
        order = order[keep]
    w = np.exp((x[order] - x[order[0]]) / p.temperature)
    return dict(zip(order.tolist(), (w / w.sum()).tolist()))


def random_logits(n, seed, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


@pytest.mark.parametrize("params", [
    SamplerParams(),
    SamplerParams(top_k=0),
    SamplerParams(top_k=0, min_p=0.0),
    SamplerParams(top_k=0, min_p=0.0, top_p=1.0),
    SamplerParams(top_k=5, top_p=1.0, min_p=0.0, temperature=1.5),
    SamplerParams(top_k=200, top_p=0.5, min_p=0.01, temperature=0.3),
    SamplerParams(top_k=0, top_p=0.9, min_p=0.2),
    SamplerParams(repeat_penalty=1.3, repeat_last_n=8),
    SamplerParams(repeat_penalty=1.3, repeat_last_n=-1, top_k=0),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_distribution_matches_reference(params, seed):
    n = 3000
    logits = random_logits(n, seed)
    history = [int(t) for t in np.argsort(-logits)[:20:2]] + [5, 5, 7]
    ids, probs = Sampler(params, n).candidates(logits, history)
    ref = reference_distribution(logits, history, params)
    assert ids.tolist() == list(ref.keys())
    np.testing.assert_allclose(probs, list(ref.values()), rtol=1e-5, atol=1e-9)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    for seed in range(5):
        logits = random_logits(1000, seed)
        logits[17] = logits.max()           # a tie: the lower id wins, as with np.argmax
        want = int(np.argmax(logits))
        assert Sampler(SamplerParams(temperature=0.0), 1000).sample(logits, []) == want
        assert Sampler(SamplerParams(temperature=-1.0), 1000).sample(logits, []) == want
        s = Sampler(SamplerParams(top_k=1, temperature=5.0, seed=seed), 1000)
        assert all(s.sample(logits, []) == want for _ in range(20))


def test_seed_reproducible_and_seeds_differ():
    logits = random_logits(500, 3, scale=1.0)
    p = SamplerParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a = Sampler(p, 500)
    b = Sampler(p, 500)
    seq_a = [a.sample(logits, []) for _ in range(50)]
    seq_b = [b.sample(logits, []) for _ in range(50)]
    assert seq_a == seq_b
    p.seed = 43
    c = Sampler(p, 500)
    assert [c.sample(logits, []) for _ in range(50)] != seq_a


def test_frequencies_follow_distribution_and_exclusions_hold():
    # probabilities 0.5, 0.25, 0.15, 0.06, 0.04 (then negligible mass on the rest)
    base = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = np.full(64, -60.0, np.float32)
    logits[[10, 3, 40, 7, 50]] = np.log(base)
    # top-p 0.85: 0.5 + 0.25 = 0.75 < 0.85, + 0.15 crosses -> ids {10, 3, 40}
    # min-p 0.1: p >= 0.05 -> ids {10, 3, 40, 7}; together -> {10, 3, 40}
    s = Sampler(SamplerParams(temperature=1.0, top_k=0, top_p=0.85, min_p=0.1, seed=7), 64)
    n = 20000
    draws = np.array([s.sample(logits, []) for _ in range(n)])
    assert set(np.unique(draws)) == {10, 3, 40}
    expected = base[:3] / base[:3].sum()
    counts = np.array([(draws == t).sum() for t in (10, 3, 40)])
    chi2 = (((counts - n * expected) ** 2) / (n * expected)).sum()
    assert chi2 < 13.8                       # 2 degrees of freedom, p = 0.001

    s = Sampler(SamplerParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1, seed=7), 64)
    assert {s.sample(logits, []) for _ in range(3000)} == {10, 3, 40, 7}
    s = Sampler(SamplerParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=7), 64)
    assert {s.sample(logits, []) for _ in range(1000)} == {10, 3}


def test_temperature_sharpens_and_flattens():
    logits = np.log(np.array([0.6, 0.4], np.float32))
    cold = Sampler(SamplerParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0), 2)
    hot = Sampler(SamplerParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0), 2)
    np.testing.assert_allclose(cold.candidates(logits)[1], [0.36 / 0.52, 0.16 / 0.52], rtol=1e-5)
    w = np.sqrt([0.6, 0.4])
    np.testing.assert_allclose(hot.candidates(logits)[1], w / w.sum(), rtol=1e-5)


def test_repeat_penalty_changes_argmax():
    logits = np.array([1.0, 2.0, 1.5, -0.5], np.float32)
    greedy = SamplerParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=4)
    s = Sampler(greedy, 4)
    assert s.sample(logits, []) == 1
    assert s.sample(logits, [1]) == 2            # 2.0 / 1.5 = 1.33 < 1.5
    assert s.sample(logits, [1, 2]) == 1         # 1.33 beats 1.5 / 1.5 = 1.0
    assert s.sample(logits, [2, 1, 1, 1]) == 1   # repeated ids are penalized once (not 2/1.5^3)
    assert s.sample(logits, [1, 3, 3, 3, 3]) == 1  # id 1 fell out of the last-4 window
    assert s.sample(logits, [3, 1, 3, 3, 3]) == 2
    tie = np.array([1.0, 1.5, 1.0, -3.0], np.float32)
    assert s.sample(tie, [1]) == 0               # 1.5 / 1.5 = 1.0 ties ids 0 and 2: lower id
    # negative logits are multiplied (pushed further down)
    ids, _ = Sampler(SamplerParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                   repeat_penalty=2.0), 4).candidates(logits, [3])
    assert ids[-1] == 3
    assert logits.tolist() == [1.0, 2.0, 1.5, -0.5]  # the caller's logits are untouched


@pytest.mark.parametrize("field,value,fragment", [
    ("top_p", 1.5, "--top-p must be in (0, 1], got 1.5"),
    ("top_p", 0.0, "--top-p"),
    ("min_p", 1.0, "--min-p"),
    ("top_k", -1, "--top-k"),
    ("temperature", float("nan"), "--temperature"),
    ("temperature", "hot", "--temperature"),
    ("repeat_penalty", 0.0, "--repeat-penalty"),
    ("repeat_last_n", -2, "--repeat-last-n"),
    ("seed", -5, "--seed"),
    ("top_k", 2.5, "--top-k"),
])
def test_bad_params_raise(field, value, fragment):
    p = SamplerParams()
    setattr(p, field, value)
    with pytest.raises(CpuinferError, match=None) as e:
        Sampler(p, 10)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_logits_raise():
    s = Sampler(SamplerParams(), 10)
    with pytest.raises(CpuinferError, match="shape"):
        s.sample(np.zeros(11, np.float32), [])
    with pytest.raises(CpuinferError):
        Sampler(SamplerParams(), 0)
