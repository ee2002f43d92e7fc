"""
Greedy generation with a Qwen3-VL-MoE or Kimi-VL checkpoint, with or without MoDES skipping: the command line
around model.py, as DeepSeek-V3's and gpt-fast's generate.py are.

generate() decodes with the static KV cache; with compile=True the decode step goes through moe_kernels.DecodeStep
(torch.compile, and a CUDA graph on a GPU). --thresholds (search.py's output) installs the MoDES policy and reports
the skip ratios. --model takes a checkpoint folder or a built-in name (support/tiny.py).

Examples
    python generate.py --prompt hi                                 # tiny built-in checkpoint (random weights)
    python generate.py --model tiny-vqa --prompt "what color is the shape?" --image examples/shape.png
    python generate.py --model ~/Qwen3-VL-30B-A3B-Instruct --prompt "What is this?" --image cat.jpg \
        --device cuda --dtype bfloat16 --max-new-tokens 64
    python generate.py --prompt "Describe the clip" --video frames/ --json
    torchrun --nproc_per_node 8 generate.py --model ~/Qwen3-VL-235B-A22B-Instruct --prompt "What is this?" \
        --image cat.jpg --device cuda --dtype bfloat16                # one model over 8 GPUs
"""
import argparse
import json
import sys
import time

import torch

import cli
import model
import moe_kernels
import processor
import router
from model import check, is_any
from parallel import Shard
from support import tiny


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens=32, stop_ids=(), stats=None, compile=False,
             **pixels):
    """Greedy decoding with the KV cache. input_ids [B, S] (left padded) -> new token ids [B, n]; a row that hit
    a stop id keeps emitting it. compile: decode steps through moe_kernels.DecodeStep (torch.compile, and a CUDA graph
    on a GPU) instead of eagerly."""
    B, S = input_ids.shape
    check(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check(S + max_new_tokens <= model.cfg.max_position_embeddings, f"{S} prompt tokens + {max_new_tokens} new "
              f"tokens exceed the model's max_position_embeddings {model.cfg.max_position_embeddings}")
    cache = model.new_cache(B, S + max_new_tokens)
    logits = model(input_ids, attention_mask, cache=cache, stats=stats, last_only=True, **pixels)[:, -1]
    step = moe_kernels.DecodeStep(model, cache, stats) if compile else (lambda t: model.decode_step(t, cache, stats))
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for i in range(max_new_tokens):
        token = logits.argmax(-1)  # [B]
        token = torch.where(done, out[-1] if out else token, token)
        out.append(token)
        done |= is_any(token, stop)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(token[:, None])
        cache.length += 1
    return torch.stack(out, 1)


def main(args):
    cli.check(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    rank, world, device = cli.init_distributed(cli.check_device(args.device))  # torchrun: the ranks run one model
    compile = device.startswith("cuda") if args.compile is None else args.compile
    path = tiny.resolve(args.model)
    # the inputs and the thresholds are read and checked before the weights load; the thresholds against the
    # architecture alone (a model on the meta device holds no weights)
    cfg = model.read_config(path)
    proc = processor.for_model(path, cfg.model_type)
    batch = proc.from_cli(args.prompt, images=args.image, video=args.video, system=args.system)
    prompt_tokens = len(batch["input_ids"])
    cli.check(prompt_tokens + args.max_new_tokens <= cfg.max_position_embeddings,
              f"--prompt with its images and video is {prompt_tokens} tokens; with --max-new-tokens "
              f"{args.max_new_tokens} that exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    policy = router.load_thresholds(args.thresholds, model.build(cfg, "meta")) if args.thresholds else None
    t0 = time.perf_counter()
    special_ids = processor.special_token_ids(path)
    net = model.set_expert_impl(model.load(path, device, cli.DTYPES[args.dtype], Shard(rank, world), special_ids),
                                args.expert_impl)
    load_s = time.perf_counter() - t0
    if policy is not None:
        router.install(net, policy)
    stats = router.SkipStats(len(net.layers), device) if policy is not None else None
    pixels = {k: batch[k].to(device) for k in processor.PIXEL_KEYS if batch.get(k) is not None}
    input_ids = batch["input_ids"][None].to(device)
    t0 = time.perf_counter()
    token_ids = generate(net, input_ids, max_new_tokens=args.max_new_tokens, stop_ids=proc.stop_token_ids,
                         stats=stats, compile=compile, **pixels)[0].tolist()
    report = dict(text=proc.decode(token_ids), token_ids=token_ids, prompt_tokens=input_ids.shape[1], model=path,
                  load_s=round(load_s, 3), generate_s=round(time.perf_counter() - t0, 3))
    if rank > 0:  # every rank has the same tokens and skip counts; rank 0 reports them
        return
    if tiny.random_weights_note(args.model):
        print(tiny.random_weights_note(args.model), file=sys.stderr)
    print(cli.printable(report["text"]))
    if stats is not None:
        s = stats.summary()
        report["skip_ratio"] = {phase: {m: s[phase][m] for m in ("text", "vision", "all")} for phase in s}
        report["skip_per_layer"] = {phase: s[phase]["per_layer"] for phase in ("prefill", "decode")}
        print(f"skipped routed-expert slots: prefill {s['prefill']['all']:.1%} (text {s['prefill']['text']:.1%}, "
              f"vision {s['prefill']['vision'] or 0:.1%}), decode {s['decode']['all'] or 0:.1%}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))


def parser():
    p = argparse.ArgumentParser(description="Greedy generation with Qwen3-VL-MoE or Kimi-VL from a Hugging Face "
                                "checkpoint folder.")
    p.add_argument("--model", help=f"checkpoint folder, or a built-in one: {', '.join(tiny.CHECKPOINTS)} "
                   "(default tiny-qwen)")
    p.add_argument("--prompt", required=True, help="user text")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    p.add_argument("--video", help="a folder of frame images or an animated GIF")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=32, help="at most this many generated tokens (>= 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: each rank's LOCAL_RANK GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--thresholds", help="MoDES thresholds file from search.py: skip experts while generating")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step and capture it in a CUDA graph (default: on for cuda)")
    p.add_argument("--expert-impl", default="auto", choices=model.EXPERT_IMPLS,
                   help="routed-expert compute: ref (the readable loop) or a moe_kernels.py path (default auto)")
    p.add_argument("--json", action="store_true", help="last stdout line: a JSON object with text and token ids")
    return p


if __name__ == "__main__":
    cli.run(main, parser().parse_args())
