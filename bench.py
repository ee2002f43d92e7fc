"""
Speed, memory and skip ratios of the handwritten forward, one row per skip policy, measured in the same run. (How
well each policy keeps the unskipped model's answers is evaluate.py's.)

Prefill is compute-bound and decode is bandwidth-bound, so they are timed apart: the vision tower and the language
model prefill separately, then decode steps with the static KV cache (compiled, CUDA-graphed on GPU, unless
--no-compile). The full, threshold and modes rows share one skip policy whose buffers change between rows, so one
compiled decode graph serves them all. Every number is a median over --repeats runs after --warmup runs (their
time is reported apart); on CUDA each timing is synchronised. Decode GB/s counts the bytes a step must read (all
non-expert weights, the kept experts, the KV cache); its floor is those bytes at the bandwidth measured by a
device copy, timed with CUDA events on a GPU and a host timer on a CPU (the header says which). The header records
the machine (CPU model or GPU, cores, threads, BLAS). With --check-graph the timed decode step is fed the tokens of
an eager decode and its logits are compared with the eager ones step by step (compare_logits), and each row also
reports the memory one timed decode step takes next to one eager model.decode_step.

Output, so that a run cut short keeps what it measured: each JSON object is one stdout line, flushed as it is made.
    {"record": "header", ...}                       the machine and settings, before the first measurement
    {"record": "row", "policy": ..., ...}           one per row, the moment it is measured; a row that raises is
                                                    {"record": "row", "policy": ..., "error": "Type: message"} (the
                                                    traceback goes to stderr) and the next row runs
    {...header fields, "rows": [...]}               last: the whole result, as --json writes it
A human-readable table line follows each row line. A run with an error row exits with status 1 after the last line.
Without --model, --config and --policy, bench.py runs the demo, MoDES against the full model on tiny-vqa: the same
lines, then an aligned table of skip ratios and speed-ups before the last line; on a terminal it leaves out the
header and row JSON lines (the whole result stays the last line, and --json FILE keeps it). A run that cannot fit
(weights + KV cache + activations against the free memory) or passes the position limit is refused before
anything is allocated.
Under torchrun the ranks run one model together (parallel.py's Shard) and rank 0 reports: weights,
memory and the decode roofline are then per rank (assuming the kept slots spread evenly over the experts).

Examples
    python bench.py                                                  # demo: MoDES against full on tiny-vqa, CPU
    python bench.py --policy full                                    # tiny built-in checkpoint, CPU
    python bench.py --model tiny-kimi                                # the tiny Kimi-VL one
    python bench.py --model ~/Qwen3-VL-30B-A3B-Instruct --device cuda --dtype bfloat16 --thresholds thr.json \
        --policy full,modes
    python bench.py --config configs/qwen3_vl_30b_a3b.json --random-weights --device cuda --dtype bfloat16 \
        --policy full,threshold --target 0.88 --batch 8 --image-size 1280 --text-tokens 400
    torchrun --nproc_per_node 4 bench.py --config configs/qwen3_vl_235b_a22b.json --random-weights --device cuda \
        --dtype bfloat16 --policy full,threshold                  # one model over 4 GPUs
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import traceback

import torch

import baselines
import cli
import processor
import moe_kernels
from model import EXPERT_IMPLS, build, load, read_config, set_expert_impl
from parallel import Shard
from support import plot
from support.compare import transformers_model, transformers_prompt
from support.measure import copy_bandwidth, free_bytes, host_peak_bytes, machine, step_memory, timed
import router
from support import tiny
import kimi_vl


def build_model(args, source, shard):
    """(model, load seconds, host peak growth) of --config (random weights) or the checkpoint folder source: this
    rank's part of it (shard)."""
    dtype, before = cli.DTYPES[args.dtype], host_peak_bytes()

    def make():
        if args.config:
            return tiny.random_weights(build(read_config(args.config), args.device, dtype, shard)).eval()
        return load(source, args.device, dtype, shard, processor.special_token_ids(source))
    model, seconds = timed(make, args.device)
    return set_expert_impl(model.requires_grad_(False), args.expert_impl), seconds, host_peak_bytes() - before


