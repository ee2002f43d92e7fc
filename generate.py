"""
Greedy generation with a Qwen3-VL-MoE or Kimi-VL checkpoint, with or without MoDES skipping: the command line
around model.py, as DeepSeek-V3's and gpt-fast's generate.py are.

generate() decodes a left-padded batch with the static KV cache, every row as it would be alone (its own positions,
its own stop, its own skip counts in a RowStats); with compile=True the decode step goes through
moe_kernels.DecodeStep (torch.compile, and a CUDA graph on a GPU). --thresholds (search.py's output) installs the
MoDES policy and reports the skip ratios. --model takes a checkpoint folder or a built-in name (support/tiny.py).

Examples
    python generate.py --prompt hi                                 # tiny built-in checkpoint (random weights)
    python generate.py --model tiny-vqa --prompt "what color is the shape?" --image examples/shape.png
    python generate.py --model ~/Qwen3-VL-30B-A3B-Instruct --prompt "What is this?" --image cat.jpg \
        --device cuda --dtype bfloat16 --max-new-tokens 64
    python generate.py --prompt "Describe the clip" --video frames/ --json
    python generate.py --model tiny-vqa --image examples/shape.png --prompt "what color is it?" \
        --prompt "what shape is it?"                                 # one batch, one answer per line
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
from model import SKIP, check, is_any
from parallel import Shard
from support import tiny


class RowStats:
    """Skip counts per batch row: router.SkipStats's counts with a row axis, counts [2, L, B, 3, 2] (phase, layer,
    row, modality, (skipped, total)). Padding is not counted, nor a decode step of a row that has already stopped
    (alive [B], kept by generate), so each row counts what it counts when generated alone. Tensors only: a compiled
    decode step records into it."""

    def __init__(self, batch, n_layers, device="cpu"):
        self.counts = torch.zeros(len(router.PHASES), n_layers, batch, 3, 2, dtype=torch.int64, device=device)
        self.alive = torch.ones(batch, dtype=torch.bool, device=device)

    def record(self, layer, ids, modality, valid, phase):
        """As router.SkipStats.record; ids [T, K] of the batch's [B, S] tokens flattened row by row."""
        T, B = ids.shape[0], self.alive.shape[0]
        row = torch.arange(T, device=ids.device) // (T // B)  # [T]
        keep = (valid & self.alive[row] if phase == "decode" else valid).long()
        counts = self.counts[router.PHASES.index(phase), layer].view(B * 3, 2)  # (row, modality) x (skipped, total)
        counts[:, 0].index_add_(0, row * 3 + modality, (ids == SKIP).sum(-1) * keep)
        counts[:, 1].index_add_(0, row * 3 + modality, keep * ids.shape[-1])

    def row(self, b):
        """Row b's counts as a router.SkipStats (its summary() gives the row's skip ratios)."""
        stats = router.SkipStats(self.counts.shape[1], self.counts.device)
        stats.counts.copy_(self.counts[:, :, b])
        return stats


