"""router.py: skipping policies, SkipStats counting, install/uninstall, the tau grid. CPU, tiny sizes.

Hand-worked expectations use dyadic probabilities (0.5, 0.25, 0.125) so every product and sum is exact in fp32.
"""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import router  # noqa: E402
from baselines import NAEE, DiEP, MCMoE, ReduceK, TokenImportance, diep_gamma  # noqa: E402
from model import (SKIP, SPECIAL, TEXT, VISION, DecoderLayers, MoE, Routing, VisionLanguageModel,  # noqa: E402
                   Wrapper)
from router import DMT, MoDES, SkipStats, Threshold, install, threshold_grid, uninstall  # noqa: E402

KIMI_SCALE = 2.446


def random_routing(T=48, K=6, E=16, seed=0, scale=KIMI_SCALE):
    """A Kimi-like routing: slots ordered by a biased score, so pi_hat is not sorted within a token."""
    g = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(T, E, generator=g)).sigmoid()  # [T, E]
    bias = torch.randn(E, generator=g) * 0.1
    ids = (probs + bias).topk(K, dim=-1).indices  # [T, K]
    picked = probs.gather(-1, ids)
    pi_hat = picked / picked.sum(-1, keepdim=True)  # [T, K]
    return Routing(pi_hat * scale, ids, pi_hat, probs)


def with_importance(policy, T=48, seed=0):
    """An MCMoE policy as its TokenImportance wrapper leaves it before a prefill layer: importance [T] set."""
    policy.importance = torch.rand(T, generator=torch.Generator().manual_seed(seed + 7))
    return policy


def random_modality(T, seed=0):
    return torch.randint(0, 3, (T,), generator=torch.Generator().manual_seed(seed))


def hand_routing(pi_rows, ids_rows=None, scale=KIMI_SCALE, E=16, probs=None):
    pi_hat = torch.tensor(pi_rows, dtype=torch.float32)
    T, K = pi_hat.shape
    ids = torch.tensor(ids_rows) if ids_rows is not None else torch.arange(K).repeat(T, 1)
    if probs is None:
        probs = torch.zeros(T, E).scatter(-1, ids, pi_hat)
    return Routing(pi_hat * scale, ids, pi_hat, probs)


def kept(ids):
    return (ids != SKIP).tolist()


ALPHA = torch.tensor([[0.4, 0.1], [0.35, 0.3], [0.2, 0.4], [0.05, 0.2]])  # [L, 2] text, vision


def all_policies(strength):
    """Each policy at a given strength; a larger strength must never keep more slots."""
    gamma = diep_gamma(torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(1)))
    return [
        Threshold(strength / 2),
        Threshold(strength / 4, alpha=ALPHA.sum(1)),
        DMT(strength / 2, strength / 1.5),
        MoDES(strength / 6, strength / 5, ALPHA),
        MoDES(strength / 2, strength / 2, ALPHA, use_full_softmax=True),
        ReduceK(6 - min(int(strength * 6), 6)),
        NAEE(torch.tensor([1.0, 0.8, 0.5, 0.3]) * strength),
        with_importance(MCMoE(strength * 0.6)),
        DiEP(strength * 0.5, gamma),
    ]


# -----------------------------------------------------------------------------
# properties every policy must have


def test_zero_threshold_is_identity():
    routing = random_routing()
    modality = random_modality(48)
    for policy in [Threshold(0.0), DMT(0.0, 0.0), MoDES(0.0, 0.0, ALPHA),
                   MoDES(0.0, 0.0, ALPHA[:, 0], use_full_softmax=True), NAEE(0.0), DiEP(0.0, torch.ones(4, 16, 16)),
                   with_importance(MCMoE(0.0, protect_frac=0.1, drop_frac=0.0)), ReduceK(6)]:
        for layer in range(4):
            weights, ids = policy(routing, modality, layer)
            assert torch.equal(weights, routing.weights) and torch.equal(ids, routing.ids), type(policy).__name__