def synthetic_inputs(model, args, batch, device=None, length_only=False):
    """`batch` identical rows <image placeholders><text>: a square random image of --image-size pixels (rounded
    to the merge grid) and --text-tokens random text ids, in the model's own input format, on `device` (default
    --device); length_only: just the prompt's length, nothing allocated."""
    device = device or args.device
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, min(cfg.vocab_size, 1000), (args.text_tokens,), generator=g).tolist()
    if isinstance(model, kimi_vl.KimiVL):
        p, (kh, kw) = cfg.patch_size, cfg.merge_kernel_size
        side = max(1, round(args.image_size / (p * kh))) * kh  # patches per side
        row = [cfg.media_placeholder_token_id] * (side * side // (kh * kw)) + text
        def pixels():
            return dict(pixel_values=torch.randn(side * side, 3, p, p, generator=g).repeat(batch, 1, 1, 1),
                        image_grid_hws=torch.tensor([[side, side]] * batch))
    elif cfg.model_type == "internvl":
        v = cfg.vision
        side = max(1, round(args.image_size / v.image_size))  # tiles per side
        tiles = side * side + (side > 1)  # plus the thumbnail the processor adds to a tiled image
        row = [cfg.image_token_id] * (tiles * cfg.tokens_per_tile) + text
        def pixels():
            return dict(pixel_values=torch.randn(tiles, v.num_channels, v.image_size, v.image_size,
                                                 generator=g).repeat(batch, 1, 1, 1))
    else:
        v = cfg.vision
        side = max(1, round(args.image_size / (v.patch_size * v.spatial_merge_size))) * v.spatial_merge_size
        pads = [cfg.image_token_id] * (side * side // v.spatial_merge_size ** 2)
        row = [cfg.vision_start_token_id] + pads + [cfg.vision_end_token_id] + text
        def pixels():
            return dict(pixel_values=torch.randn(side * side, v.in_channels * v.temporal_patch_size
                                                 * v.patch_size ** 2, generator=g).repeat(batch, 1),
                        image_grid_thw=torch.tensor([[1, side, side]] * batch))
    if length_only:
        return len(row)
    return torch.tensor([row] * batch, device=device), {k: t.to(device) for k, t in pixels().items()}


def check_fits(skeleton, what, args):
    """Refuse, before anything is allocated, a run past the model's position limit or one whose weights (this
    rank's, from the meta-device build `skeleton`), KV cache (the model's own new_cache on the meta device) and
    activations (a rough term: a few dozen hidden-size rows per prompt token, and the logits) cannot fit in the
    memory free on --device."""
    cfg = skeleton.cfg
    S = synthetic_inputs(skeleton, args, args.batch, length_only=True)
    limit = cfg.max_position_embeddings
    cli.check(S + args.decode_steps <= limit, f"{what}: {S} prompt tokens (--image-size {args.image_size}, "
              f"--text-tokens {args.text_tokens}) + --decode-steps {args.decode_steps} exceed the model's "
              f"max_position_embeddings {limit}")
    elem = torch.finfo(cli.DTYPES[args.dtype]).bits // 8
    weights = sum(p.numel() for p in skeleton.parameters()) * elem
    kv_cache = skeleton.new_cache(args.batch, S + max(args.decode_steps, 4) + 1, device="meta",
                                  dtype=cli.DTYPES[args.dtype])
    kv = sum(t.nbytes for t in kv_cache.k + kv_cache.v)
    activations = args.batch * (S * 32 * cfg.hidden_size * elem + 4 * cfg.vocab_size)
    need, free = weights + kv + activations, free_bytes(args.device)
    gib = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"  # noqa: E731
    cli.check(need <= free, f"{what}: needs about {gib(need)} ({gib(weights)} weights + {gib(kv)} KV cache + "
              f"{gib(activations)} activations), {gib(free)} free on {args.device}")


def prefill_ratio(model, ids, pixels, policy):
    """Prefill skip ratio of `policy` on this prompt. The policy stays installed: every later pass installs its own."""
    router.install(model, policy)
    stats = router.SkipStats(len(model.layers), model.lm_head.weight.device)
    with torch.no_grad():
        model(ids, stats=stats, last_only=True, **pixels)
    return stats.summary()["prefill"]["all"] or 0.0


def shared_policy(name, model, args, shared, modes):
    """`shared` (one MoDES module, so that the full, threshold and modes rows share one compiled decode graph) with
    the alpha and tau of speed row `name`: full = tau 0, which skips nothing; threshold = one tau fitted to
    --target; modes = those of --thresholds."""
    tau = modes.tau if name == "modes" else torch.zeros(2)
    if name == "threshold":  # for random-weight speed runs: no calibration data, so fitted on the prompt itself
        one = synthetic_inputs(model, args, 1)  # the rows are identical: one has their skip ratio
        fit = baselines.fit_scalar(lambda p: prefill_ratio(model, *one, p), router.Threshold, args.target, steps=20)
        cli.check(fit is not None, f"--target {args.target} is out of reach on this prompt: its special tokens are "
                  f"never skipped; lower --target or lengthen the prompt (--image-size, --text-tokens)")
        tau = torch.full((2,), fit[1])
    shared.alpha.copy_(modes.alpha if name == "modes" else torch.ones_like(shared.alpha))
    shared.set_thresholds(*tau.tolist())
    return shared


def medians(run, args):
    """run() times one repetition -> {name: seconds}. -> ({name}_ms: its median over --repeats runs, the seconds of
    the --warmup runs before them: autotuning, first-touch allocations; the decode step's compilation and graph
    capture are its first call, before, timed apart: step_first_call_s)."""
    warmup_s = sum(timed(run, args.device)[1] for _ in range(args.warmup))
    runs = [run() for _ in range(args.repeats)]
    return {f"{k}_ms": 1e3 * statistics.median(r[k] for r in runs) for k in runs[0]}, warmup_s


def decode(step, cache, token, n, record=None, forced=None):
    """n decode steps from token [B, 1], step: token -> logits [B, V] at the cache's next position. Greedy (each
    step's input is the last step's argmax), or teacher-forced: forced[i] is step i's input. `record`, a dict of
    lists, gets each step's input token and a copy of its logits."""
    for i in range(n):
        token = token if forced is None else forced[i]
        out = step(token)
        if record is not None:
            record["tokens"].append(token)
            record["logits"].append(out.float().clone())  # a CUDA graph's output buffer is overwritten by the next step
        cache.length += 1
        token = out.argmax(-1, keepdim=True)


def prefill_decode(model, cache, ids, pixels, n, step=None, stats=None, record=None, forced=None):
    """A prefill into the emptied cache, then decode(): through `step`, or the eager model.decode_step counting
    skips into `stats`."""
    cache.reset()
    token = model(ids, cache=cache, stats=stats, last_only=True, **pixels)[:, -1:].argmax(-1)
    decode(step or (lambda t: model.decode_step(t, cache, stats)), cache, token, n, record, forced)


CHECK_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}  # decode step against eager: relative L2 error of a step's logits
FLIP_BAND = 10  # see compare_logits


def compare_logits(eager, other, rtol, exact=False):
    """Logits of a decode step (compiled and/or graphed) against eager decoding's, eager and other [n, B, V] from
    the same input tokens (teacher-forced: greedy sequences would part at the first near-tie that rounding flips,
    and differ everywhere after it). ok when every step's L2 error relative to the eager logits is at most rtol and
    the top-1 token agrees wherever eager's margin over its runner-up exceeds FLIP_BAND * rtol * the RMS of that
    step's logits: errors within rtol have an RMS of at most rtol * RMS, their largest over a vocabulary is about
    5 RMS, so only a margin under 10 such RMS can flip by rounding. exact: the two must also be bitwise equal, for
    the same kernels on the same inputs (an eager step against eager decoding)."""
    eager, other = eager.float(), other.float()
    assert eager.shape == other.shape and eager.ndim == 3, (tuple(eager.shape), tuple(other.shape))
    diff = other - eager
    rel = diff.norm(dim=(1, 2)) / eager.norm(dim=(1, 2)).clamp_min(torch.finfo(torch.float32).tiny)  # [n]
    top2 = eager.topk(2, dim=-1).values  # [n, B, 2]
    rms = eager.pow(2).mean(dim=(1, 2)).sqrt()  # [n]
    decided = top2[..., 0] - top2[..., 1] > FLIP_BAND * rtol * rms[:, None]  # [n, B]
    agree = eager.argmax(-1) == other.argmax(-1)  # [n, B]
    equal = torch.equal(eager, other)
    flips = int((decided & ~agree).sum())
    return dict(steps=eager.shape[0], rtol=rtol, max_rel_err=float(rel.max()), max_abs_diff=float(diff.abs().max()),
                top1_agree=float(agree.float().mean()), top1_decided=int(decided.sum()), top1_decided_flips=flips,
                bitwise_equal=equal, exact_required=exact,
                ok=bool((rel <= rtol).all()) and flips == 0 and (equal or not exact))


@torch.no_grad()
def teacher_forced_check(model, step, cache, ids, pixels, n, rtol, exact=False, stats=None):
    """Greedy eager decoding of n steps after a prefill (counting skips into `stats`), then the same prefill and
    `step` fed the eager run's tokens: compare_logits of the two runs' logits."""
    eager, forced = dict(tokens=[], logits=[]), dict(tokens=[], logits=[])
    prefill_decode(model, cache, ids, pixels, n, stats=stats, record=eager)
    prefill_decode(model, cache, ids, pixels, n, step, record=forced, forced=eager["tokens"])
    return compare_logits(torch.stack(eager["logits"]), torch.stack(forced["logits"]), rtol, exact)


def step_memories(model, step, cache, ids, pixels, device, first_calls):
    """Memory of one timed decode step (compiled and/or graphed) next to one eager model.decode_step, from the same
    prefilled cache, each on a call after its first: peak bytes above what was allocated before. A step object's
    first call (compilation, CUDA graph capture) is timed and measured in the row that makes it (first_calls: the
    steps called so far): on CUDA, what it leaves allocated is the graph's memory pool, where expert weights copied
    per step would live. The cache must hold 4 tokens past the prompt."""
    cuda = device.startswith("cuda")
    cache.reset()
    token = model(ids, cache=cache, last_only=True, **pixels)[:, -1:].argmax(-1)
    eager = lambda t: model.decode_step(t, cache)  # noqa: E731
    first = {}
    if step not in first_calls:  # compilation and graph capture happen here, timed and measured apart
        first_calls.add(step)
        if cuda:
            (peak, retained), seconds = timed(lambda: step_memory(step, token, device), device)
        else:  # no graph pool on a CPU, and compilation's own allocations would blur the numbers
            peak, retained, seconds = None, None, timed(lambda: step(token), device)[1]
        first = dict(step_first_call_s=seconds, step_first_call_peak_bytes=peak,
                     step_first_call_retained_bytes=retained)
    eager(token)  # its first call may allocate workspaces that stay
    out = dict(first, step_peak_bytes=step_memory(step, token, device)[0],
               eager_step_peak_bytes=step_memory(eager, token, device)[0])
    cache.reset()
    return out


@torch.no_grad()
def measure(model, step, cache, ids, pixels, args, first_calls):
    """Median times of the vision tower, the language-model prefill, time to first token and one decode step
    (all steps of a run timed together, divided); the memory of one decode step (step_memories, first: it resets
    the CUDA peak counter); the skip ratios from one separate, untimed eager pass. With --check-graph, the decode
    step as timed (compiled and/or graphed) teacher-forced with that eager pass's tokens: compare_logits."""
    dev, n = args.device, args.decode_steps
    memory = step_memories(model, step, cache, ids, pixels, dev, first_calls)

    def run():
        cache.reset()
        media, tv = timed(lambda: model.encode_vision(ids, **pixels), dev)
        logits, tp = timed(lambda: model(ids, cache=cache, media=media, last_only=True, **pixels), dev)
        td = timed(lambda: decode(step, cache, logits[:, -1:].argmax(-1), n), dev)[1]
        return dict(vision=tv, prefill=tp, ttft=tv + tp, decode=td / n)
    out, warmup_s = medians(run, args)
    stats = router.SkipStats(len(model.layers), dev)
    if args.check_graph:  # its eager pass counts the skips
        plain = not args.compile and not args.cuda_graph  # then the step is model.decode_step itself
        check = teacher_forced_check(model, step, cache, ids, pixels, n, CHECK_RTOL[args.dtype], exact=plain,
                                     stats=stats)
    else:
        prefill_decode(model, cache, ids, pixels, n, stats=stats)
    skips = stats.summary()
    out.update({f"skip_{phase}_{m}": skips[phase][m] for phase in router.PHASES for m in ("text", "vision", "all")},
               warmup_s=warmup_s, **memory)
    if args.check_graph:
        out["graph_check"] = check
    out["skip_per_layer"] = {phase: skips[phase]["per_layer"] for phase in router.PHASES}  # long: last
    return out


def roofline(model, args, row, bandwidth):
    """Bytes a decode step must read (its KV cache at the middle decode step) and FLOPs of the prefill, from the
    shapes and the measured kept fraction (of this rank's part of a model split over ranks)."""
    cfg, world = model.cfg, model.shard.world
    elem = torch.finfo(cli.DTYPES[args.dtype]).bits // 8
    moe = [model.layers[i].mlp for i in model.moe_layers()]
    E, two_i, H = moe[0].experts.gate_up_proj.shape
    expert_params = 3 * (two_i // 2) * H
    # read once per decode step whatever the batch: the language model but for its embedding and routed experts
    fixed = sum(p.numel() for n, p in model.named_parameters()
                if not n.startswith(("visual.", "projector.", "embed_tokens."))) - len(moe) * E * expert_params
    kept = {phase: 1 - (row[f"skip_{phase}_all"] or 0.0) for phase in router.PHASES}
    slots = args.batch * cfg.num_experts_per_tok * kept["decode"] / world  # batch 1: kept slots are distinct experts
    S = row["prompt_tokens"]
    kv = model.new_cache(args.batch, S + args.decode_steps // 2, device="meta")  # as filled at the middle step
    step_bytes = (fixed + len(moe) * min(E, slots) * expert_params) * elem + sum(t.nbytes for t in kv.k + kv.v)
    head_dims = getattr(cfg, "head_dim", None) or (cfg.qk_head_dim + cfg.v_head_dim) / 2
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads / world * head_dims * S * S / 2  # causal QK^T, PV
    head = model.lm_head.weight.numel()
    per_token = fixed - head + len(moe) * cfg.num_experts_per_tok * kept["prefill"] / world * expert_params
    flops = args.batch * (2 * S * per_token + attn + 2 * head)  # lm_head on the last token only
    floor_ms = step_bytes / bandwidth * 1e3
    return dict(decode_bytes_per_step=step_bytes, decode_gb_per_s=step_bytes / row["decode_ms"] * 1e-6,
                decode_floor_ms=floor_ms, decode_pct_of_floor=100 * floor_ms / row["decode_ms"],
                prefill_tflops=flops / row["prefill_ms"] * 1e-9)


@torch.no_grad()
def transformers_row(model, source, ids, pixels, args):
    """The same config, weights (transformers_model) and inputs through transformers' own implementation, and the
    attention and expert implementations transformers chose for its decoder."""
    import transformers
    hf, prompt = transformers_model(model, source, args.device), transformers_prompt(model, ids, pixels)

    def steps(out):
        for _ in range(args.decode_steps):
            out = hf(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)

    def run():
        out, tp = timed(lambda: hf(**prompt, use_cache=True, logits_to_keep=1), args.device)
        return dict(ttft=tp, decode=timed(lambda: steps(out), args.device)[1] / args.decode_steps)
    text = hf.config.text_config
    return dict(medians(run, args)[0], transformers=dict(
        version=transformers.__version__, attention=getattr(text, "_attn_implementation", None),
        experts=getattr(text, "_experts_implementation", None)))  # private fields: an older release may lack one


def speed(model, source, load_s, host_load, args, modes):
    """Measure every row, printing each as it is measured (see the module docstring) -> the whole result."""
    ids, pixels = synthetic_inputs(model, args, args.batch)
    bandwidth, bandwidth_timer = copy_bandwidth(args.device)
    cuda = args.device.startswith("cuda")
    given = args.config or args.model or tiny.DEFAULT  # as the user gave it: no machine's absolute path
    header = dict(source=given, **machine(args.device), processes=model.shard.world, dtype=args.dtype,
                  batch=args.batch, prompt_tokens=ids.shape[1], model_type=model.cfg.model_type,
                  visual_tokens=sum(int((ids[0] == t).sum()) for t in model.cfg.media_token_ids),
                  decode_steps=args.decode_steps, repeats=args.repeats, warmup=args.warmup, compile=args.compile,
                  cuda_graph=args.cuda_graph, expert_impl=args.expert_impl, load_s=load_s,
                  weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                  host_load_peak_bytes=host_load, copy_bandwidth_gb_s=bandwidth / 1e9,
                  copy_bandwidth_timer=bandwidth_timer)
    print(f"# {header['device']} ({header['cores']} cores, {header['threads']} threads) | torch {torch.__version__} | "
          f"{args.dtype} | batch {args.batch} | prompt {header['prompt_tokens']} tokens ({header['visual_tokens']} "
          f"visual) | {args.decode_steps} decode steps | compile {'on' if args.compile else 'off'} | CUDA graph "
          f"{'on' if args.cuda_graph else 'off'} | experts {args.expert_impl} | median of {args.repeats} after "
          f"{args.warmup} warm-up" + (f" | one model over {model.shard.world} processes, per rank:"
                                      if model.shard.world > 1 else ""))
    print(f"# {source}: loaded in {load_s:.2f} s, host peak +{host_load / 2**20:.0f} MiB for "
          f"{header['weight_bytes'] / 2**20:.0f} MiB of weights; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"({bandwidth_timer})")
    if args.json_lines:
        print(json.dumps(dict(record="header", **header)), flush=True)
    # room for the prompt, the decode steps, step_memories' 4 steps, and the last index DecodeStep's capture writes
    cache = model.new_cache(args.batch, ids.shape[1] + max(args.decode_steps, 4) + 1)
    shared, reduce = router.MoDES(0.0, 0.0, torch.ones(len(model.layers), 2)), baselines.ReduceK(args.keep)
    steps = {policy: moe_kernels.DecodeStep(model, cache, compile=args.compile, cuda_graph=args.cuda_graph)
             for policy in (shared, reduce)}  # compiled (and captured) on first use: the shared rows reuse one graph
    first_calls = set()  # the steps called so far

    def policy_row(name):
        policy = reduce if name == "reduce-k" else shared_policy(name, model, args, shared, modes)
        router.install(model, policy)
        row = dict(policy=name, prompt_tokens=ids.shape[1],
                   **measure(model, steps[policy], cache, ids, pixels, args, first_calls))
        row.update(roofline(model, args, row, bandwidth), decode_tokens_per_s=args.batch * 1e3 / row["decode_ms"],
                   peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else host_peak_bytes())
        row["skip_per_layer"] = row.pop("skip_per_layer")  # long: last, so a line cut short keeps the numbers
        return row

    makers = [(name, lambda name=name: policy_row(name)) for name in args.policy]
    if args.compare_transformers:
        makers.append(("transformers", lambda: dict(policy="transformers",
                                                     **transformers_row(model, source, ids, pixels, args))))
    if args.json_lines:
        print(" | ".join(COLUMNS))
    rows = []
    for name, make in makers:
        try:
            row = make()
        except Exception as e:  # this row is lost, not the run: the rows before it are printed, the next ones run
            traceback.print_exc()
            row = dict(policy=name, error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:500]}")
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        add_speedups(rows)
        if args.json_lines:
            print(json.dumps(dict(record="row", **row)), flush=True)
            print(table_line(row, args), flush=True)
        else:  # the demo on a terminal: one short line per row as it is measured, the table at the end
            print(f"# {row['policy']}: " + (f"error: {row['error']}" if "error" in row else "measured"), flush=True)
    if args.compare_transformers:
        print("# the transformers row's x prefill compares time to first token (vision tower included)")
    return dict(header, rows=rows)


COLUMNS = ("policy", "skip pre", "skip dec", "vision ms", "LM prefill ms", "TTFT ms", "decode ms", "tok/s", "GB/s",
           "% floor", "TFLOP/s", "peak MiB", "step/eager MiB", "x prefill", "x decode")


def add_speedups(rows):
    """Speed-ups of every measured row over the full row (no skipping), once it is measured."""
    full = next((r for r in rows if r["policy"] == "full" and "error" not in r), None)
    for r in rows if full else []:
        if "error" not in r:
            prefill = "ttft_ms" if r["policy"] == "transformers" else "prefill_ms"
            r.update(speedup_prefill=full[prefill] / r[prefill], speedup_decode=full["decode_ms"] / r["decode_ms"])


def table_line(r, args):
    if "error" in r:
        return f"{r['policy']} | error: {r['error']}"
    def mib(key):
        return None if r.get(key) is None else r[key] / 2**20
    step = f"{fmt(mib('step_peak_bytes'), '.1f')}/{fmt(mib('eager_step_peak_bytes'), '.1f')}"
    return " | ".join([r["policy"], fmt(r.get("skip_prefill_all"), ".3f"), fmt(r.get("skip_decode_all"), ".3f"),
                       fmt(r.get("vision_ms"), ".1f"), fmt(r.get("prefill_ms"), ".1f"), fmt(r["ttft_ms"], ".1f"),
                       fmt(r["decode_ms"], ".2f"), fmt(args.batch * 1e3 / r["decode_ms"], ".1f"),
                       fmt(r.get("decode_gb_per_s"), ".1f"), fmt(r.get("decode_pct_of_floor"), ".0f"),
                       fmt(r.get("prefill_tflops"), ".3f"), fmt(mib("peak_memory_bytes"), ".0f"), step,
                       fmt(r.get("speedup_prefill"), ".2f"), fmt(r.get("speedup_decode"), ".2f")])


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


METHOD_COLUMNS = (("policy", ""), ("skip prefill", "text"), ("", "vision"), ("", "all"), ("skip decode", "all"),
                  ("TTFT", "ms"), ("decode", "ms/token"), ("speed-up", "TTFT"), ("", "decode"))


def method_table(rows):
    """The skip ratios and speed-ups of each row against the full one, as aligned text lines: what MoDES buys."""
    full = next((r for r in rows if r["policy"] == "full" and "error" not in r), None)
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["policy"], f"error: {r['error']}"])
            continue
        pct = lambda key: fmt(None if r.get(key) is None else 100 * r[key], ".1f") + "%"  # noqa: E731
        body.append([r["policy"], pct("skip_prefill_text"), pct("skip_prefill_vision"), pct("skip_prefill_all"),
                     pct("skip_decode_all"), fmt(r["ttft_ms"], ".1f"), fmt(r["decode_ms"], ".2f"),
                     fmt(full["ttft_ms"] / r["ttft_ms"] if full else None, ".2f") + "x",
                     fmt(r.get("speedup_decode"), ".2f") + "x"])
    head = [[a for a, _ in METHOD_COLUMNS], [b for _, b in METHOD_COLUMNS]]
    widths = [max(len(line[i]) for line in head + body if i < len(line) and len(line) == len(METHOD_COLUMNS))
              for i in range(len(METHOD_COLUMNS))]
    def align(line):
        if len(line) != len(METHOD_COLUMNS):  # an error row
            return "  ".join([line[0].ljust(widths[0])] + line[1:])
        return "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]).rstrip()
    return [align(line) for line in head + body]


# ---------------------------------------------------------------------------------------------------------------
# Command line


DEMO = dict(model="tiny-vqa", policy="full,modes", thresholds="benchmarks/tiny-vqa/thresholds-0.75.json")


def check_args(args):
    # no --model, --config or --policy: the demo, MoDES against the full model on the shipped tiny-vqa checkpoint
    args.demo = args.model is None and args.config is None and args.policy is None
    if args.demo:
        args.model, args.policy = DEMO["model"], DEMO["policy"]
        args.thresholds = args.thresholds or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          DEMO["thresholds"])
    args.model = "tiny-qwen" if args.model is None and args.config is None else args.model
    args.policy = "full" if args.policy is None else args.policy
    # the header and row JSON lines: always, but for the demo on a terminal (its table comes at the end)
    args.json_lines = not (args.demo and sys.stdout.isatty())
    cli.check(args.random_weights == bool(args.config),
              "--config FILE and --random-weights go together (real-size architecture, random weights)")
    for name in ("batch", "decode_steps", "repeats", "image_size"):
        cli.check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "text_tokens", "keep"):
        cli.check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    cli.check(0.0 < args.target <= 1.0, f"--target must be in (0, 1], got {args.target}")
    given, args.policy = args.policy, [p for p in args.policy.split(",") if p]
    cli.check(args.policy and all(p in ("full", "modes", "threshold", "reduce-k") for p in args.policy),
              f"--policy {given!r}: a comma list of full, modes, threshold, reduce-k")
    cli.check("modes" not in args.policy or args.thresholds,
              "--policy modes needs --thresholds FILE (made by search.py)")
    args.device = cli.check_device(args.device)
    args.compile = args.device.startswith("cuda") if args.compile is None else args.compile
    args.cuda_graph = args.device.startswith("cuda") if args.cuda_graph is None else args.cuda_graph
    cli.check(not args.cuda_graph or args.device.startswith("cuda"), "--cuda-graph needs a CUDA --device")
    cli.check(not args.plot or args.json, "--plot DIR draws from the --json FILE: give both")
    cli.set_threads(args.threads)
    if args.json:
        cli.check_output(args.json, "--json", inputs=[(args.thresholds, "--thresholds"), (args.config, "--config")])
    if args.plot:  # now, not after a long run
        plot.require_matplotlib()
        plot.check_out_dir(args.plot, "--plot")


