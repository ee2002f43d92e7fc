"""
Speed, memory and skip ratios of the handwritten forward, one row per skip policy, measured in the same run.

Prefill is compute-bound and decode is bandwidth-bound, so they are timed apart: the vision tower and the language
model prefill separately, then decode steps with the static KV cache (compiled, CUDA-graphed on GPU, unless
--no-compile). Every number is a median over --repeats runs after --warmup runs (their time is reported apart);
on CUDA each timing is synchronised. Decode GB/s counts the bytes a step must read (all non-expert weights, the
kept experts, the KV cache); its floor is those bytes at the bandwidth measured by a device copy. The last stdout
line is one JSON object.

Examples
    python bench.py                                                  # tiny built-in checkpoint, CPU
    python bench.py --model tiny-kimi                                # the tiny Kimi-VL one
    python bench.py --model ~/Qwen3-VL-30B-A3B-Instruct --device cuda --dtype bfloat16 --thresholds thr.json
    python bench.py --config configs/qwen3_vl_30b_a3b.json --random-weights --device cuda --dtype bfloat16 \
        --policy full,threshold --target 0.88 --batch 8 --image-size 1280 --text-tokens 400
    python bench.py --config configs/qwen3_vl_moe_cpu_bench.json --random-weights --policy full,threshold \
        --compare-transformers --no-compile
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

import model as M
import router

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    """(result, seconds) of fn(), synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def host_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def copy_bandwidth(device, n_bytes=1 << 28):
    """Bytes/s of a device-to-device copy (read + write), the ceiling a decode step can reach."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    times = [timed(lambda: y.copy_(x), device)[1] for _ in range(5)]
    return 2 * n_bytes / statistics.median(times[1:])


def build(args):
    """(model, source, load seconds, host peak growth)."""
    dtype = DTYPES[args.dtype]
    before = host_peak_bytes()
    if args.config:
        def make():
            cfg = M.read_config(args.config)
            with torch.device("meta"):
                m = M.MODELS[type(cfg)](cfg)
            return M.random_weights(m.to(dtype).to_empty(device=args.device)).eval().requires_grad_(False)
        model, seconds = timed(make, args.device)
        source = args.config
    else:
        source = M.resolve_model(args.model)
        model, seconds = timed(lambda: M.load(source, device=args.device, dtype=dtype), args.device)
    return M.set_expert_impl(model, args.expert_impl), source, seconds, host_peak_bytes() - before


def synthetic_inputs(model, args):
    """A batch of identical rows <image placeholders><text>: a square random image of --image-size pixels
    (rounded to the merge grid) and --text-tokens random text ids, in the model's own input format."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, min(cfg.vocab_size, 1000), (args.text_tokens,), generator=g).tolist()
    if isinstance(model, M.KimiVL):
        p, (kh, kw) = cfg.patch_size, cfg.merge_kernel_size
        side = max(1, round(args.image_size / (p * kh))) * kh  # patches per side
        row = [cfg.media_placeholder_token_id] * (side * side // (kh * kw)) + text
        pixels = dict(pixel_values=torch.randn(args.batch * side * side, 3, p, p, generator=g),
                      image_grid_hws=torch.tensor([[side, side]] * args.batch))
    else:
        v = cfg.vision
        side = max(1, round(args.image_size / (v.patch_size * v.spatial_merge_size))) * v.spatial_merge_size
        pads = [cfg.image_token_id] * (side * side // v.spatial_merge_size ** 2)
        row = [cfg.vision_start_token_id] + pads + [cfg.vision_end_token_id] + text
        pixels = dict(pixel_values=torch.randn(args.batch * side * side, v.in_channels * v.temporal_patch_size
                                               * v.patch_size ** 2, generator=g),
                      image_grid_thw=torch.tensor([[1, side, side]] * args.batch))
    ids = torch.tensor([row] * args.batch, device=args.device)
    return ids, {k: t.to(args.device) for k, t in pixels.items()}


def prefill_ratio(model, ids, pixels, policy):
    """Prefill skip ratio of `policy` on this prompt (left installed)."""
    router.install(model, lambda i: policy)
    stats = router.SkipStats(len(model.layers))
    with torch.no_grad():
        model(ids, stats=stats, last_only=True, **pixels)
    return stats.summary()["prefill"]["all"] or 0.0


def fit_scalar(ratio, make, target, hi=1.0, steps=12):
    """(make(h), h) for the smallest h (bisection on [0, hi], hi doubled until feasible) with ratio(make(h)) >=
    target, for rules whose skip ratio never falls as h grows. ratio(policy) -> prefill skip ratio."""
    while ratio(make(hi)) < target:
        if hi > 1e3:
            raise ValueError(f"target skip ratio {target:.3f} is out of reach for {make(hi)}")
        hi *= 2
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(make(mid)) < target else (lo, mid)
    return make(hi), hi


def make_policy(name, model, ids, pixels, args):
    if name == "full":
        return None
    if name == "modes":
        if not args.thresholds:
            raise ValueError("--policy modes needs --thresholds FILE (made by search.py)")
        import search
        return search.load_thresholds(args.thresholds, model)
    if name == "threshold":  # for random-weight speed runs: no calibration data, so fitted on the prompt itself
        return fit_scalar(lambda p: prefill_ratio(model, ids, pixels, p), router.Threshold, args.target, steps=20)[0]
    if name == "reduce-k":
        return router.ReduceK(args.keep)
    raise ValueError(f"--policy: unknown policy {name!r} (full, modes, threshold, reduce-k)")


@torch.no_grad()
def measure(model, ids, pixels, args):
    """Median times of the vision tower, the language-model prefill, time to first token and one decode step;
    the skip ratios from one separate, untimed pass with a SkipStats collector."""
    dev = args.device
    B, S = ids.shape
    rows = {"vision": [], "prefill": [], "ttft": [], "decode": []}
    cache = model.new_cache(B, S + args.decode_steps + 1)
    step, warmup_s = timed(lambda: M.decode_step_fn(model, cache, compile=args.compile,
                                                    cuda_graph=args.compile and dev.startswith("cuda")), dev)
    for r in range(args.warmup + args.repeats):
        cache.reset()
        media, tv = timed(lambda: model.encode_vision(ids, **pixels), dev)
        logits, tp = timed(lambda: model(ids, cache=cache, media=media, last_only=True, **pixels), dev)
        token = logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(args.decode_steps):
            logits, td = timed(lambda: step(token, torch.tensor([cache.length], device=dev)), dev)
            cache.length += 1
            token = logits.argmax(-1, keepdim=True)
            steps.append(td)
        if r < args.warmup:  # compilation, autotuning, first-touch allocations
            warmup_s += tv + tp + sum(steps)
            continue
        rows["vision"].append(tv)
        rows["prefill"].append(tp)
        rows["ttft"].append(tv + tp)
        rows["decode"].append(statistics.median(steps))
    out = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in rows.items()}
    stats = router.SkipStats(len(model.layers))
    cache = model.new_cache(B, S + args.decode_steps + 1)
    token = model(ids, cache=cache, stats=stats, last_only=True, **pixels)[:, -1:].argmax(-1)
    for _ in range(args.decode_steps):
        token = model(token, cache=cache, stats=stats)[:, -1:].argmax(-1)
    summary = stats.summary()
    for phase in ("prefill", "decode"):
        for m in ("text", "vision", "all"):
            out[f"skip_{phase}_{m}"] = summary[phase][m]
    out["warmup_s"] = warmup_s
    return out


def roofline(model, args, row, bandwidth, context):
    """Bytes a decode step must read and FLOPs of the prefill, from the shapes and the measured kept fraction."""
    cfg = model.cfg
    elem = torch.finfo(DTYPES[args.dtype]).bits // 8
    moe = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "experts")]
    E, two_i, H = moe[0].experts.gate_up_proj.shape
    expert_params = 3 * (two_i // 2) * H
    routed = len(moe) * E * expert_params
    vision = ("model.visual.", "vision_tower.", "multi_modal_projector.")
    lm = {n: p.numel() for n, p in model.named_parameters() if not n.startswith(vision)}
    embed = sum(v for n, v in lm.items() if "embed_tokens" in n)
    fixed = sum(lm.values()) - embed - routed  # read once per decode step whatever the batch
    kept = 1 - (row["skip_decode_all"] or 0.0)
    slots = args.batch * cfg.num_experts_per_tok * kept  # batch 1: kept slots are distinct experts
    cache = model.new_cache(1, 1, device="meta")
    kv_bytes = (cache.k.numel() + cache.v.numel()) * elem * args.batch * context
    step_bytes = (fixed + len(moe) * min(E, slots) * expert_params) * elem + kv_bytes
    kept_prefill = 1 - (row["skip_prefill_all"] or 0.0)
    S = row["prompt_tokens"]
    head_dims = getattr(cfg, "head_dim", None) or (cfg.qk_head_dim + cfg.v_head_dim) / 2
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dims * S * S / 2  # causal QK^T and PV
    per_token = fixed - cfg.vocab_size * H + len(moe) * cfg.num_experts_per_tok * kept_prefill * expert_params
    flops = args.batch * (2 * S * per_token + attn + 2 * cfg.vocab_size * H)  # lm_head on the last token only
    return dict(decode_bytes_per_step=step_bytes, decode_gb_per_s=step_bytes / row["decode_ms"] * 1e-6,
                decode_floor_ms=step_bytes / bandwidth * 1e3,
                decode_pct_of_floor=100 * step_bytes / bandwidth * 1e3 / row["decode_ms"],
                prefill_tflops=flops / row["prefill_ms"] * 1e-9)


@torch.no_grad()
def transformers_row(model, source, ids, pixels, args):
    """The same config, weights (shared, not copied) and inputs through transformers' own implementation."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    if not isinstance(model, M.Qwen3VLMoe):
        raise ValueError("--compare-transformers: only Qwen3-VL-MoE is wired up")
    with open(source if source.endswith(".json") else os.path.join(source, "config.json")) as f:
        hf_cfg = Qwen3VLMoeConfig(**json.load(f))
    with torch.device("meta"):
        hf = Qwen3VLMoeForConditionalGeneration(hf_cfg)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    for mod in hf.modules():  # rotary tables are buffers that the state dict does not carry: rebuild them
        for name, buf in list(mod.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(mod, name, getattr(type(mod)(mod.config), name).to(args.device))
    hf.eval()
    mm = (ids == model.cfg.image_token_id).long()
    dev = args.device
    prefill, decode = [], []
    for r in range(args.warmup + args.repeats):
        out, tp = timed(lambda: hf(input_ids=ids, mm_token_type_ids=mm, use_cache=True, logits_to_keep=1,
                                   **pixels), dev)
        token, past, steps = out.logits[:, -1:].argmax(-1), out.past_key_values, []
        for _ in range(args.decode_steps):
            out, td = timed(lambda: hf(input_ids=token, past_key_values=past, use_cache=True), dev)
            token, past = out.logits[:, -1:].argmax(-1), out.past_key_values
            steps.append(td)
        if r >= args.warmup:
            prefill.append(tp)
            decode.append(statistics.median(steps))
    return dict(ttft_ms=1e3 * statistics.median(prefill), decode_ms=1e3 * statistics.median(decode))


# ---------------------------------------------------------------------------------------------------------------
# Fidelity: MoDES and the baselines at the skip ratio MoDES reaches on its calibration data


BASELINES = ("reduce-k", "threshold", "threshold+gmlg", "dmt", "naee", "mc-moe", "diep")


def baseline_policy(name, model, evaluator, alpha, gamma, target):
    """(policy, its hyperparameter) of a baseline fitted to `target` on the calibration evaluator. One β for all
    layers where the paper searches a per-layer β genetically (modes.md §8): a documented simplification."""
    import search

    def ratio(policy):
        return evaluator.score(policy)["skip"]["all"]
    if name == "reduce-k":  # discrete: the largest k' that still reaches the target
        K = model.cfg.num_experts_per_tok
        k = next((k for k in range(K, 1, -1) if ratio(router.ReduceK(k)) >= target), 1)
        return router.ReduceK(k), k
    rules = {"threshold": lambda t: router.Threshold(t), "threshold+gmlg": lambda t: router.Threshold(t, alpha),
             "naee": router.NAEE, "mc-moe": router.MCMoE, "diep": lambda b: router.DiEP(b, gamma)}
    if name in rules:
        return fit_scalar(ratio, rules[name], target)
    if name == "dmt":  # two thresholds without alpha: the same frontier search as MoDES, on grids up to tau = 1
        def dmt(tau_text, tau_vision):
            result = evaluator.score(router.DMT(tau_text, tau_vision))
            return result["kl"], result["skip"]
        grid = router.threshold_grid(40, x_max=1.0)
        best, _ = search.search(dmt, grid, grid, target, quiet=True)
        if best is None:
            raise ValueError(f"dmt: target skip ratio {target:.3f} is out of reach on the grid")
        tau = (float(grid[best[0]]), float(grid[best[1]]))
        return router.DMT(*tau), tau
    raise ValueError(f"--baselines: unknown baseline {name!r} ({', '.join(BASELINES)})")


def normalise_answer(text):
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


@torch.no_grad()
def exact_match(model, proc, samples, policy, device):
    """Share of samples whose greedy answer equals the reference answer (case and punctuation ignored)."""
    import calibrate as C
    router.install(model, lambda i: policy)
    hits = 0
    for s in samples:
        content = [{"type": "image", "image": im} for im in s.images] + \
            ([{"type": "video", "video": s.video}] if s.video else []) + [{"type": "text", "text": s.question}]
        batch = proc([{"role": "user", "content": content}])
        pixels = {k: batch[k].to(device) for k in C.PIXEL_KEYS if batch.get(k) is not None}
        n = len(proc.encode(s.answer)) + 4
        ids = M.generate(model, batch["input_ids"][None].to(device), max_new_tokens=n,
                         stop_ids=proc.stop_token_ids, **pixels)[0].tolist()
        hits += normalise_answer(proc.decode(ids)) == normalise_answer(s.answer)
    router.uninstall(model)
    return hits / len(samples)


def fidelity(model, source, args):
    """Rows of skip ratios, mean answer-token KL and top-1 agreement against the unskipped model, and exact-match
    accuracy with retention, on the evaluation set (--data, or built-in synthetic samples unseen in calibration)."""
    import calibrate as C
    import processor
    import search
    if not args.thresholds:
        raise ValueError("--fidelity needs --thresholds FILE (made by search.py)")
    doc = C.read_json(args.thresholds, "thresholds")
    modes = search.load_thresholds(args.thresholds, model)
    proc = processor.for_model(source, model.cfg.model_type)
    info = doc["data"]
    if info["source"] == "synthetic":
        calib = C.select(C.synthetic_samples(), info["n"], info["start"], info["seed"])
    elif info["source"].endswith(".jsonl") and os.path.exists(info["source"]):
        calib = C.select(C.read_jsonl(info["source"]), info["n"], info["start"], info["seed"])
    else:
        raise ValueError(f"{args.thresholds}: calibration data {info['source']} cannot be re-read here")
    evals = C.read_jsonl(args.data)[:args.eval_n] if args.data else C.synthetic_samples(args.eval_n, seed=1)
    target = doc["skip_ratio"]["all"]
    alpha = C.alpha_table(doc, len(model.layers))
    calib_eval = search.Evaluator(model, proc, calib, doc, quiet=True)
    test_eval = search.Evaluator(model, proc, evals, doc, quiet=True)
    gamma = router.diep_gamma(C.expert_similarity(model, proc, calib)) if "diep" in args.baselines else None
    rows = [dict(policy="full", hyper=None, policy_obj=None), dict(policy="modes", hyper=[doc["tau"]["text"],
                                                                   doc["tau"]["vision"]], policy_obj=modes)]
    for name in filter(None, args.baselines.split(",")):
        policy, hyper = baseline_policy(name, model, calib_eval, alpha, gamma, target)
        rows.append(dict(policy=name, hyper=hyper, policy_obj=policy))
    for r in rows:
        policy = r.pop("policy_obj")
        r["calib_skip"] = calib_eval.score(policy)["skip"]["all"]
        r.update(test_eval.score(policy))
        r["accuracy"] = exact_match(model, proc, evals, policy, args.device) if args.accuracy else None
    full_acc = rows[0]["accuracy"]
    print(f"# fidelity on {args.data or 'built-in synthetic samples (seed 1)'} ({len(evals)} samples); every policy "
          f"fitted to MoDES's calibration skip ratio {target:.3f}")
    print("policy | hyperparameter | calib skip | skip all | text | vision | KL | top-1 | accuracy | retention")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        r["retention"] = None if not full_acc or r["accuracy"] is None else 100 * r["accuracy"] / full_acc
        hyper = "/".join(format(h, ".4g") for h in (r["hyper"] if isinstance(r["hyper"], (list, tuple)) else
                                                       [] if r["hyper"] is None else [r["hyper"]])) or "-"
        print(" | ".join([r["policy"], hyper, fmt(r["calib_skip"], ".3f"), fmt(r["skip"]["all"], ".3f"),
            fmt(r["skip"]["text"], ".3f"), fmt(r["skip"]["vision"], ".3f"), fmt(r["kl"], ".4g"), fmt(r["top1"], ".3f"),
            fmt(r["accuracy"], ".3f"), fmt(r["retention"], ".1f")]))
    return rows


def main(args):
    if args.random_weights != bool(args.config):
        raise ValueError("--config FILE and --random-weights go together (real-size architecture, random weights)")
    model, source, load_s, host_load = build(args)
    if args.fidelity:
        report(dict(source=source, thresholds=args.thresholds, fidelity=fidelity(model, source, args)), args.json)
        return
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids, pixels = synthetic_inputs(model, args)
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else platform.processor() or platform.machine())
    bandwidth = copy_bandwidth(args.device)
    header = dict(source=source, device=device_name, torch=torch.__version__, dtype=args.dtype, batch=args.batch,
                  prompt_tokens=ids.shape[1], visual_tokens=int((ids[0] == model.cfg.image_token_id).sum()),
                  model_type=model.cfg.model_type,
                  decode_steps=args.decode_steps, repeats=args.repeats, warmup=args.warmup, compile=args.compile,
                  expert_impl=args.expert_impl, threads=torch.get_num_threads(), load_s=load_s,
                  weight_bytes=weight_bytes, host_load_peak_bytes=host_load, copy_bandwidth_gb_s=bandwidth / 1e9)
    print(f"# {device_name} | torch {torch.__version__} | {args.dtype} | batch {args.batch} | prompt "
          f"{header['prompt_tokens']} tokens ({header['visual_tokens']} visual) | {args.decode_steps} decode steps | "
          f"compile {'on' if args.compile else 'off'} | experts {args.expert_impl} | median of {args.repeats} "
          f"after {args.warmup} warm-up")
    print(f"# {source}: loaded in {load_s:.2f} s, host peak +{host_load / 2**20:.0f} MiB for "
          f"{weight_bytes / 2**20:.0f} MiB of weights; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for name in args.policy.split(","):
        router.uninstall(model)
        policy = make_policy(name, model, ids, pixels, args)
        router.install(model, lambda i: policy)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        row = dict(policy=name, prompt_tokens=ids.shape[1], **measure(model, ids, pixels, args))
        row.update(roofline(model, args, row, bandwidth, ids.shape[1] + args.decode_steps // 2))
        row["decode_tokens_per_s"] = args.batch * 1e3 / row["decode_ms"]
        row["peak_memory_bytes"] = (torch.cuda.max_memory_allocated() if args.device.startswith("cuda")
                                    else host_peak_bytes())
        rows.append(row)
    router.uninstall(model)
    if args.compare_transformers:
        rows.append(dict(policy="transformers", **transformers_row(model, source, ids, pixels, args)))
    full = next((r for r in rows if r["policy"] == "full"), None)
    cols = ("policy", "skip pre", "skip dec", "vision ms", "LM prefill ms", "TTFT ms", "decode ms", "tok/s",
            "GB/s", "% floor", "TFLOP/s", "peak MiB", "x prefill", "x decode")
    print(" | ".join(cols))
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if full:
            r["speedup_prefill"] = full["ttft_ms"] / r["ttft_ms"] if r["policy"] == "transformers" else \
                full["prefill_ms"] / r["prefill_ms"]
            r["speedup_decode"] = full["decode_ms"] / r["decode_ms"]
        print(" | ".join([r["policy"], fmt(r.get("skip_prefill_all"), ".3f"), fmt(r.get("skip_decode_all"), ".3f"),
                          fmt(r.get("vision_ms"), ".1f"), fmt(r.get("prefill_ms"), ".1f"), fmt(r["ttft_ms"], ".1f"),
                          fmt(r["decode_ms"], ".2f"), fmt(args.batch * 1e3 / r["decode_ms"], ".1f"),
                          fmt(r.get("decode_gb_per_s"), ".1f"), fmt(r.get("decode_pct_of_floor"), ".0f"),
                          fmt(r.get("prefill_tflops"), ".3f"),
                          fmt(r["peak_memory_bytes"] / 2**20 if "peak_memory_bytes" in r else None, ".0f"),
                          fmt(r.get("speedup_prefill"), ".2f"), fmt(r.get("speedup_decode"), ".2f")]))
    if args.compare_transformers:
        print("# the transformers row's x prefill compares time to first token (vision tower included)")
    report(dict(header, rows=rows), args.json)


def report(result, path):
    """The result as the last stdout line, and atomically into `path` when given."""
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)
    print(json.dumps(result))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Time vision, prefill and decode per skip policy.")
    p.add_argument("--model", help="checkpoint folder, or tiny-qwen (default) / tiny-kimi (built-in tiny checkpoints)")
    p.add_argument("--config", help="a config.json: benchmark that architecture (with --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="random weights, no checkpoint needed")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--policy", default="full", help="comma list of: full, modes (needs --thresholds), threshold "
                   "(single tau fitted to --target on the prompt), reduce-k (keeps --keep slots)")
    p.add_argument("--thresholds", help="thresholds file from search.py, for --policy modes")
    p.add_argument("--target", type=float, default=0.88, help="skip ratio for --policy threshold")
    p.add_argument("--keep", type=int, default=1, help="slots kept by --policy reduce-k")
    p.add_argument("--expert-impl", default="auto", help="ref (readable loop) or a kernels.py path: auto, grouped, "
                   "gather, loop, triton")
    p.add_argument("--batch", type=int, default=1, help="rows of the same prompt")
    p.add_argument("--image-size", type=int, default=256, help="side of the square image, pixels")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens after the image")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step and capture it in a CUDA graph (default: on for cuda)")
    p.add_argument("--compare-transformers", action="store_true", help="also time transformers' implementation")
    p.add_argument("--fidelity", action="store_true", help="instead of timings: MoDES (--thresholds) and the "
                   "--baselines at equal skip ratio, against the unskipped model on --data")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="comma list for --fidelity: " + ", ".join(BASELINES))
    p.add_argument("--data", help="evaluation JSONL for --fidelity (default: built-in synthetic samples)")
    p.add_argument("--eval-n", type=int, default=16, help="evaluation samples for --fidelity")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="greedy exact-match accuracy per policy in --fidelity (one generation per sample)")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args()
    args.compile = args.device.startswith("cuda") if args.compile is None else args.compile
    try:
        main(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