@pytest.mark.parametrize("seed", range(3))
def test_raising_threshold_never_keeps_more(seed):
    routing = random_routing(seed=seed)
    modality = random_modality(48, seed)
    strengths = [0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.7, 1.0, 2.0]
    for i in range(len(all_policies(0.0))):
        for layer in range(4):
            previous = None
            for strength in strengths:
                keep = all_policies(strength)[i](routing, modality, layer)[1] != SKIP  # [T, K]
                if previous is not None:  # the kept set only shrinks: nothing dropped comes back
                    assert not (keep & ~previous).any(), (i, layer, strength)
                previous = keep


def test_thresholds_move_one_modality_each():
    routing = random_routing()
    modality = random_modality(48)
    for grid_text, grid_vision in [(threshold_grid(20, 0.9), torch.zeros(20)),
                                   (torch.zeros(20), threshold_grid(20, 0.9))]:
        counts = [(MoDES(float(t), float(v), ALPHA)(routing, modality, 2)[1] != SKIP).sum(1) for t, v in
                  zip(grid_text, grid_vision)]  # each [T]
        for before, after in zip(counts, counts[1:]):
            assert (after <= before).all()
        moved = modality == (TEXT if grid_text.any() else VISION)
        assert torch.equal(counts[0][~moved], counts[-1][~moved]) and (counts[-1][moved] < counts[0][moved]).any()


def test_special_tokens_never_skipped_and_tokens_may_lose_every_slot():
    routing = random_routing()
    modality = random_modality(48)
    special = modality == SPECIAL
    for policy in [Threshold(1e30), DMT(1e30, 1e30, ALPHA), ReduceK(0), NAEE(2.0),
                   with_importance(MCMoE(2.0, protect_frac=0.0, drop_frac=1.0)), DiEP(2.0, torch.ones(4, 16, 16))]:
        weights, ids = policy(routing, modality, 1)
        assert torch.equal(ids[special], routing.ids[special]), type(policy).__name__
        assert torch.equal(weights[special], routing.weights[special])
        assert (ids[~special] == SKIP).all() and (weights[~special] == 0).all(), type(policy).__name__


def test_skipped_slots_are_sentinel_with_zero_weight_and_kept_weights_unchanged():
    routing = random_routing()
    modality = random_modality(48)
    for policy in all_policies(0.3):
        weights, ids = policy(routing, modality, 2)
        dropped = ids == SKIP
        assert 0 < dropped.sum() < dropped.numel(), type(policy).__name__
        assert (weights[dropped] == 0).all()
        assert torch.equal(ids[~dropped], routing.ids[~dropped])
        if isinstance(policy, MCMoE):  # renormalised like the official wrapper: the token's total is kept
            lost = dropped.any(1) & ~dropped.all(1)
            torch.testing.assert_close(weights[lost].sum(1), routing.weights[lost].sum(1))
            ratio = weights[~dropped] / routing.weights[~dropped]  # one factor per token
            assert ratio.min() >= 1.0
            continue
        # not renormalised: a kept slot has exactly its original (Kimi-scaled) weight and id
        assert torch.equal(weights[~dropped], routing.weights[~dropped])
        assert weights.dtype == torch.float32 and ids.dtype == torch.int64


def test_policies_compile_without_graph_breaks():
    # fullgraph=True turns any host sync (.item(), nonzero, data-dependent shapes) into an error
    routing = random_routing()
    modality = random_modality(48)
    for policy in all_policies(0.3):
        compiled = torch.compile(policy, backend="eager", fullgraph=True)
        for got, want in zip(compiled(routing, modality, 1), policy(routing, modality, 1)):
            assert torch.equal(got, want), type(policy).__name__


# -----------------------------------------------------------------------------
# hand-worked examples from modes.md