def main(args):
    check_args(args)
    rank, world, args.device = cli.init_distributed(args.device)  # torchrun: the ranks run one model together
    # the thresholds are read and checked before the weights load, against the architecture alone (a model on the
    # meta device holds no weights)
    source = args.config or tiny.resolve(args.model)
    skeleton = build(read_config(source), "meta")
    what = f"--config {args.config}" if args.config else f"--model {args.model}"
    check_fits(skeleton if world == 1 else build(read_config(source), "meta", shard=Shard(rank, world)), what, args)
    top_k = skeleton.cfg.num_experts_per_tok
    cli.check(args.keep <= top_k, f"--keep {args.keep}: the model routes each token to {top_k} experts")
    modes = router.load_thresholds(args.thresholds, skeleton) if args.thresholds else None
    model, load_s, host_load = build_model(args, source, Shard(rank, world))
    # every rank runs the measurements, rank 0 reports them
    with contextlib.redirect_stdout(open(os.devnull, "w")) if rank > 0 else contextlib.nullcontext():
        result = speed(model, source, load_s, host_load, args, modes)
    if rank > 0:
        return
    failed = [r for r in result["rows"] if "error" in r]
    if args.json:
        cli.write_json(args.json, result)
        if args.plot and not failed:
            print("plots:", ", ".join(plot.plot_artifact(args.json, args.plot)))
        elif args.plot:
            print("plots: not drawn, the result has error rows", file=sys.stderr)
    if args.demo:
        print("\n".join(["", f"# MoDES (--thresholds {DEMO['thresholds']}) against the full model, "
                              f"{result['threads']} thread{'s' if result['threads'] != 1 else ''}:"] + method_table(result["rows"])), flush=True)
        if args.json:
            print(f"# the whole result: {args.json}; the last line too")
    print(json.dumps(result), flush=True)
    if failed:
        print(f"error: {len(failed)} of {len(result['rows'])} rows failed: "
              + "; ".join(f"{r['policy']}: {r['error']}" for r in failed), file=sys.stderr)
        sys.exit(1)


