"""
Speed and memory of the handwritten forward: load, vision tower, language-model prefill, decode.

Prefill is compute-bound and decode is bandwidth-bound, so they are timed apart: the vision tower and the language
model prefill separately, then decode steps with the KV cache. Every number is a median over --repeats runs after
--warmup runs; on CUDA each timing is synchronised. The last stdout line is one JSON object.

Examples
    python bench.py                                          # tiny built-in checkpoint, CPU, fp32
    python bench.py --model ~/Qwen3-VL-30B-A3B-Instruct --device cuda --dtype bfloat16 --image-size 1024
"""
import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch

import model as M
import processor


def synthetic_image(size, seed=0):
    """A deterministic colourful test card (no files needed)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    rgb = torch.stack([x, y, (x * 7).sin().abs()], -1) * 200 + torch.rand(size, size, 3, generator=g) * 55
    return Image.fromarray(rgb.to(torch.uint8).numpy())


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


def make_inputs(proc, args, device):
    """One user turn: a synthetic image and a question padded with filler words to about --text-tokens."""
    words = "Describe the picture in detail, then say what colours you see"
    filler = (" and more" * max(0, args.text_tokens - len(proc.encode(words)))).strip()
    messages = [{"role": "user", "content": [{"type": "image", "image": synthetic_image(args.image_size)},
                                             {"type": "text", "text": f"{words} {filler}".strip()}]}]
    batch = proc(messages)
    ids = batch["input_ids"][None].repeat(args.batch, 1).to(device)
    pixels = {k: None if batch.get(k) is None else batch[k].to(device)
              for k in ("pixel_values", "image_grid_thw")}
    if args.batch > 1:  # the same image once per row
        pixels["pixel_values"] = pixels["pixel_values"].repeat(args.batch, 1)
        pixels["image_grid_thw"] = pixels["image_grid_thw"].repeat(args.batch, 1)
    return ids, pixels


@torch.no_grad()
def measure(model, ids, pixels, args):
    """Median seconds of the vision tower, the language-model prefill and one decode step."""
    dev = args.device
    B, S = ids.shape
    vision_s, prefill_s, decode_s = [], [], []
    for r in range(args.warmup + args.repeats):
        media, tv = timed(lambda: model.encode_vision(ids, **pixels), dev)
        cache = model.new_cache(B, S + args.decode_steps + 1)
        logits, tp = timed(lambda: model(ids, cache=cache, media=media, **pixels), dev)
        token = logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(args.decode_steps):
            logits, td = timed(lambda: model(token, cache=cache), dev)
            token = logits[:, -1:].argmax(-1)
            steps.append(td)
        if r >= args.warmup:
            vision_s.append(tv)
            prefill_s.append(tp)
            decode_s.append(statistics.median(steps))
    return dict(vision_ms=1e3 * statistics.median(vision_s), prefill_lm_ms=1e3 * statistics.median(prefill_s),
                decode_ms_per_token=1e3 * statistics.median(decode_s))


def main(args):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    path = args.model or M.default_checkpoint()
    host_before = host_peak_bytes()
    model, load_s = timed(lambda: M.load(path, device=args.device, dtype=dtype), args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    host_load_peak = host_peak_bytes() - host_before
    proc = processor.QwenProcessor.from_dir(path)
    ids, pixels = make_inputs(proc, args, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = measure(model, ids, pixels, args)
    cfg = model.cfg
    row = dict(
        model=path, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
        or platform.machine(), torch=torch.__version__, dtype=args.dtype, batch=args.batch, prompt_tokens=ids.shape[1],
        visual_tokens=int((ids[0] == cfg.image_token_id).sum()), image_size=args.image_size,
        decode_steps=args.decode_steps, repeats=args.repeats, warmup=args.warmup,
        load_s=load_s, weight_bytes=weight_bytes, host_load_peak_bytes=host_load_peak, **result,
        decode_tokens_per_s=args.batch * 1e3 / result["decode_ms_per_token"],
        peak_memory_bytes=torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else host_peak_bytes())
    print(f"# {row['device']} | torch {row['torch']} | {args.dtype} | batch {args.batch} | prompt {row['prompt_tokens']} "
          f"tokens ({row['visual_tokens']} visual, image {args.image_size}px) | {args.decode_steps} decode steps | "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"# model {path}")
    table = [("load", f"{load_s:.2f} s", f"host peak +{host_load_peak / 2**20:.0f} MiB for "
                                         f"{weight_bytes / 2**20:.0f} MiB of weights"),
             ("vision tower", f"{result['vision_ms']:.1f} ms", ""),
             ("language-model prefill", f"{result['prefill_lm_ms']:.1f} ms", f"{ids.numel()} tokens"),
             ("decode", f"{result['decode_ms_per_token']:.2f} ms/token", f"{row['decode_tokens_per_s']:.1f} tokens/s"),
             ("peak memory", f"{row['peak_memory_bytes'] / 2**20:.0f} MiB",
              "CUDA allocated" if args.device.startswith("cuda") else "host RSS")]
    for name, value, note in table:
        print(f"{name:<24} {value:>16}   {note}")
    print(json.dumps(row))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Time the vision tower, prefill and decode of a checkpoint.")
    p.add_argument("--model", help="checkpoint folder (default: the tiny built-in checkpoint)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1, help="rows of the same prompt")
    p.add_argument("--image-size", type=int, default=256, help="side of the square synthetic image, pixels")
    p.add_argument("--text-tokens", type=int, default=32, help="approximate text tokens of the question")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    try:
        main(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
