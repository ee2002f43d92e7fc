"""
Calibration of MoDES's global layer factors alpha (arXiv 2511.15690 §5.1 Eq. 4).

alpha[l][m] measures how much the output distribution moves when the routed experts of MoE layer l are removed
for the tokens of modality m (text or vision):

    KL_sum[l][m] = sum over answer tokens of KL(P_original || P_removed(l, m))
    alpha[l][m]  = KL_sum[l][m] / sum_l' KL_sum[l'][m]         (each modality sums to 1 over the MoE layers)

Notable features
- Cached prefix: layers before l see exactly the original inputs, so every ablation of layer l starts from the
  original pass's layer-l input h_l; the text and vision ablations of a layer run as one doubled batch. This costs
  L + 2 * sum_l (L - l) layer passes per batch instead of (1 + 2L) * L; `--naive` runs the full passes.
- Removal by module replacement: the layer's MoE is wrapped (RemoveRouted) and given a policy that drops every
  slot of the removed tokens. `--removal zero` (the paper) makes their routed output 0; `--removal input` is the
  official code's substitution of the MoE input. Shared experts (Kimi-VL) run in both.
- Teacher-forced answers: the loss is on the logits that predict the answer tokens and the end-of-turn marker.
- Data (data.py): a JSONL file, GQA's question JSON + image folder, easy-vqa, or a built-in synthetic set.
- Resumable (`--resume`: a sidecar partial file is replaced atomically after every batch; a run without --resume
  refuses to overwrite it; samples after the finished batches may be fixed between runs) and data-parallel under
  torchrun (samples sharded over ranks, sums all-reduced, rank 0 writes); with `--model-parallel` the ranks run
  one model too large for one GPU together instead (parallel.py's Shard), each on every sample.

Indexing: files key alpha by absolute decoder-layer index (Qwen3-VL-MoE 0..47, Kimi-VL 1..26; Kimi's layer 0 is a
dense MLP and has no alpha); router.alpha_table turns them into the [L, 2] table router.MoDES takes.

Examples
    python calibrate.py                                            # tiny built-in model, synthetic data
    python calibrate.py --model tiny-vqa --data easy-vqa-train --n 256 --out alpha-vqa.json
    python calibrate.py --model ~/Qwen3-VL-30B-A3B-Instruct --data gqa.jsonl --n 1024 --batch-size 8 \
        --device cuda --dtype bfloat16 --out alpha-qwen3.json
    torchrun --nproc_per_node 8 calibrate.py --model ~/Kimi-VL-A3B-Instruct --gqa-questions \
        testdev_balanced_questions.json --gqa-images images/ --num-samples 1024 --seed 0 --device cuda --dtype bfloat16
    (under torchrun, --n and --start are taken by torchrun itself: use --num-samples / --start-index)
    torchrun --nproc_per_node 8 calibrate.py --model-parallel --model ~/Qwen3-VL-235B-A22B-Instruct \
        --data gqa.jsonl --num-samples 1024 --device cuda --dtype bfloat16 --out alpha-qwen3-235b.json
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import torch
from torch import nn

import cli
import processor
import router
from data import add_data_args, answer_logits, data_hash, kl_sum, load_samples, make_batch
from model import SKIP, TEXT, VISION, Wrapper, load, set_expert_impl
from parallel import Shard
from support import plot, tiny

# B batch rows, S sequence, H hidden, V vocabulary, N answer positions, G stacked copies, T = B * S, K top-k slots

PARTIAL_FORMAT = "modes-alpha-partial/1"


# ---------------------------------------------------------------------------------------------------------------
# Removing one layer's routed experts for one modality


class DropTokens(nn.Module):
    """A skip policy that drops every slot of the tokens where drop [T] holds."""

    def __init__(self, drop):
        super().__init__()
        self.drop = drop

    def forward(self, routing, modality, layer):
        skip = self.drop[:, None].expand_as(routing.ids)  # [T, K]
        return routing.weights.masked_fill(skip, 0.0), routing.ids.masked_fill(skip, SKIP)


class RemoveRouted(Wrapper):
    """An MoE layer whose routed experts are removed for the tokens where remove [B, S] holds: a DropTokens policy
    in place of its own during the call, and with substitute_input the MoE input added for them, as the official
    calibration does (instead of the paper's 0)."""

    def __init__(self, moe, remove, substitute_input):
        super().__init__(moe)
        self.remove, self.substitute_input = remove, substitute_input

    def forward(self, x, ctx):
        policy = self.inner.policy
        self.inner.set_policy(DropTokens(self.remove.reshape(-1)))
        try:
            y = self.inner(x, ctx)
        finally:
            self.inner.set_policy(policy)
        return y + x * self.remove[..., None] if self.substitute_input else y


def removed(model, layer, remove, removal):
    """Within the block, decoder layer `layer` has its routed experts removed for the tokens where remove [B, S]."""
    return model.layers.wrapped(layer, "mlp", lambda moe: RemoveRouted(moe, remove, removal == "input"))


def repeat_context(ctx, copies):
    """The Context of `copies` stacked copies of the batch (rows b + c * B): several ablations in one pass."""
    cli.check(ctx.cache is None, "cannot stack a forward that writes a cache")

    def rows(t):
        return None if t is None else t.repeat(copies, *[1] * (t.ndim - 1))
    return dataclasses.replace(ctx, cos=rows(ctx.cos), sin=rows(ctx.sin), mask=rows(ctx.mask),
                               modality=rows(ctx.modality), valid=rows(ctx.valid), visual=rows(ctx.visual),
                               deepstack=[f.repeat(copies, 1) for f in ctx.deepstack])  # rows of visual positions


@torch.inference_mode()
def ablate_batch(model, batch, layers, removal="zero", naive=False, pair=True, per_layer=False):
    """KL sums [len(layers), 2] (float64) of one batch, its answer-token count and the layer passes it took.
    per_layer: a layer's experts are removed for text and vision tokens together (the paper's Eq. 4), and its one
    KL goes to both columns; else each modality is removed on its own (the official code)."""
    n_layers = len(model.layers)
    media = model.encode_vision(batch.input_ids, **batch.pixels) if batch.pixels else None
    h, ctx = model.embed(batch.input_ids, batch.attention_mask, media=media, **batch.pixels)
    cached, start = {}, 0  # MoE layer -> its input in the original pass
    for layer in layers:
        h = cached[layer] = model.layers(h, ctx, start, layer)
        start = layer
    logits = answer_logits(model, model.layers(h, ctx, start), batch)[0]  # [N, V]
    passes = n_layers
    present = [m for m in (TEXT, VISION) if bool(((ctx.modality == m) & ctx.valid).any())]  # an absent one has KL 0
    removals = ([tuple(present)] if present else []) if per_layer else [(m,) for m in present]  # removed together
    groups = [removals] if pair and not naive and removals else [[r] for r in removals]  # stacked in one pass
    kl = torch.zeros(len(layers), 2, dtype=torch.float64)
    for j, layer in enumerate(layers):
        for group in groups:
            remove = torch.cat([sum(ctx.modality == m for m in r) > 0 for r in group])  # [G * B, S]
            with removed(model, layer, remove, removal):
                if naive:
                    h = model.layers(*model.embed(batch.input_ids, batch.attention_mask, media=media, **batch.pixels))
                else:
                    h = model.layers(cached[layer].repeat(len(group), 1, 1), repeat_context(ctx, len(group)), layer)
            passes += n_layers if naive else (n_layers - layer) * len(group)
            ablated = answer_logits(model, h, batch, copies=len(group))  # [G, N, V]
            for g, r in enumerate(group):
                kl[j, [TEXT, VISION] if per_layer else list(r)] = kl_sum(logits, ablated[g])
    return kl, len(batch.rows), passes


def normalise(kl):
    """alpha [L_moe, 2] from KL sums: each modality's column divided by its sum over the MoE layers. Rounding can
    leave a KL a hair below 0; it is clamped like the official relu. A modality the data never removed anything
    for (no vision tokens, say) gets the uniform 1 / L_moe."""
    kl = kl.clamp(min=0)
    total = kl.sum(0, keepdim=True)
    uniform = torch.full_like(kl, 1.0 / kl.shape[0])
    return torch.where(total > 0, kl / total.clamp(min=1e-300), uniform)


# ---------------------------------------------------------------------------------------------------------------
# The calibration loop


def consumed(samples, steps, batch_size, world):
    """sha256 of the samples that the first `steps` steps read, on every rank."""
    return data_hash([s for r in range(world) for s in cli.rank_items(samples, r, world)[:steps * batch_size]])


def read_partial(path, settings, samples, steps):
    """(KL sums [L_moe, 2], answer tokens, layer passes, naive layer passes, steps done) of an earlier run, refused
    unless it was made with the same settings, its finished batches read the same samples, and it is intact."""
    state = cli.read_state(path, PARTIAL_FORMAT, settings, "partial calibration")
    counts = [state.get(k) for k in ("answer_tokens", "layer_passes", "naive_layer_passes", "steps_done")]
    cli.check(all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) and counts[-1] <= steps,
              f"{path}: damaged (its counts must be integers >= 0, at most {steps} steps); delete it to start over")
    try:
        kl = torch.tensor(state.get("kl_sum"), dtype=torch.float64).view(len(settings["layers"]), 2)
    except (TypeError, ValueError, RuntimeError):
        kl = None
    cli.check(kl is not None and bool(torch.isfinite(kl).all()),
              f"{path}: damaged (kl_sum must be {len(settings['layers'])} rows of 2 finite numbers); delete it to "
              f"start over")
    done = counts[-1]
    cli.check(state.get("done_sha256") == consumed(samples, done, settings["batch_size"], settings["world_size"]),
              f"{path}: the samples of its {done} finished batch(es) are not the ones it read (edited or reordered "
              f"data); delete it to start over")
    return (kl, *counts)


