"""MoDES's skip rule on InternVL-3.5, both decoders, against a hand-computed oracle on one MoE layer (issue 23).

For tiny-internvl (Qwen3-MoE decoder) and tiny-internvl-gpt-oss, loaded in fp32 as the scripts load them, a
thresholds file is made the way a user makes one (search.py run as a command, calibrating alpha first), then its
tau values are edited so that the chosen layer skips some but not all slots of both text and vision tokens (the
searched ones skip no text slot on these random models), and the file is loaded with router.load_thresholds and
installed. One prefill of a real chat prompt with an image (text, <IMG_CONTEXT> and template tokens all present)
is run with forward hooks on the layer's MoE block, and its output is recomputed in plain torch from the block's
captured input and the weights in the model's parameters: router logits, softmax, top-k, pi_hat renormalised over
the top-k, the score alpha[layer, modality] * pi_hat with alpha and tau read from the JSON file, the modality of
each token taken from the input ids and the processor's special / image ids, the strict s < tau rule with special
tokens exempt, and the sum over the kept slots of the mixing weight times the expert's output (SwiGLU for Qwen3-MoE;
for gpt-oss biases and the clamped GLU with the config's alpha and limit, weights the softmax over the selected
logits). The project's router, MoE block and expert code are not used by the oracle, so a mistake in any of them
(a wrong modality column, a renormalisation, a kept weight rescaled, a special token skipped, a bias dropped) shows.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import model
import processor
import router
from support import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "shape.png")
LAYER = 1  # the second MoE layer: its input already went through a skipping layer
TEXT, VISION, SPECIAL = 0, 1, 2  # the order of router.SkipStats' modality axis (model.TEXT, ...), fixed by the format


def searched_thresholds(name, tmp):
    """A thresholds file as a user makes one: search.py on the built-in data at tiny sizes (it calibrates alpha
    first, since the --alpha file does not exist yet)."""
    out, alpha = tmp / "thresholds.json", tmp / "alpha.json"
    r = subprocess.run([sys.executable, "search.py", "--model", name, "--n", "2", "--batch-size", "2", "--grid", "5",
                        "--target", "0.5", "--quiet", "--threads", "1", "--alpha", str(alpha), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def modality_of(ids, proc):
    """TEXT / VISION / SPECIAL per token, from the ids alone: the image context pads are vision, the tokens the
    tokenizer marks special (template tokens, <img>, </img>) are special, the rest is text."""
    special = torch.tensor(sorted(set(proc.special_ids) - {proc.image_token_id}))
    m = torch.full_like(ids, TEXT)
    m[(ids[:, None] == special).any(-1)] = SPECIAL
    m[ids == proc.image_token_id] = VISION
    return m


def oracle_routing(x, mlp, gpt_oss, k):
    """(ids [T, K], pi_hat [T, K], mixing weights [T, K]) of the layer's router, from its weights."""
    if gpt_oss:
        logits = x @ mlp.router.weight.T + mlp.router.bias
        top_logits, ids = logits.topk(k, dim=-1)
        weights = torch.exp(top_logits - top_logits.max(-1, keepdim=True).values)
        weights = weights / weights.sum(-1, keepdim=True)  # softmax over the k selected logits
    else:
        logits = x @ mlp.gate.weight.T
    probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)  # [T, E]
    top, top_ids = probs.topk(k, dim=-1)
    pi_hat = top / top.sum(-1, keepdim=True)  # Routing.pi_hat: the top-k probabilities renormalised to sum 1
    if gpt_oss:
        # the softmax over the selected logits is the full softmax renormalised to the top-k: the same slots, the
        # same numbers, so pi_hat is also gpt-oss's mixing weight
        assert torch.equal(top_ids.sort(-1).values, ids.sort(-1).values)
        torch.testing.assert_close(weights, pi_hat, rtol=1e-6, atol=1e-7)
        return ids, pi_hat, weights
    return top_ids, pi_hat, pi_hat  # Qwen3-MoE with norm_topk_prob: the renormalised weights mix the experts


def expert_outputs(x, experts, ids, gpt_oss, clamp):
    """[T, K, H]: the output of expert ids[t, k] on x[t], from the stacked tensors (gate rows, then up rows)."""
    I = experts.down_proj.shape[-1]
    out = []
    for k in range(ids.shape[1]):
        e = ids[:, k]
        h = torch.einsum("toh,th->to", experts.gate_up_proj[e], x)  # [T, 2I]
        if gpt_oss:
            alpha, limit = clamp
            h = h + experts.gate_up_proj_bias[e]
            gate, up = h[:, :I].clamp(max=limit), h[:, I:].clamp(min=-limit, max=limit)
            act = (up + 1) * gate * torch.sigmoid(alpha * gate)
        else:
            gate, up = h[:, :I], h[:, I:]
            act = gate * torch.sigmoid(gate) * up
        y = torch.einsum("thi,ti->th", experts.down_proj[e], act)
        out.append(y + experts.down_proj_bias[e] if gpt_oss else y)
    return torch.stack(out, 1)