def parser():
    p = argparse.ArgumentParser(description="Time vision, prefill and decode per skip policy (evaluate.py compares "
                                "their answers). Without --model, --config and --policy: MoDES against the full "
                                f"model on {DEMO['model']} (--policy {DEMO['policy']} --thresholds "
                                f"{DEMO['thresholds']}), with a table of skip ratios and speed-ups.",
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", help=f"checkpoint folder, or a built-in one: {', '.join(tiny.CHECKPOINTS)} "
                   f"(default tiny-qwen; {DEMO['model']} without --policy)")
    p.add_argument("--config", help="a config.json: benchmark that architecture (with --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="random weights, no checkpoint needed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=list(cli.DTYPES), help="weights and activations")
    p.add_argument("--policy", help="comma list of: full, modes (needs --thresholds), threshold "
                   "(single tau fitted to --target on the prompt), reduce-k (keeps --keep slots) (default full; "
                   f"{DEMO['policy']} without --model and --config)")
    p.add_argument("--thresholds", help="thresholds file from search.py, for --policy modes")
    p.add_argument("--target", type=float, default=0.88, help="skip ratio for --policy threshold")
    p.add_argument("--keep", type=int, default=1, help="slots kept by --policy reduce-k")
    p.add_argument("--expert-impl", default="auto", choices=EXPERT_IMPLS,
                   help="ref (the readable loop in model.py) or a moe_kernels.py path")
    p.add_argument("--batch", type=int, default=1, help="rows of the same prompt")
    p.add_argument("--image-size", type=int, default=256, help="side of the square image, pixels")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens after the image")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: on for cuda)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the decode step in a CUDA graph and replay it (default: on for cuda)")
    p.add_argument("--check-graph", action="store_true",
                   help="also compare the timed decode step's logits with eager decoding's, fed the same tokens")
    p.add_argument("--compare-transformers", action="store_true", help="also time transformers' implementation")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--plot", metavar="DIR", help="with --json: also draw the result's plots into DIR (matplotlib)")
    cli.add_threads_arg(p)
    return p


if __name__ == "__main__":
    cli.run(main, parser().parse_args())