def calibrate(model, proc, samples, *, batch_size=4, removal="zero", naive=False, pair=True, per_layer=False,
              partial=None, resume=False, max_batches=None, data_info=None, quiet=False):
    """The alpha document (a dict, the same on every rank) of `model` on `samples`; None if max_batches stopped it.
    per_layer: one alpha per layer (text and vision removed together, the paper's Eq. 4), written to both columns;
    else one per layer and modality (the official code).

    Samples are sharded over the data-parallel ranks (cli.data_parallel); one step = one batch on every rank,
    all-reduced. With `partial` (a path), the running sums are written there atomically after each step, and
    resume=True continues from them. max_batches stops after that many steps of this call, leaving the partial
    file.
    """
    cli.check(removal in ("zero", "input"), f"removal must be 'zero' or 'input', got {removal!r}")
    cli.check(batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}")
    router.uninstall(model)  # the original model is plain top-k
    rank, world = cli.data_parallel(model)
    layers = model.moe_layers()
    mine = cli.rank_items(samples, rank, world)
    steps = math.ceil(math.ceil(len(samples) / world) / batch_size)
    data = data_info or dict(n=len(samples), sha256=data_hash(samples))
    # the data's hash is not a setting: a resumed run must see the samples of the finished batches again (done_sha256),
    # while a later sample may be fixed between runs (an image that only the processor refused when its batch came)
    settings = dict(fingerprint=router.fingerprint(model), data={k: v for k, v in data.items() if k != "sha256"},
                    batch_size=batch_size, world_size=world, removal=removal, naive=naive, layers=layers,
                    **({"per_layer": True} if per_layer else {}))
    kl = torch.zeros(len(layers), 2, dtype=torch.float64)
    tokens, passes, naive_passes, done = 0, 0, 0, 0
    if resume and partial and os.path.isfile(partial):
        kl, tokens, passes, naive_passes, done = read_partial(partial, settings, samples, steps)
    progress = cli.Progress("calibrate", steps, quiet)
    dev = model.lm_head.weight.device
    for step in range(done, steps if max_batches is None else min(steps, done + max_batches)):
        delta = torch.zeros(len(layers) * 2 + 3, dtype=torch.float64, device=dev)  # KL sums, counts
        chunk = mine[step * batch_size:(step + 1) * batch_size]
        if chunk:
            batch = make_batch(chunk, proc, dev, max_positions=model.cfg.max_position_embeddings)
            batch_kl, n, p = ablate_batch(model, batch, layers, removal, naive, pair, per_layer)
            delta[:-3] = batch_kl.flatten().to(dev)
            delta[-3:] = torch.tensor([n, p, (1 + 2 * len(layers)) * len(model.layers)], dtype=torch.float64)
        cli.all_sum(delta, world)
        kl += delta[:-3].cpu().view(len(layers), 2)
        n, p, q = (int(d) for d in delta[-3:].tolist())
        tokens, passes, naive_passes = tokens + n, passes + p, naive_passes + q
        done = step + 1
        if partial and cli.is_main():
            cli.write_json(partial, dict(format=PARTIAL_FORMAT, settings=settings, steps_done=done,
                                         done_sha256=consumed(samples, done, batch_size, world), kl_sum=kl.tolist(),
                                         answer_tokens=tokens, layer_passes=passes, naive_layer_passes=naive_passes))
        progress.update(done, f"batches, {tokens} answer tokens")
    progress.update(done, f"batches, {tokens} answer tokens", finished=True)
    if done < steps:
        return None
    alpha = normalise(kl)
    return dict(
        format=router.ALPHA_FORMAT,
        model=dict(fingerprint=settings["fingerprint"], model_type=model.cfg.model_type,
                   num_layers=len(model.layers), moe_layers=layers),
        data=data,
        calibration=dict(loss="kl", temperature=1.0, removal=removal, naive=naive, world_size=world,
                         form="per-layer" if per_layer else "per-modality",
                         answer_tokens=tokens, layer_passes=passes, naive_layer_passes=naive_passes),
        layers=[dict(layer=l, text=a[0], vision=a[1]) for l, a in zip(layers, alpha.tolist())],
        kl_sum=[dict(layer=l, text=s[0], vision=s[1]) for l, s in zip(layers, kl.tolist())],
    )