def test_modes_gmlg_dmt_by_hand():
    # layer 1: alpha_text 0.5, alpha_vision 0.25; every token has pi_hat = (0.5, 0.25, 0.125, 0.125)
    # text:   s = 0.5  * pi = (0.25, 0.125, 0.0625, 0.0625) vs tau_text 0.125
    #         -> keep, keep (0.125 is not < 0.125: strict), drop, drop
    # vision: s = 0.25 * pi = (0.125, 0.0625, 0.03125, 0.03125) vs tau_vision 0.05 -> keep, keep, drop, drop
    # special: never dropped
    pi = [0.5, 0.25, 0.125, 0.125]
    routing = hand_routing([pi, pi, pi])
    modality = torch.tensor([TEXT, VISION, SPECIAL])
    alpha = torch.tensor([[1.0, 1.0], [0.5, 0.25]])
    weights, ids = MoDES(0.125, 0.05, alpha)(routing, modality, 1)
    assert kept(ids) == [[True, True, False, False], [True, True, False, False], [True] * 4]
    assert weights[0].tolist() == pytest.approx([0.5 * KIMI_SCALE, 0.25 * KIMI_SCALE, 0, 0])
    # vision tau 0.0625 equals the second vision score, which is kept: s < tau is strict
    assert kept(MoDES(0.125, 0.0625, alpha)(routing, modality, 1)[1])[1] == [True, True, False, False]
    # Eq. 4 single alpha [L] = (1, 0.5): vision s = (0.25, 0.125, 0.0625, 0.0625), nothing below 0.05
    assert kept(MoDES(0.125, 0.05, torch.tensor([1.0, 0.5]))(routing, modality, 1)[1])[1] == [True] * 4
    # layer 0 alpha 1: text s = pi, only 0.125 < 0.13 -> drop the last two
    assert kept(MoDES(0.13, 0.0, alpha)(routing, modality, 0)[1])[0] == [True, True, False, False]
    # DMT without alpha, s = pi: text 0.25 < 0.26 drops 3 slots, vision 0.125 < 0.13 drops 2
    assert kept(DMT(0.26, 0.13)(routing, modality, 0)[1])[:2] == \
        [[True, False, False, False], [True, True, False, False]]
    # one tau for both modalities: 0.26 drops everything below 0.26 in text and vision alike
    assert kept(Threshold(0.26)(routing, modality, 0)[1])[:2] == [[True, False, False, False]] * 2


def test_full_softmax_option_by_hand():
    # probs at the top-4 = (0.4, 0.2, 0.1, 0.05), mass 0.75 -> pi_hat = (0.533, 0.267, 0.133, 0.067)
    # tau 0.12: full softmax drops 0.1 and 0.05; pi_hat drops only 0.067
    probs = torch.tensor([[0.4, 0.2, 0.1, 0.05, 0.25]])
    routing = hand_routing([[0.4 / 0.75, 0.2 / 0.75, 0.1 / 0.75, 0.05 / 0.75]], probs=probs)
    modality = torch.tensor([TEXT])
    assert kept(Threshold(0.12)(routing, modality, 0)[1]) == [[True, True, True, False]]
    assert kept(Threshold(0.12, use_full_softmax=True)(routing, modality, 0)[1]) == [[True, True, False, False]]


def test_reduce_k_by_hand():
    # text keeps its first 2 slots, vision its first 1, special all 4
    routing = hand_routing([[0.4, 0.3, 0.2, 0.1]] * 3)
    ids = ReduceK(2, k_vision=1)(routing, torch.tensor([TEXT, VISION, SPECIAL]), 0)[1]
    assert kept(ids) == [[True, True, False, False], [True, False, False, False], [True] * 4]