def pad_prompts(prompts, pad_id, device="cpu"):
    """Processor outputs, one per prompt -> (input_ids [B, S] left padded with pad_id, attention_mask [B, S],
    pixels): each pixel tensor and grid concatenated in row order, the order in which the vision towers fill the
    media pads and rope_index reads the grids. Left padding keeps every row's last token at the end, where the
    decode steps append."""
    S = max(len(p["input_ids"]) for p in prompts)
    input_ids = torch.full((len(prompts), S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = len(p["input_ids"])
        input_ids[b, S - n:], attention_mask[b, S - n:] = torch.as_tensor(p["input_ids"]), 1
    pixels = {k: torch.cat([p[k] for p in prompts if p.get(k) is not None]).to(device)
              for k in processor.PIXEL_KEYS if any(p.get(k) is not None for p in prompts)}
    return input_ids.to(device), attention_mask.to(device), pixels


def until_stop(row, stop_ids):
    """A generated row's token ids up to its first stop id (excluded)."""
    row = row.tolist() if isinstance(row, torch.Tensor) else list(row)
    return row[:next((k for k, t in enumerate(row) if t in stop_ids), len(row))]


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens=32, stop_ids=(), stats=None, compile=False,
             **pixels):
    """Greedy decoding with the KV cache. input_ids [B, S] (left padded, attention_mask 0 at the padding) -> new
    token ids [B, n]; a row that hit a stop id keeps emitting it until every row has stopped. Each row gets the
    tokens it gets alone: its own positions (the cache's next_pos per row), its padding masked out.
    stats: a router.SkipStats (the rows' counts summed) or a RowStats (per row); neither counts padding nor the
    decode steps of a row that has stopped. Any other collector (anything with SkipStats.record) gets every call. compile: decode steps through moe_kernels.DecodeStep (torch.compile,
    and a CUDA graph on a GPU, one per batch size) instead of eagerly."""
    B, S = input_ids.shape
    check(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check(S + max_new_tokens <= model.cfg.max_position_embeddings, f"{S} prompt tokens + {max_new_tokens} new "
              f"tokens exceed the model's max_position_embeddings {model.cfg.max_position_embeddings}")
    summed = isinstance(stats, router.SkipStats)  # counted per row here, the rows' sum added at the end
    rows = RowStats(B, len(model.layers), input_ids.device) if summed else stats
    cache = model.new_cache(B, S + max_new_tokens)
    logits = model(input_ids, attention_mask, cache=cache, stats=rows, last_only=True, **pixels)[:, -1]
    step = moe_kernels.DecodeStep(model, cache, rows) if compile else (lambda t: model.decode_step(t, cache, rows))
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
        if isinstance(rows, RowStats):
            rows.alive.copy_(~done)  # in place: a captured decode graph reads it
        logits = step(token[:, None])
        cache.length += 1
    if summed:
        stats.counts += rows.counts.sum(2)
    return torch.stack(out, 1)


def main(args):
    cli.check(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cli.set_threads(args.threads)
    rank, world, device = cli.init_distributed(cli.check_device(args.device))  # torchrun: the ranks run one model
    compile = device.startswith("cuda") if args.compile is None else args.compile
    path = tiny.resolve(args.model)
    # the inputs and the thresholds are read and checked before the weights load; the thresholds against the
    # architecture alone (a model on the meta device holds no weights)
    cfg = model.read_config(path)
    proc = processor.for_model(path, cfg.model_type, cli.check_max_tiles(args.max_tiles))
    # several --prompt: one batch, every prompt with the same images and video
    batches = [proc.from_cli(p, images=args.image, video=args.video, system=args.system) for p in args.prompt]
    prompt_tokens = max(len(b["input_ids"]) for b in batches)
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
    stats = RowStats(len(batches), len(net.layers), device) if policy is not None else None
    input_ids, attention_mask, pixels = pad_prompts(batches, proc.pad_token_id, device)
    t0 = time.perf_counter()
    tokens = generate(net, input_ids, attention_mask, max_new_tokens=args.max_new_tokens,
                      stop_ids=proc.stop_token_ids, stats=stats, compile=compile, **pixels)
    generate_s = time.perf_counter() - t0
    if rank > 0:  # every rank has the same tokens and skip counts; rank 0 reports them
        return
    if tiny.random_weights_note(args.model):
        print(tiny.random_weights_note(args.model), file=sys.stderr)
    rows = []
    for b, row in enumerate(tokens.tolist()):
        ids = row[:len(until_stop(row, proc.stop_token_ids)) + 1]  # up to its stop token, as when alone
        rows.append(dict(text=proc.decode(ids), token_ids=ids, prompt_tokens=len(batches[b]["input_ids"])))
        print(cli.printable(rows[-1]["text"]))
        if stats is not None:
            rows[-1].update(skip_report(stats.row(b), "" if len(batches) == 1 else f"prompt {b + 1}: "))
    report = dict(rows[0] if len(rows) == 1 else dict(rows=rows), model=args.model or tiny.DEFAULT, load_s=round(load_s, 3),
                  generate_s=round(generate_s, 3))
    if args.json:
        print(json.dumps(report))


def skip_report(stats, label):
    """The JSON fields of a generation's skip ratios, and their line on stderr."""
    s = stats.summary()
    print(f"{label}skipped routed-expert slots: prefill {s['prefill']['all']:.1%} (text {s['prefill']['text']:.1%}, "
          f"vision {s['prefill']['vision'] or 0:.1%}), decode {s['decode']['all'] or 0:.1%}", file=sys.stderr)
    return dict(skip_ratio={phase: {m: s[phase][m] for m in ("text", "vision", "all")} for phase in s},
                skip_per_layer={phase: s[phase]["per_layer"] for phase in ("prefill", "decode")})


def parser():
    p = argparse.ArgumentParser(description="Greedy generation with Qwen3-VL-MoE, Kimi-VL or InternVL-3.5 from a "
                                "Hugging Face checkpoint folder.", formatter_class=cli.HelpFormatter)
    p.add_argument("--model", help=f"checkpoint folder, or a built-in one: {', '.join(tiny.CHECKPOINTS)} "
                   "(default tiny-qwen)")
    p.add_argument("--prompt", action="append", required=True,
                   help="user text; repeat for a batch of prompts (each with the same --image and --video)")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    p.add_argument("--video", help="a folder of frame images or an animated GIF")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=32, help="at most this many generated tokens (>= 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: each rank's LOCAL_RANK GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--thresholds", help="MoDES thresholds file from search.py: skip experts while generating")
    cli.add_max_tiles_arg(p)
    cli.add_threads_arg(p)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step and capture it in a CUDA graph (default: on for cuda)")
    p.add_argument("--expert-impl", default="auto", choices=model.EXPERT_IMPLS,
                   help="routed-expert compute: ref (the readable loop) or a moe_kernels.py path (default auto)")
    p.add_argument("--json", action="store_true", help="last stdout line: a JSON object with text and token ids "
                   "(several prompts: one per prompt in its rows list)")
    return p


if __name__ == "__main__":
    cli.run(main, parser().parse_args())