# ---------------------------------------------------------------------------------------------------------------
# Command line


def check_args(args):
    """Every argument of the calibrate / search command lines, before anything is loaded."""
    cli.check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    cli.check(args.n is None or args.n >= 1, f"--n must be >= 1, got {args.n}")
    cli.check(args.start >= 0, f"--start must be >= 0, got {args.start}")
    for name in ("model", "data", "gqa_questions", "gqa_images", "plot", "alpha"):
        cli.check_input_path(getattr(args, name, None), f"--{name.replace('_', '-')}")
    cli.set_threads(args.threads)
    cli.check_max_tiles(args.max_tiles)
    args.device = cli.check_device(args.device)
    if args.plot:  # now, not after a long run
        plot.require_matplotlib()
        plot.check_out_dir(args.plot, "--plot")


def load_model(args):
    """(model, processor, checkpoint folder) of --model on --device (this rank's GPU under torchrun); with
    --model-parallel, this rank's part of the model."""
    rank, world, device = cli.init_distributed(args.device)
    path = tiny.resolve(args.model)
    shard = Shard(rank, world) if args.model_parallel else Shard()
    model = set_expert_impl(load(path, device, cli.DTYPES[args.dtype], shard, processor.special_token_ids(path)),
                            "auto")
    return model, processor.for_model(path, model.cfg.model_type, args.max_tiles), path