def test_naee_tail_rule_by_hand():
    # slots carry pi_hat (0.125, 0.5, 0.25, 0.125) -> sorted (0.5, 0.25, 0.125, 0.125) from slots (1, 2, 0, 3)
    # tails = (1, 0.5, 0.25, 0.125); beta 0.3 -> ranks with tail < 0.3 * 1: ranks 3, 4 = slots 0 and 3
    # beta 0.6 -> tail 0.5 < 0.6 too: only the top slot (1) survives
    routing = hand_routing([[0.125, 0.5, 0.25, 0.125]], ids_rows=[[7, 3, 9, 1]])
    modality = torch.tensor([TEXT])
    assert kept(NAEE(0.3)(routing, modality, 0)[1]) == [[False, True, True, False]]
    assert kept(NAEE(0.6)(routing, modality, 0)[1]) == [[False, True, False, False]]
    # beta per layer: layer 0 has beta 0, nothing dropped
    assert kept(NAEE(torch.tensor([0.0, 0.3]))(routing, modality, 0)[1]) == [[True] * 4]


def test_mcmoe_protection_by_hand():
    # 5 text tokens, pi_hat (0.5, 0.25, 0.125, 0.125): NAEE beta 0.3 drops the last 2 slots of each
    # importance (3, 1, 5, 2, 4): protect int(0.2 * 5) = 1 token -> token 2 (5) keeps all 4 slots
    # drop int(0.4 * 5) = 2 tokens -> tokens 1 (1) and 3 (2) lose all slots
    pi = [0.5, 0.25, 0.125, 0.125]
    importance = torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0])
    routing = hand_routing([pi] * 5)
    modality = torch.full((5,), TEXT)
    naee = [True, True, False, False]
    policy = MCMoE(0.3, protect_frac=0.2, drop_frac=0.4)
    policy.importance = importance
    assert kept(policy(routing, modality, 0)[1]) == [naee, [False] * 4, [True] * 4, [False] * 4, naee]
    # protection wins over dropping: drop everything, protect the top one
    policy = MCMoE(0.3, protect_frac=0.2, drop_frac=1.0)
    policy.importance = importance
    assert kept(policy(routing, modality, 0)[1]) == [[False] * 4, [False] * 4, [True] * 4, [False] * 4, [False] * 4]
    # decode (no importance): plain NAEE rule
    assert kept(MCMoE(0.3, protect_frac=0.2, drop_frac=0.4)(routing, modality, 0)[1]) == [naee] * 5


def test_mcmoe_ranks_per_sequence_and_renormalises():
    # two sequences of 5 slots, the second left-padded by 2 (importance -inf): each is ranked on its own real
    # tokens. Row 0 as in the hand example above; row 1 has 3 real tokens (6, 8, 7): protect int(0.2 * 3) = 0,
    # drop int(0.4 * 3) = 1 -> its least important real token (6) loses all slots, no padding slot is "dropped"
    pi = [0.5, 0.25, 0.125, 0.125]
    inf = float("-inf")
    importance = torch.tensor([[3.0, 1.0, 5.0, 2.0, 4.0], [inf, inf, 6.0, 8.0, 7.0]])
    routing = hand_routing([pi] * 10)
    modality = torch.full((10,), TEXT)
    naee = [True, True, False, False]
    policy = MCMoE(0.3, protect_frac=0.2, drop_frac=0.4)
    policy.importance = importance
    weights, ids = policy(routing, modality, 0)
    assert kept(ids) == [naee, [False] * 4, [True] * 4, [False] * 4, naee, naee, naee, [False] * 4, naee, naee]
    # kept weights are renormalised to the routing's total (KIMI_SCALE here): 0.5, 0.25 -> 2/3, 1/3; a row with nothing kept
    # stays all zero
    torch.testing.assert_close(weights[0], torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]) * KIMI_SCALE)
    torch.testing.assert_close(weights[2], torch.tensor(pi) * KIMI_SCALE)
    assert weights[1].abs().sum() == 0
    # the same sequence alone, unpadded, gets the same decisions: the batch changes nothing
    alone = MCMoE(0.3, protect_frac=0.2, drop_frac=0.4)
    alone.importance = torch.tensor([6.0, 8.0, 7.0])
    assert kept(alone(hand_routing([pi] * 3), torch.full((3,), TEXT), 0)[1]) == kept(ids)[7:]


