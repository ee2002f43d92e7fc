"""One model over several processes (parallel.py's Shard): 2 processes on CPU with gloo against one process, for the
tiny models of every family (InternVL with both decoders). torchrun runs this file as a script (the __main__ block), once: each rank writes what it computed and
what it loaded, then runs generate.py's command line; the tests compare that with the same computation in the test
process, which holds the whole model.
"""
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from baselines import MCMoE, expert_similarity
from calibrate import calibrate
from data import make_batch, synthetic_samples
from generate import generate, main, parser
from model import attention, family, load, read_config
from parallel import Shard
import processor
import router
import search
from support import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
NAMES = ("tiny-qwen", "tiny-kimi", "tiny-internvl", "tiny-internvl-gpt-oss")


def skip_policy(model):
    """MoDES with alpha 1 and thresholds that skip a good part of the slots."""
    return router.MoDES(0.2, 0.25, torch.ones(len(model.layers), 2))


@torch.no_grad()
def compute(name, shard):
    """Logits (every position on the ids the tokenizer has, every id at the last 4 positions), greedy tokens and
    skip counts of a padded two-image batch, with plain top-k, MoDES and MC-MoE (whose token importance comes from
    all heads); calibration's KL sums, DiEP's expert similarity and a search evaluation; what this rank loaded."""
    path = tiny.resolve(name)
    model = load(path, "cpu", torch.float32, shard, processor.special_token_ids(path))  # as the scripts load it
    proc = processor.for_model(path, model.cfg.model_type)
    samples = synthetic_samples(2, size=64)
    batch = make_batch(samples, proc, "cpu", answers=False)
    ids = torch.tensor(sorted(tiny.vocabulary(path)))
    alpha = calibrate(model, proc, samples, batch_size=2, quiet=True)
    out = {"params": {n: tuple(p.shape) for n, p in model.named_parameters()},
           "kl_sum": torch.tensor([[row["text"], row["vision"]] for row in alpha["kl_sum"]]),
           "cka": expert_similarity(model, proc, samples, batch_size=2),
           "score": search.Evaluator(model, proc, samples, quiet=True).score(skip_policy(model))}
    for tag, policy in (("top-k", None), ("modes", skip_policy(model)), ("mc-moe", MCMoE(0.3))):
        router.install(model, policy)
        stats = router.SkipStats(len(model.layers))
        logits = model(batch.input_ids, batch.attention_mask, stats=stats, **batch.pixels)  # [B, S, V]
        out[tag] = dict(logits=logits[..., ids], last=logits[:, -4:].clone(),
                        tokens=generate(model, batch.input_ids, batch.attention_mask, max_new_tokens=6,
                                          stats=stats, **batch.pixels) if tag != "mc-moe" else None,
                        counts=stats.counts.clone())
    router.uninstall(model)
    experts, attn = model.layers[1].mlp.experts, model.layers[1].self_attn
    out["own"] = dict(first=experts.first, gate_up_proj=experts.gate_up_proj.clone(),
                      embed_rows=model.embed_tokens.weight[[0, -1]].clone(),
                      heads=(attn.kv_b_proj if name == "tiny-kimi" else attn.k_proj).weight.clone())
    return out


def load_memory(name, shard):
    """(growth of the peak RSS while this rank loads its part, bytes of its parameters, bytes of the whole model's)
    in fp32; first thing in a fresh process."""
    cfg = read_config(tiny.resolve(name))
    with torch.device("meta"):  # the first meta build imports torch's meta kernels: not part of loading
        whole = family(cfg.model_type, "test").MODEL(cfg)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = load(tiny.resolve(name), "cpu", torch.float32, shard)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return grew, sum(p.numel() * 4 for p in model.parameters()), sum(p.numel() * 4 for p in whole.parameters())


def cli_args(folder):
    return ["--model", "tiny-kimi", "--prompt", "what is shown?", "--thresholds", os.path.join(folder, "thr.json"),
            "--max-new-tokens", "6", "--json"]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """(folder, stdout) of one torchrun run of the __main__ block with 2 ranks. The folder holds a thresholds file
    made for the whole tiny-kimi (its fingerprint is the whole model's) and what each rank wrote."""
    for name in NAMES:
        tiny.resolve(name)  # written once here, so the ranks do not race to write it
    out = str(tmp_path_factory.mktemp("dist"))
    model = load(tiny.resolve("tiny-kimi"), "cpu", torch.float32)
    doc = dict(format=router.THRESHOLDS_FORMAT, model=dict(fingerprint=router.fingerprint(model)),
               tau=dict(text=0.2, vision=0.25),
               layers=[dict(layer=i, text=1.0, vision=1.0) for i in model.moe_layers()])
    with open(os.path.join(out, "thr.json"), "w") as f:
        json.dump(doc, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                          __file__, out], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, "\n".join(line for line in run.stderr.splitlines() if line.startswith("[rank0]"))
    return out, run.stdout


