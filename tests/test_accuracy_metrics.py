"""generator/accuracy/metrics.py against values worked out by hand on two-token vocabularies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from generator.accuracy.metrics import kl_divergence, token_metrics
from generator.errors import GeneratorError

# ref: p = (1/2, 1/2) then (3/4, 1/4); ours: (3/4, 1/4) then (3/4, 1/4) (logits shifted by a constant: same p)
REF = np.array([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=np.float32)
OURS = np.array([[math.log(3.0), 0.0], [math.log(3.0) + 5.0, 5.0]], dtype=np.float32)
TARGETS = np.array([1, 0])


def test_kl_divergence_by_hand():
    kld = kl_divergence(REF, OURS)
    assert kld.dtype == np.float64 and kld.shape == (2,)
    # position 0: 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3); position 1: same distribution -> 0
    assert kld[0] == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-6)
    assert kld[1] == pytest.approx(0.0, abs=1e-7)


def test_kl_is_reference_first():
    # KL(ours || ref) at position 0 would be 3/4 ln(3/2) + 1/4 ln(1/2), a different number
    other = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_divergence(OURS[:1], REF[:1])[0] == pytest.approx(other, rel=1e-6)
    assert kl_divergence(REF[:1], OURS[:1])[0] != pytest.approx(other, rel=1e-3)


def test_token_metrics_by_hand():
    m = token_metrics(REF, OURS, TARGETS)
    k0 = 0.5 * math.log(4.0 / 3.0)
    assert m["kld_mean"] == pytest.approx(k0 / 2, rel=1e-6)
    assert m["kld_p99"] == pytest.approx(0.99 * k0, rel=1e-6)  # linear interpolation between 0 and k0
    # argmax: ref position 0 is a tie (argmax 0), ours 0; position 1 both 0
    assert m["top1_agreement"] == 1.0
    # ref NLL: -ln(1/2), -ln(3/4); ours: -ln(1/4), -ln(3/4)
    assert m["ppl_ref"] == pytest.approx(math.exp((math.log(2) + math.log(4 / 3)) / 2), rel=1e-6)
    assert m["ppl"] == pytest.approx(math.exp((math.log(4) + math.log(4 / 3)) / 2), rel=1e-6)
    assert m["n_tokens"] == 2


def test_top1_disagreement_counts():
    ours = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    ref = np.array([[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert token_metrics(ref, ours, [0, 0, 0, 0])["top1_agreement"] == 0.5


def test_identical_logits_are_zero_kld():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 50)).astype(np.float32) * 10
    m = token_metrics(x, x, rng.integers(0, 50, 7))
    assert m["kld_mean"] == 0.0 and m["kld_p99"] == 0.0 and m["top1_agreement"] == 1.0
    assert m["ppl"] == m["ppl_ref"]


@pytest.mark.parametrize("ref, ours, targets, words", [
    (np.zeros((2, 3)), np.zeros((2, 4)), [0, 0], "same shape"),
    (np.zeros((2, 3)), np.zeros((2, 3)), [0], "one target per position"),
    (np.zeros((2, 3)), np.zeros((2, 3)), [0, 3], "target ids"),
    (np.zeros((2, 3)), np.full((2, 3), np.nan), [0, 0], "NaN"),
])
def test_bad_input(ref, ours, targets, words):
    with pytest.raises(GeneratorError, match=words):
        token_metrics(ref, ours, targets)