def test_diep_by_hand():
    # sorted experts (0, 1, 2, 3) with pi (0.5, 0.25, 0.125, 0.125), tails (1, 0.5, 0.25, 0.125), beta 0.3
    # gamma(0, 1) = 2.5, gamma(0, 2) = 0.5, gamma(0, 3) = 0.1, gamma(0, 0) = 5:
    #   rank 1 is tested against beta alone: 1 < 0.3 no (gamma(0, 0) is never used)
    #   rank 2: 0.5 < 0.3 * 2.5 = 0.75 yes -> ranks 2..4 all dropped, although rank 3 (0.25 < 0.15) and rank 4
    #   (0.125 < 0.03) fail on their own; NAEE alone would drop ranks 3..4
    # gamma(0, 1) = 1, gamma(0, 2) = 0.5, gamma(0, 3) = 1: 0.5 < 0.3 no, 0.25 < 0.15 no, 0.125 < 0.3 yes -> rank 4
    routing = hand_routing([[0.5, 0.25, 0.125, 0.125]], E=4)
    modality = torch.tensor([TEXT])
    similar = torch.ones(1, 4, 4)
    similar[0, 0, :] = torch.tensor([5.0, 2.5, 0.5, 0.1])
    assert kept(DiEP(0.3, similar)(routing, modality, 0)[1]) == [[True, False, False, False]]
    dissimilar = torch.ones(1, 4, 4)
    dissimilar[0, 0, 2] = 0.5
    assert kept(DiEP(0.3, dissimilar)(routing, modality, 0)[1]) == [[True, True, True, False]]


def test_diep_gamma_by_hand():
    # off-diagonal CKA (0.2, 0.4, 0.6) twice -> mean 2.4 / 6 = 0.4; gamma = cka / 0.4. An all-zero layer -> ones.
    cka = torch.tensor([[[1.0, 0.2, 0.4], [0.2, 1.0, 0.6], [0.4, 0.6, 1.0]], [[0.0] * 3] * 3])
    want = torch.tensor([[[2.5, 0.5, 1.0], [0.5, 2.5, 1.5], [1.0, 1.5, 2.5]], [[1.0] * 3] * 3])
    torch.testing.assert_close(diep_gamma(cka), want)


def test_threshold_grid_matches_spec_values():
    # modes.md §5.3, computed independently there: text x in [0, 0.71], vision x in [0, 0.6], D = 100, c = 10
    text, vision = threshold_grid(100, 0.71), threshold_grid(100, 0.6)
    for got, want in [(text[0], 9.08e-5), (text[10], 1.86e-4), (text[50], 3.27e-3), (text[90], 5.61e-2),
                      (text[99], 0.1043), (vision[99], 0.0360)]:
        assert float(got) == pytest.approx(want, rel=2e-3)
    assert (text.diff() > 0).all()
    assert float(threshold_grid(3, 1.0)[-1]) == pytest.approx(1.0)  # 2 * sigmoid(0)
    assert threshold_grid(3, 1.0, mapping="linear").tolist() == [0.0, 0.5, 1.0]


# -----------------------------------------------------------------------------
# SkipStats


def record_fixture(stats):
    # layer 0, prefill, 6 tokens x K=4:
    #   text    [3, -1, 5, -1]  2 dropped     vision [-1, -1, -1, -1] 4     vision [1, 2, -1, 4] 1
    #   special [1, 2, 3, 4]    0 (counted)   text pad, vision pad: excluded
    # -> text 2/4, vision 5/8, all 7/16 (4 + 8 + 4 special slots)
    ids = torch.tensor([[3, -1, 5, -1], [-1] * 4, [1, 2, -1, 4], [1, 2, 3, 4], [-1] * 4, [-1] * 4])
    modality = torch.tensor([TEXT, VISION, VISION, SPECIAL, TEXT, VISION])
    stats.record(0, ids, modality, torch.tensor([True, True, True, True, False, False]), "prefill")
    # layer 2, decode, batch of 2 one-token rows: text [-1, 2, 3, 4] 1 dropped, special 0 -> text 1/4, all 1/8
    stats.record(2, torch.tensor([[-1, 2, 3, 4], [1, 2, 3, 4]]), torch.tensor([TEXT, SPECIAL]),
                 torch.ones(2, dtype=torch.bool), "decode")


