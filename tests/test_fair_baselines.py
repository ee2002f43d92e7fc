"""The threshold baselines get MoDES's search budget: the same grid size and spacing, scaled to the largest score
each rule can produce, the same frontier walk for the two-threshold DMT."""
from types import SimpleNamespace

import pytest
import torch

import baselines
from router import DMT, Threshold, threshold_grid


class FakeEvaluator:
    """score(policy) -> a skip ratio that grows with the policy's thresholds (the mean of tau over its scale), and
    a KL that grows with it too; records every threshold pair it is asked about."""

    def __init__(self, scale=1.0):
        self.scale, self.asked = scale, []

    def score(self, policy):
        tau = policy.tau.tolist()
        self.asked.append(tuple(tau))
        ratio = min(1.0, sum(tau) / (2 * self.scale))
        return dict(kl=ratio ** 2, top1=1.0, skip=dict(all=ratio, text=ratio, vision=ratio))


MODEL = SimpleNamespace(cfg=SimpleNamespace(num_experts_per_tok=4))


@pytest.mark.parametrize("grid_n", [20, 100])
def test_threshold_is_the_first_point_of_modes_grid_that_reaches_the_target(grid_n):
    evaluator = FakeEvaluator()
    fit = baselines.fit_baseline("threshold", MODEL, evaluator, None, None, 0.5, grid_n=grid_n)
    grid = (threshold_grid(grid_n) * (1 + 1e-6)).tolist()
    tau = fit["hyper"]
    assert tau in grid and isinstance(fit["policy"], Threshold)
    i = grid.index(tau)
    assert tau / (1 + 1e-6) >= 0.5 and (i == 0 or grid[i - 1] / (1 + 1e-6) < 0.5)
    as_fp32 = set(torch.tensor(grid, dtype=torch.float32).tolist())  # the policies hold tau in fp32
    assert all(t in as_fp32 for t, _ in evaluator.asked)
    assert len(evaluator.asked) <= 2 + grid_n.bit_length()  # bisection over the grid's indices


def test_threshold_with_gmlg_grid_is_scaled_to_the_largest_alpha():
    alpha = torch.tensor([[0.1, 0.2], [0.4, 0.3]])
    evaluator = FakeEvaluator(scale=0.4)
    fit = baselines.fit_baseline("threshold+gmlg", MODEL, evaluator, alpha, None, 0.5, grid_n=50)
    grid = (threshold_grid(50) * (1 + 1e-6) * float(alpha.max())).tolist()
    assert fit["hyper"] == pytest.approx(min(t for t in grid if t / (1 + 1e-6) / 0.4 >= 0.5), rel=1e-12)
    assert torch.equal(fit["policy"].alpha, alpha)


def test_dmt_walks_the_same_grid_as_modes():
    evaluator = FakeEvaluator()
    fit = baselines.fit_baseline("dmt", MODEL, evaluator, None, None, 0.6, grid_n=30)
    grid = set((threshold_grid(30) * (1 + 1e-6)).float().tolist())  # the policies hold tau in fp32
    assert isinstance(fit["policy"], DMT) and fit["policy"].alpha is None
    assert all(t in grid and v in grid for t, v in evaluator.asked)
    assert len(set(evaluator.asked)) <= 3 * 30  # the frontier walk's budget, as for MoDES
    assert fit["calib_skip"] >= 0.6


def test_out_of_reach_is_reported():
    evaluator = FakeEvaluator(scale=10.0)  # the largest threshold skips 1/10 at most
    fit = baselines.fit_baseline("threshold", MODEL, evaluator, None, None, 0.5, grid_n=10)
    assert fit["policy"] is None and not fit["reached"] and "out of reach" in fit["note"]
