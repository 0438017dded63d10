"""The runner's Sampler against an independent numpy reference of the board's order (contract
section 4): logits to fp32; divide by temperature; repetition penalty over the last
`penalty_window` generated tokens (positive logits divided, negative multiplied); then top-p, else
top-k (softmax over the k best), else argmax.

The reference computes the exact distribution a setting samples from; the Sampler's frequencies
over many seeded draws must match it within a statistical bound (and never pick a token the
distribution excludes)."""

import numpy as np
import pytest

from generator.contract import Sampling
from generator.runtime.generation import Sampler

DRAWS = 8000
# |frequency - p| stays below SIGMAS standard deviations of a binomial frequency (p(1-p)/DRAWS)
SIGMAS = 5.0
LOGITS = np.array([2.0, 1.5, -0.5, 0.7, 3.1, -2.0, 0.0, 1.1, -1.0, 2.6], np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_distribution(logits: np.ndarray, history: list[int], cfg: Sampling) -> np.ndarray:
    """The exact probability of every token under `cfg`, written from the contract's text."""
    x = logits.astype(np.float64)
    if cfg.enable_temperature and cfg.temperature > 0:
        x = x / cfg.temperature
    if cfg.enable_repetition_penalty and cfg.penalty_window > 0:
        for t in set(history[max(0, len(history) - cfg.penalty_window):]):
            x[t] = x[t] / cfg.repetition_penalty if x[t] > 0 else x[t] * cfg.repetition_penalty
    p = np.zeros_like(x)
    if cfg.enable_top_p_sampling:
        order = sorted(range(x.size), key=lambda i: -x[i])
        full = softmax(x)
        kept, mass = [], 0.0
        for i in order:  # the smallest head of the ranking whose mass reaches top_p
            kept.append(i)
            mass += full[i]
            if mass >= cfg.top_p:
                break
        p[kept] = softmax(x[kept])
    elif cfg.enable_top_k_sampling and cfg.top_k > 1:
        kept = sorted(range(x.size), key=lambda i: -x[i])[:cfg.top_k]
        p[kept] = softmax(x[kept])
    else:
        p[int(np.argmax(x))] = 1.0
    return p


def frequencies(cfg: Sampling, logits: np.ndarray, history: list[int], indices=None, seed: int = 0) -> np.ndarray:
    sampler = Sampler(cfg, seed=seed)
    size = logits.size if indices is None else int(np.max(indices)) + 1
    counts = np.zeros(size)
    for _ in range(DRAWS):
        counts[sampler(logits, history, indices)] += 1
    return counts / DRAWS


def assert_matches(freq: np.ndarray, p: np.ndarray):
    assert np.all(freq[p == 0] == 0), f"drew excluded tokens: {np.nonzero(freq * (p == 0))[0].tolist()}"
    bound = SIGMAS * np.sqrt(p * (1 - p) / DRAWS) + 1.0 / DRAWS
    assert np.all(np.abs(freq - p) <= bound), f"frequencies {np.round(freq, 3)} vs expected {np.round(p, 3)}"


CASES = {
    "temperature": Sampling(enable_temperature=True, temperature=2.0, enable_top_k_sampling=True, top_k=10),
    "low temperature": Sampling(enable_temperature=True, temperature=0.6, enable_top_k_sampling=True, top_k=4),
    "top_k": Sampling(enable_top_k_sampling=True, top_k=3),
    "top_p": Sampling(enable_top_p_sampling=True, top_p=0.8),
    "top_p over top_k": Sampling(enable_top_p_sampling=True, top_p=0.5, enable_top_k_sampling=True, top_k=8),
    "temperature then top_p": Sampling(enable_temperature=True, temperature=1.7, enable_top_p_sampling=True, top_p=0.9),
    "penalty": Sampling(enable_repetition_penalty=True, repetition_penalty=2.0, penalty_window=3,
                        enable_top_k_sampling=True, top_k=6),
    "everything": Sampling(enable_temperature=True, temperature=0.8, enable_repetition_penalty=True,
                           repetition_penalty=1.5, penalty_window=4, enable_top_p_sampling=True, top_p=0.95),
}
# generated so far: 4 (the best logit) and 9 are outside a window of 3 or 4 only when older than it
HISTORY = [4, 9, 1, 2, 8, 0, 1]


@pytest.mark.parametrize("name", list(CASES))
def test_sampling_distribution_matches_the_board_order(name):
    cfg = CASES[name]
    p = reference_distribution(LOGITS, HISTORY, cfg)
    assert_matches(frequencies(cfg, LOGITS, HISTORY), p)


def test_the_reference_distinguishes_what_it_checks():
    """Each setting moves the distribution further than the statistical bound (a sampler that
    multiplied by the temperature, ignored the window or the penalty's sign would be caught)."""
    base = Sampling(enable_top_k_sampling=True, top_k=10)
    hot = reference_distribution(LOGITS, [], CASES["temperature"])
    assert np.abs(hot - reference_distribution(LOGITS, [], Sampling(enable_temperature=True, temperature=0.5,
                                                                   top_k=10))).max() > 0.2
    assert np.abs(hot - reference_distribution(LOGITS, [], base)).max() > 0.1
    pen = CASES["penalty"]
    everything = pen.model_copy(update={"penalty_window": len(HISTORY)})
    assert np.abs(reference_distribution(LOGITS, HISTORY, pen) - reference_distribution(LOGITS, HISTORY, everything)).max() > 0.1
    # logit 4 (positive) drops when penalised, logit 2 (negative) drops further: both hurt the token
    p = reference_distribution(LOGITS, [4, 2], pen.model_copy(update={"top_k": 10}))
    q = reference_distribution(LOGITS, [], pen.model_copy(update={"top_k": 10}))
    assert p[4] < q[4] - 0.1 and p[2] < q[2]


def test_penalty_applies_to_the_window_only_and_by_sign():
    """Greedy after the penalty: the argmax moves exactly when the best token is inside the window."""
    cfg = Sampling(enable_repetition_penalty=True, repetition_penalty=2.0, penalty_window=2, top_k=1)
    s = Sampler(cfg, seed=0)
    assert s(LOGITS, [4, 0, 1]) == 4  # 4 is three tokens back: outside a window of 2
    assert s(LOGITS, [0, 4, 1]) == 9  # 3.1 / 2 < 2.6
    assert Sampler(cfg.model_copy(update={"penalty_window": 0}), seed=0)(LOGITS, [4]) == 4  # a window of 0 tokens
    neg = np.array([-1.0, -1.5, -3.0], np.float32)
    assert s(neg, [0]) == 1  # -1 * 2 = -2 < -1.5: a negative logit is multiplied
    assert s(neg, []) == 0


def test_top_p_keeps_the_smallest_head_reaching_p():
    """Just below a cumulative mass the head ends there; just above it, one more token joins."""
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))
    for top_p, support in ((0.35, {0}), (0.45, {0, 1}), (0.65, {0, 1}), (0.75, {0, 1, 2}), (0.95, {0, 1, 2, 3})):
        cfg = Sampling(enable_top_p_sampling=True, top_p=top_p)
        freq = frequencies(cfg, logits, [])
        assert set(np.nonzero(freq)[0].tolist()) == support, (top_p, freq)
        assert_matches(freq, reference_distribution(logits, [], cfg))


def test_post_topk_indices_are_sampled_as_token_ids():
    """With --post_topk the post graph gives values and their token ids: the penalty looks up ids,
    the sampler returns ids."""
    ids = np.array([40, 7, 13, 2, 99], np.int64)
    values = np.array([3.0, 2.5, 2.0, 1.0, 0.5], np.float32)
    cfg = Sampling(enable_temperature=True, temperature=1.5, enable_repetition_penalty=True, repetition_penalty=3.0,
                   penalty_window=5, top_k=4)
    full = np.full(100, -np.inf, np.float32)  # the same values in a full vocabulary
    full[ids] = values
    p = reference_distribution(np.where(np.isinf(full), -1e30, full), [40], cfg)
    assert_matches(frequencies(cfg, values, [40], ids), p)


def test_seeded_draws_repeat():
    cfg = CASES["everything"]
    s, t = Sampler(cfg, seed=5), Sampler(cfg, seed=5)
    assert [s(LOGITS, HISTORY) for _ in range(50)] == [t(LOGITS, HISTORY) for _ in range(50)]