def test_skip_stats_hand_count():
    stats = SkipStats(n_layers=3)
    record_fixture(stats)
    s = stats.summary()
    assert (s["prefill"]["text"], s["prefill"]["vision"], s["prefill"]["all"]) == (2 / 4, 5 / 8, 7 / 16)
    assert (s["prefill"]["skipped"], s["prefill"]["slots"]) == (7, 16)
    assert (s["decode"]["text"], s["decode"]["vision"], s["decode"]["all"]) == (1 / 4, None, 1 / 8)
    assert (s["total"]["all"], s["total"]["text"]) == (8 / 24, 3 / 8)
    # the second denominator leaves out the special slots: (2 + 5) skipped of 4 + 8 text and vision slots
    assert (s["prefill"]["text_vision"], s["decode"]["text_vision"]) == (7 / 12, 1 / 4)
    assert s["prefill"]["per_layer"]["all"] == [7 / 16, None, None]
    assert s["decode"]["per_layer"]["text"] == [None, None, 1 / 4]


def test_skip_stats_reset():
    stats = SkipStats(3)
    record_fixture(stats)
    assert stats.summary()["total"]["slots"] == 24
    stats.reset()
    assert stats.summary()["total"]["all"] is None


# -----------------------------------------------------------------------------
# install / uninstall on a fake model: the config says which layers are MoE layers


class FakeMoE(MoE):
    """model.MoE's policy switch (set_policy) without experts: forward applies the policy to a given routing."""

    def __init__(self, layer_idx, E=16):
        super().__init__(layer_idx, None, None)
        self.gate = nn.Linear(2, E, bias=False)  # install counts the experts by the gate's rows

    def forward(self, routing, modality):
        if self.policy is None:
            return routing.weights, routing.ids
        return self.policy(routing, modality, self.layer_idx)


