"""bench.compare_logits, the graphed/compiled-against-eager check of bench.py --check-graph and tests/test_gpu.py:
per-step logits within a tolerance, top-1 agreement wherever the top token is decided, bitwise equality only where
the same kernels run on the same inputs."""
import torch

import bench

RTOL = 2e-2


def logits(n=4, B=2, V=5000, seed=0):
    """[n, B, V] random logits with a clear top token (margin 1.0, far outside the flip band) in every row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, B, V, generator=g)
    x[..., 7] = x.max(-1).values + 1.0
    return x


def test_identical_logits_are_exact():
    x = logits()
    c = bench.compare_logits(x, x.clone(), RTOL, exact=True)
    assert c["ok"] and c["bitwise_equal"] and c["max_rel_err"] == 0 and c["top1_agree"] == 1.0
    assert c["steps"] == 4 and c["top1_decided"] == 8


def test_rounding_noise_passes_but_not_where_exactness_is_required():
    x = logits()
    noisy = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert bench.compare_logits(x, noisy, RTOL)["ok"]
    c = bench.compare_logits(x, noisy, RTOL, exact=True)
    assert not c["ok"] and not c["bitwise_equal"]


def test_a_near_tie_may_flip_a_decided_token_may_not():
    x = logits()
    x[1, 0, 8] = x[1, 0, 7] - 1e-3  # a near-tie at step 1, row 0
    flipped = x.clone()
    flipped[1, 0, 8], flipped[1, 0, 7] = x[1, 0, 7], x[1, 0, 8]  # rounding could swap those two
    c = bench.compare_logits(x, flipped, RTOL)
    assert c["ok"] and c["top1_agree"] == 7 / 8 and c["top1_decided"] == 7 and c["top1_decided_flips"] == 0
    # a swap where the top token led by 1.0: over a 152k vocabulary a small L2 error, but a wrong token
    y = logits(V=151936)
    wrong = y.clone()
    wrong[2, 1, 7], wrong[2, 1, 3] = y[2, 1, 3], y[2, 1, 7]
    c = bench.compare_logits(y, wrong, RTOL)
    assert c["max_rel_err"] < RTOL and c["top1_decided_flips"] == 1 and not c["ok"]


def test_an_error_beyond_the_tolerance_fails_at_any_one_step():
    x = logits()
    off = x.clone()
    off[3] += 0.1 * x[3].abs().max() * torch.randn(x[3].shape, generator=torch.Generator().manual_seed(2))
    c = bench.compare_logits(x, off, RTOL)
    assert not c["ok"] and c["max_rel_err"] > RTOL
    assert bench.compare_logits(x[:3], off[:3], RTOL)["ok"]  # the earlier steps alone are fine