def scores(pi_hat, modality, doc):
    """s = alpha[LAYER, modality] * pi_hat with alpha read from the file's rows; special rows get the text column
    (they are never skipped, so it only matters for showing that they would have been)."""
    row = next(r for r in doc["layers"] if r["layer"] == LAYER)
    alpha = torch.tensor([row["text"], row["vision"]], dtype=torch.float32)
    return alpha[modality.clamp(max=VISION)][:, None] * pi_hat


def midpoint_tau(s):
    """A threshold halfway between the two middle scores: about half the slots skipped, none near the boundary."""
    v = s.flatten().sort().values
    n = len(v) // 2
    return float((v[n - 1] + v[n]) / 2)


class Capture:
    """Forward hook on the MoE block: its input hidden states and its output, as the layer loop ran it."""

    def __init__(self, block):
        self.handle = block.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.x, self.y = args[0].detach().clone(), output.detach().clone()


@pytest.mark.parametrize("name", ["tiny-internvl", "tiny-internvl-gpt-oss"])
def test_one_layer_matches_hand_computed_skip_rule(name, tmp_path):
    folder = tiny.resolve(name)
    searched = searched_thresholds(name, tmp_path)
    # loaded as calibrate.load_model does: fp32, the tokenizer's special ids, the "auto" expert path
    net = model.set_expert_impl(model.load(folder, "cpu", torch.float32,
                                           special_ids=processor.special_token_ids(folder)), "auto")
    proc = processor.for_model(folder, net.cfg.model_type)
    raw = json.load(open(os.path.join(folder, "config.json")))
    text_cfg = raw["text_config"]
    gpt_oss = text_cfg["model_type"] == "gpt_oss"
    assert gpt_oss == (name == "tiny-internvl-gpt-oss") and raw["image_token_id"] == proc.image_token_id
    assert gpt_oss or text_cfg["norm_topk_prob"]  # Qwen3-MoE mixes with the renormalised top-k weights
    k = text_cfg["num_experts_per_tok"]
    # gpt-oss's clamped GLU: alpha and limit from the config, absent keys at configuration_gpt_oss.py's defaults
    clamp = (text_cfg.get("swiglu_alpha", 1.702), text_cfg.get("swiglu_limit", 7.0))

    prompt = proc.from_cli("What is in this image? Answer in one short sentence.", images=[IMAGE])
    ids, pixels = prompt["input_ids"], prompt["pixel_values"]
    modality = modality_of(ids, proc)
    assert all((modality == m).any() for m in (TEXT, VISION, SPECIAL))
    block = net.layers.layer(LAYER).mlp
    assert LAYER in net.moe_layers() and isinstance(block, model.MoE)
    capture = Capture(block)

    def prefill(policy):
        router.install(net, policy)
        stats = router.SkipStats(len(net.layers))
        with torch.no_grad():
            net(ids[None], pixel_values=pixels, stats=stats)
        return stats

    # The searched tau skip no text slot here, so the file is rewritten with thresholds at the middle of this
    # layer's text and vision scores in the unskipped model. Skipping in layer 0 changes this layer's input a
    # little; the assertions below check that the split survives it.
    prefill(None)
    x = capture.x.reshape(-1, capture.x.shape[-1])
    _, pi_hat, _ = oracle_routing(x, block, gpt_oss, k)
    s = scores(pi_hat, modality, searched)
    doc = dict(searched, tau=dict(text=midpoint_tau(s[modality == TEXT]), vision=midpoint_tau(s[modality == VISION])))
    edited = tmp_path / "thresholds-edited.json"
    edited.write_text(json.dumps(doc))
    stats = prefill(router.load_thresholds(str(edited), net))
    capture.handle.remove()

    # the oracle, on the block's input as the skipping model computed it
    x = capture.x.reshape(-1, capture.x.shape[-1])
    ids_k, pi_hat, weights = oracle_routing(x, block, gpt_oss, k)
    s = scores(pi_hat, modality, doc)
    tau = torch.tensor([doc["tau"]["text"], doc["tau"]["vision"]], dtype=torch.float32)[modality.clamp(max=VISION)]
    below = s < tau[:, None]
    skip = below & (modality != SPECIAL)[:, None]
    # a score within float rounding of tau would make the comparison with the project's own arithmetic a coin toss
    assert ((s - tau[:, None]).abs() > 1e-6 * tau[:, None]).all()
    y = expert_outputs(x, block.experts, ids_k, gpt_oss, clamp)  # [T, K, H]
    want = (weights.masked_fill(skip, 0.0)[..., None] * y).sum(1)
    got = capture.y.reshape(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unskipped = (weights[..., None] * y).sum(1)
    assert (got - unskipped).abs().max() > 100 * 1e-5  # the skipping is visible in the output

    for m in (TEXT, VISION):  # some slots of each modality skipped, some kept
        assert skip[modality == m].any() and (~skip[modality == m]).any(), ("text", "vision")[m]
    assert below[modality == SPECIAL].any()  # special tokens would have lost slots: the exemption is exercised
    counts = stats.counts[0, LAYER]  # prefill, this layer: [modality, (skipped, total)]
    hand = [int(skip[modality == m].sum()) for m in (TEXT, VISION, SPECIAL)]
    assert counts[:, 0].tolist() == hand and hand[SPECIAL] == 0
    assert counts[:, 1].tolist() == [int((modality == m).sum()) * k for m in (TEXT, VISION, SPECIAL)]