class FakeLayer(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp


class FakeModel(nn.Module):
    moe_layers = VisionLanguageModel.moe_layers  # the real model's rule: the layers the config makes MoE

    def __init__(self, device="cpu"):
        super().__init__()
        self.cfg = type("Cfg", (), {"is_moe_layer": staticmethod(lambda i: i >= 1)})()  # layer 0 is dense
        self.layers = DecoderLayers([FakeLayer(nn.Linear(2, 2)), FakeLayer(FakeMoE(1)), FakeLayer(FakeMoE(2))])
        self.lm_head = nn.Linear(2, 2, device=device)


def test_install_and_uninstall():
    model = FakeModel()
    routing = hand_routing([[0.5, 0.25, 0.125, 0.125]])
    modality = torch.tensor([TEXT])
    shared = Threshold(0.2)
    assert install(model, shared) is model
    assert model.layers[1].mlp.policy is shared and model.layers[2].mlp.policy is shared
    assert kept(model.layers[1].mlp(routing, modality)[1]) == [[True, True, False, False]]
    install(model, lambda layer_idx: NAEE(0.6) if layer_idx == 2 else None)
    assert model.layers[1].mlp.policy is None and isinstance(model.layers[2].mlp.policy, NAEE)
    assert kept(model.layers[2].mlp(routing, modality)[1]) == [[True, False, False, False]]
    # a policy follows the model to its device
    on_meta = FakeModel("meta")
    install(on_meta, lambda layer_idx: DMT(0.1, 0.1))
    assert on_meta.layers[1].mlp.policy.tau.device.type == "meta"
    uninstall(model)
    assert all(layer.mlp.policy is None for layer in model.layers[1:])
    assert kept(model.layers[2].mlp(routing, modality)[1]) == [[True] * 4]


def test_install_puts_a_policys_wrapper_around_the_layer_and_the_next_install_takes_it_off():
    # MC-MoE needs its token importance: install wraps each MoE decoder layer in its TokenImportance
    model = FakeModel()
    layers = list(model.layers)
    policy = MCMoE(0.3)
    install(model, policy)
    assert not isinstance(model.layers[0], Wrapper)  # the dense layer has no policy, so no wrapper
    for i in (1, 2):
        assert isinstance(model.layers[i], TokenImportance) and model.layers[i].policy is policy
        assert model.layers.layer(i) is layers[i] and layers[i].mlp.policy is policy
    install(model, Threshold(0.2))  # another policy: the wrappers go, the new policy is set
    assert list(model.layers) == layers and layers[1].mlp.policy is not policy
    install(model, policy)
    uninstall(model)
    assert list(model.layers) == layers and all(layer.mlp.policy is None for layer in layers[1:])


def test_install_checks_the_policy_against_the_model_once():
    cases = [
        (lambda layer_idx: 0.5, "layer 1"),
        (MoDES(0.1, 0.1, torch.ones(4, 2)), "alpha has 4 rows, the model has 3 decoder layers"),
        (NAEE(torch.ones(2)), "beta has 2 rows"),
        (DiEP(0.3, torch.ones(3, 8, 8)), "gamma has 8 experts, the model has 16"),
        (MoDES(0.1, 0.1, torch.ones(3, 2)).to(torch.bfloat16), "cast to torch.bfloat16"),
    ]
    for policy, culprit in cases:
        with pytest.raises(ValueError, match=culprit):
            install(FakeModel(), policy)


# -----------------------------------------------------------------------------
# bad input to policies and Routing


def test_policy_bad_input():
    cases = [
        (lambda: DMT(float("nan"), 0.1), "tau"),
        (lambda: DMT(0.1, -0.1), "tau"),
        (lambda: Threshold(float("inf")), "tau"),
        (lambda: MoDES(0.1, 0.1, torch.ones(4, 3)), "alpha"),
        (lambda: MoDES(0.1, 0.1, -torch.ones(4, 2)), "alpha"),
        (lambda: MoDES(0.1, 0.1, torch.full((4, 2), float("nan"))), "alpha"),
        (lambda: MoDES(0.1, 0.1, None), "alpha"),
        (lambda: ReduceK(-1), "k"),
        (lambda: NAEE(torch.ones(2, 2)), "beta"),
        (lambda: MCMoE(0.3, protect_frac=1.5), "protect_frac"),
        (lambda: DiEP(0.3, torch.ones(2, 4, 5)), "gamma"),
        (lambda: diep_gamma(torch.ones(4, 4)), "cka"),
        (lambda: threshold_grid(0), "n"),
        (lambda: threshold_grid(10, mapping="log"), "mapping"),
        (lambda: threshold_grid(10, x_max=0.1, x_min=0.5), "x_min"),
    ]
    for make, culprit in cases:
        with pytest.raises(ValueError, match=culprit):
            make()


# -----------------------------------------------------------------------------
# alpha and thresholds files: one line naming the file and the field, checked before any weights load


@pytest.fixture(scope="module")
def skeleton():
    """tiny-qwen's architecture on the meta device (no weights): what the scripts check these files against."""
    from model import build, config_from_dict
    from support import tiny
    return build(config_from_dict(tiny.qwen_config(), "tiny-qwen"), "meta")


def documents(model):
    """A valid (alpha, thresholds) pair for model."""
    rows = [dict(layer=i, text=0.25, vision=0.25) for i in model.moe_layers()]
    made_for = dict(fingerprint=router.fingerprint(model))
    return (dict(format=router.ALPHA_FORMAT, model=made_for, layers=rows),
            dict(format=router.THRESHOLDS_FORMAT, model=made_for, tau=dict(text=0.1, vision=0.2), layers=rows))


def write(tmp_path, doc):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc))  # NaN is written as the bare NaN that Python's json reads back
    return str(path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.pop("layers"), r"'layers' must be a list"),
    (lambda d: d["layers"][1].pop("vision"), r"layers\[1\]\.vision must be a number >= 0, finite in fp32, got None"),
    (lambda d: d["layers"][1].update(text=float("nan")), r"layers\[1\]\.text .* got nan"),
    (lambda d: d["layers"][1].update(text=-0.5), r"layers\[1\]\.text .* got -0\.5"),
    (lambda d: d["layers"][1].update(text=1e300), r"layers\[1\]\.text .* got 1e\+300"),
    (lambda d: d["layers"][1].update(text=True), r"layers\[1\]\.text .* got True"),
    (lambda d: d["layers"][1].update(layer=99), r"layers\[1\]\.layer 99 is not an MoE layer of this model \(0\.\.3\)"),
    (lambda d: d["layers"][1].update(layer="1"), r"layers\[1\]\.layer must be an integer"),
    (lambda d: d["layers"].pop(), r"no alpha for MoE layer\(s\) 3; every MoE layer needs one"),
    (lambda d: d["layers"].append(dict(d["layers"][0])), r"layers\[4\]: layer 0 is listed twice"),
    (lambda d: d.update(format="modes-thresholds/1"), r"not an alpha file"),
    (lambda d: d["model"].update(fingerprint="0" * 64), r"made for another model"),
    (lambda d: d.pop("model"), r"made for another model"),
])
def test_alpha_file_problems_name_the_file_and_field(skeleton, tmp_path, damage, message):
    alpha, _ = documents(skeleton)
    assert router.alpha_table(router.load_alpha(write(tmp_path, alpha), skeleton), skeleton, "alpha").sum() == 2.0
    damage(alpha)
    path = write(tmp_path, alpha)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: {message}"):
        router.load_alpha(path, skeleton)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.pop("tau"), r"'tau' must be an object \{text, vision\}"),
    (lambda d: d["tau"].pop("vision"), r"tau\.vision must be a number >= 0, finite in fp32, got None"),
    (lambda d: d["tau"].update(text=-0.1), r"tau\.text .* got -0\.1"),
    (lambda d: d["tau"].update(text=float("inf")), r"tau\.text .* got inf"),
    (lambda d: d["tau"].update(text="0.1"), r"tau\.text .* got '0\.1'"),
    (lambda d: d["layers"].pop(1), r"no alpha for MoE layer\(s\) 1"),
    (lambda d: d.update(format=router.ALPHA_FORMAT), r"not a thresholds file"),
])
def test_thresholds_file_problems_name_the_file_and_field(skeleton, tmp_path, damage, message):
    _, thresholds = documents(skeleton)
    assert router.load_thresholds(write(tmp_path, thresholds), skeleton).tau.tolist() == pytest.approx([0.1, 0.2])
    damage(thresholds)
    path = write(tmp_path, thresholds)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: {message}"):
        router.load_thresholds(path, skeleton)


def test_unreadable_files_are_one_line(skeleton, tmp_path):
    cases = [(tmp_path / "missing.json", FileNotFoundError, "thresholds file not found: "),
             (tmp_path, IsADirectoryError, "thresholds file .*: is a folder"),
             (tmp_path / "list.json", ValueError, r"list\.json: expected a JSON object \(thresholds file\), got a "
                                                   r"list"),
             (tmp_path / "cut.json", ValueError, r"cut\.json: invalid JSON at line 1"),
             (tmp_path / "latin1.json", ValueError, r"latin1\.json: not UTF-8 text")]
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "cut.json").write_text('{"format": ')
    (tmp_path / "latin1.json").write_bytes(b'{"format": "\xe9"}')
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            router.load_thresholds(str(path), skeleton)


def test_constants_match_shared_conventions():
    assert (SKIP, TEXT, VISION, SPECIAL) == (-1, 0, 1, 2)