def main(args):
    check_args(args)
    cli.check(args.max_batches is None or args.max_batches >= 1, f"--max-batches must be >= 1, got {args.max_batches}")
    out = cli.ResumableOutput(args.out, args.resume, [(args.data, "--data"), (args.gqa_questions, "--gqa-questions")])
    samples, info = load_samples(args)
    model, proc, path = load_model(args)
    if args.resume and not out.resumed() and cli.is_main():
        print(f"note: --resume: no {out.partial} yet, starting from the first batch", file=sys.stderr)
    t0 = time.perf_counter()
    doc = calibrate(model, proc, samples, batch_size=args.batch_size, removal=args.removal, naive=args.naive,
                    pair=not args.separate_modalities, per_layer=args.per_layer, partial=out.partial, resume=args.resume,
                    max_batches=args.max_batches, data_info=info, quiet=args.quiet)
    if not cli.is_main():
        return
    if doc is None:
        print(f"stopped after --max-batches {args.max_batches}; continue with --resume (state in {out.partial})")
        return
    doc["model"]["path"] = args.model or tiny.DEFAULT  # as given: a built-in name, or the user's path
    doc["calibration"]["seconds"] = round(time.perf_counter() - t0, 3)
    out.finish(doc)
    c = doc["calibration"]
    print(f"{'layer':>5} {'alpha text':>11} {'alpha vision':>13}")
    for row in doc["layers"]:
        print(f"{row['layer']:>5} {row['text']:>11.4f} {row['vision']:>13.4f}")
    print(f"{info['n']} samples, {c['answer_tokens']} answer tokens, {c['layer_passes']} layer passes "
          f"(naive: {c['naive_layer_passes']}), {c['seconds']:.1f} s -> {args.out}")
    if args.plot:
        print("plots:", ", ".join(plot.plot_artifact(args.out, args.plot)))


def add_model_args(p):
    p.add_argument("--model", help=f"checkpoint folder, or a built-in one: {', '.join(tiny.CHECKPOINTS)} "
                   f"(default {tiny.DEFAULT})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: each rank's LOCAL_RANK GPU)")
    p.add_argument("--model-parallel", action="store_true", help="under torchrun: the ranks run one model together "
                   "(experts, heads and vocabulary split), each on every sample, instead of one copy each")
    p.add_argument("--dtype", default="float32", choices=list(cli.DTYPES), help="weights and compute")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    p.add_argument("--plot", metavar="DIR", help="also draw this run's plots as PNG files into DIR (needs matplotlib)")
    cli.add_max_tiles_arg(p)
    cli.add_threads_arg(p)


def parser():
    p = argparse.ArgumentParser(description="Calibrate MoDES's per-layer, per-modality factors alpha.",
                                formatter_class=cli.HelpFormatter)
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", default=f"{cli.RUNS}/alpha.json", help=f"output JSON (default: {cli.RUNS}/alpha.json)")
    p.add_argument("--removal", default="zero", choices=["zero", "input"],
                   help="removed tokens' routed output: zero (the paper) or the MoE input (the official code)")
    p.add_argument("--naive", action="store_true", help="full forward passes per ablation (for checking)")
    p.add_argument("--per-layer", action="store_true", help="one alpha per layer, its experts removed for text and "
                   "vision tokens together (the paper's Eq. 4); default: one per layer and modality (the official code)")
    p.add_argument("--separate-modalities", action="store_true",
                   help="ablate text and vision in separate passes (half the activation memory)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial after an interruption")
    p.add_argument("--max-batches", type=int, help="stop after this many batches, keeping OUT.partial")
    return p


if __name__ == "__main__":
    cli.run(main, parser().parse_args())