@pytest.fixture(scope="module")
def ranks(launch):
    """What each of the 2 ranks computed."""
    return [torch.load(os.path.join(launch[0], f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def whole():
    """The same computations with the whole model, in this process."""
    return {name: compute(name, Shard()) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tag", ["top-k", "modes", "mc-moe"])
def test_logits_tokens_and_skips_equal_one_process(ranks, whole, name, tag):
    one = whole[name][tag]
    for r, rank in enumerate(ranks):
        got = rank[name][tag]
        for key in ("logits", "last"):
            diff = (got[key] - one[key]).abs().max().item()
            print(f"{name} {tag} rank {r} {key}: max |logit difference| {diff:.3g} (logits up to "
                  f"{one[key].abs().max().item():.3g})")
            torch.testing.assert_close(got[key], one[key], rtol=1e-4, atol=1e-4)  # fp32 sums in another order
        assert got["tokens"] is None or torch.equal(got["tokens"], one["tokens"])
        assert torch.equal(got["counts"], one["counts"])  # counted once per rank, not summed over ranks
    if tag == "modes":
        skipped, total = one["counts"][0, :, :, 0].sum(), one["counts"][0, :, :, 1].sum()
        assert 0.05 < skipped / total < 0.9, "the thresholds should skip a fair share of the prefill slots"


@pytest.mark.parametrize("name", NAMES)
def test_calibration_similarity_and_search_equal_one_process(ranks, whole, name):
    one = whole[name]
    for rank in ranks:
        got = rank[name]
        print(f"{name}: KL sums {one['kl_sum'].flatten().tolist()}, max |difference| "
              f"{(got['kl_sum'] - one['kl_sum']).abs().max().item():.3g}; CKA max |difference| "
              f"{(got['cka'] - one['cka']).abs().max().item():.3g}")
        torch.testing.assert_close(got["kl_sum"], one["kl_sum"], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(got["cka"], one["cka"], rtol=1e-4, atol=1e-5)
        assert got["score"]["skip"] == one["score"]["skip"] and got["score"]["top1"] == one["score"]["top1"]
        assert got["score"]["kl"] == pytest.approx(one["score"]["kl"], rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_loads_only_its_part(ranks, whole, name):
    path = tiny.resolve(name)
    cfg = read_config(path)
    E = cfg.n_routed_experts if name == "tiny-kimi" else cfg.num_experts
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        embed = f.get_tensor(next(n for n in f.keys() if n.endswith("embed_tokens.weight")))
        for r, rank in enumerate(ranks):
            own = rank[name]["own"]
            # a bias after an all-reduce lives on rank 0 only (gpt-oss's o_proj): the ranks' outputs are summed
            summed_bias = {n for n in whole[name]["params"] if n.endswith("o_proj.bias")} if r > 0 else set()
            assert rank[name]["params"].keys() == whole[name]["params"].keys() - summed_bias
            # routed experts: the contiguous range r * E/2 .. (r + 1) * E/2 - 1, as stored in the checkpoint
            assert own["first"] == r * E // WORLD
            if name == "tiny-qwen":
                stored = f.get_tensor("model.language_model.layers.1.mlp.experts.gate_up_proj")[
                    r * E // WORLD:(r + 1) * E // WORLD].transpose(1, 2)  # the hub stores x @ W
            elif name == "tiny-kimi":
                first = r * E // WORLD
                stored = torch.stack([torch.cat([
                    f.get_tensor(f"language_model.model.layers.1.mlp.experts.{e}.{p}_proj.weight")
                    for p in ("gate", "up")]) for e in range(first, first + E // WORLD)])
            else:  # InternVL: the whole model's experts, this rank's range of them (the layouts: test_internvl_*)
                stored = whole[name]["own"]["gate_up_proj"][r * E // WORLD:(r + 1) * E // WORLD]
            assert torch.equal(own["gate_up_proj"], stored)
            # vocabulary rows r * V/2 .. (r + 1) * V/2 - 1
            V = cfg.vocab_size
            assert torch.equal(own["embed_rows"], embed[[r * V // WORLD, (r + 1) * V // WORLD - 1]])
            # attention heads: Qwen's 2 kv heads, one per rank; Kimi's 4 heads of kv_b_proj, two per rank
            if name == "tiny-qwen":
                k = f.get_tensor("model.language_model.layers.1.self_attn.k_proj.weight")
                assert torch.equal(own["heads"], k.view(2, -1, k.shape[1])[r])
            elif name != "tiny-kimi":  # InternVL's kv heads, split like Qwen's
                k = whole[name]["own"]["heads"]
                assert torch.equal(own["heads"], k.view(cfg.num_key_value_heads, -1, k.shape[1])[r])  # 2 kv heads
            else:
                kv_b = f.get_tensor("language_model.model.layers.1.self_attn.kv_b_proj.weight")
                assert torch.equal(own["heads"], kv_b.view(WORLD, -1, kv_b.shape[1])[r])


def test_loading_memory_is_a_rank_share(ranks):
    """A rank's load grows its peak RSS by its share of the parameters plus the file pages it read (safetensors maps
    the file): about half of what loading the whole model takes, parameters plus the whole file (test_loading.py).
    The vocabulary matrices, split by rows, dominate the tiny models."""
    file_bytes = os.path.getsize(os.path.join(tiny.resolve("tiny-qwen"), "model.safetensors"))
    for r, rank in enumerate(ranks):
        grew, loaded, whole_bytes = rank["memory"]
        print(f"rank {r}: {loaded / 2**20:.1f} MiB of the {whole_bytes / 2**20:.1f} MiB of parameters, peak RSS "
              f"grew {grew / 2**20:.1f} MiB (whole model: parameters + file = "
              f"{(whole_bytes + file_bytes) / 2**20:.1f} MiB)")
        assert loaded < 0.55 * whole_bytes
        assert grew < 0.6 * (whole_bytes + file_bytes)


@torch.no_grad()
def test_more_ranks_than_kv_heads():
    """tiny-qwen has 2 kv heads: over 4 ranks each pair of ranks keeps the kv head its query heads use, and the 4
    ranks' partial attention outputs (before the all-reduce, so no processes are needed) sum to the whole one's."""
    path = tiny.resolve("tiny-qwen")
    whole = load(path, "cpu", torch.float32)
    h, ctx = whole.embed(torch.randint(0, 500, (2, 7)))
    total = 0
    for r in range(4):
        attn = load(path, "cpu", torch.float32, Shard(r, 4)).layers[1].self_attn
        q, k, v = attn.project(h, ctx)  # [B, 1, S, d], [B, 1, S, d]
        assert q.shape[1] == 1 and k.shape[1] == 1
        total = total + attn.o_proj(attention(q, k, v, ctx.mask).transpose(1, 2).flatten(2))
    torch.testing.assert_close(total, whole.layers[1].self_attn(h, ctx), rtol=1e-5, atol=1e-5)


def test_generate_py_command_line(launch):
    """generate.py's main under torchrun, with a thresholds file made for the whole model, generates what one process
    does, and rank 0 alone reports."""
    folder, stdout = launch
    assert sum(line.startswith("{") for line in stdout.splitlines()) == 1
    report = json.loads(stdout.splitlines()[-1])
    path = tiny.resolve("tiny-kimi")
    model = load(path, "cpu", torch.float32, special_ids=processor.special_token_ids(path))  # as generate.py does
    router.install(model, router.load_thresholds(os.path.join(folder, "thr.json"), model))
    stats = router.SkipStats(len(model.layers))
    proc = processor.for_model(path, model.cfg.model_type)
    ids = proc.from_cli("what is shown?")["input_ids"][None]
    tokens = generate(model, ids, max_new_tokens=6, stop_ids=proc.stop_token_ids, stats=stats)
    assert report["token_ids"] == tokens[0].tolist()
    assert report["skip_ratio"]["prefill"]["all"] == stats.summary()["prefill"]["all"] > 0


if __name__ == "__main__":  # under torchrun: rank r writes rank{r}.pt into the folder argv[1], then generate.py
    import torch.distributed as dist
    dist.init_process_group("gloo")
    shard = Shard(dist.get_rank(), dist.get_world_size())
    result = {"memory": load_memory("tiny-qwen", shard)}
    result.update({name: compute(name, shard) for name in NAMES})
    torch.save(result, os.path.join(sys.argv[1], f"rank{shard.rank}.pt"))
    main(parser().parse_args(cli_args(sys.argv[1])))
    dist.destroy_process_group()
