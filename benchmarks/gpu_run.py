"""One step of benchmarks/gpu.sh: prints one JSON line per result (the shell appends them to results.jsonl).

    python3 benchmarks/gpu_run.py probe             versions, GPU, copy bandwidth, SDPA backends, a grouped_mm check
    python3 benchmarks/gpu_run.py experts           every expert path against model.py's loop at the real Qwen and
                                                    Kimi shapes in bf16, then its time per call
    python3 benchmarks/gpu_run.py tiles             the Triton decode kernel's tiles, over kept slots 0..K
    add --dry-run: CPU, tiny shapes, the same steps and output (CI runs it so the plumbing is proven).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_kernels  # noqa: E402
from model import attention, routed_experts  # noqa: E402

SHAPES = {"qwen3_vl_30b": dict(E=128, K=8, H=2048, I=768), "kimi_vl_a3b": dict(E=64, K=6, H=2048, I=1408)}
DRY_SHAPES = {"tiny_qwen": dict(E=32, K=4, H=128, I=64), "tiny_kimi": dict(E=16, K=4, H=128, I=64)}


def emit(step, **fields):
    print(json.dumps(dict(step=step, **fields)), flush=True)


def timer(device):
    """median microseconds of fn() over reps calls, events on CUDA."""
    def run(fn, reps):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    return run


def probe(device, dry):
    info = dict(torch=torch.__version__, python=platform.python_version(), device=device,
                triton=getattr(getattr(moe_kernels, "triton", None), "__version__", None))
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count, cuda=torch.version.cuda)
    emit("probe", **info)
    n = (1 << 20) if dry else (1 << 30)
    x = torch.empty(n // 4, device=device)
    y = torch.empty_like(x)
    us = timer(device)(lambda: y.copy_(x), 5)
    emit("probe", copy_bandwidth_gb_s=round(2 * n / us / 1e3, 1), bytes=n)
    # which fused SDPA kernel the attention calls of model.py get at the real shapes (dtype bf16 on the GPU)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    S, T, B = (64, 8, 2) if dry else (2048, 327, 8)
    cases = {"qwen decode (GQA folded, mask)": ((1, 4, 8, 128), (1, 4, T, 128), True),
             "qwen prefill (is_causal, GQA)": ((B, 32, S, 128), (B, 4, S, 128), False),
             "kimi prefill (is_causal, 192-d q/k)": ((B, 16, S, 192), (B, 16, S, 192), False)}
    for name, (qs, ks, masked) in cases.items():
        q, k = torch.randn(qs, device=device, dtype=dtype), torch.randn(ks, device=device, dtype=dtype)
        v = torch.randn(ks[:-1] + (128,), device=device, dtype=dtype)
        mask = torch.ones(qs[0], 1, qs[2], ks[2], dtype=torch.bool, device=device) if masked else None
        works = {}
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            if not hasattr(torch.nn.attention.SDPBackend, backend):
                continue
            try:
                with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                    attention(q, k, v, mask)
                works[backend] = True
            except RuntimeError:
                works[backend] = False
        us = timer(device)(lambda: attention(q, k, v, mask), 3 if dry else 10)
        emit("probe", sdpa=name, q=list(qs), k=list(ks), eligible=works, default_us=round(us, 1))
    # grouped_mm on this device, against a loop over the groups
    g = torch.Generator().manual_seed(0)
    a = torch.randn(96, 64, generator=g).to(device, dtype)
    b = torch.randn(4, 64, 32, generator=g).to(device, dtype)
    offs = torch.tensor([10, 40, 40, 96], dtype=torch.int32, device=device)
    try:
        out = moe_kernels._grouped_mm(a, b, offs=offs).float()
        ref = torch.cat([a[s:e].float() @ b[i].float() for i, (s, e) in enumerate(zip([0, 10, 40, 40], offs.tolist()))])
        emit("probe", grouped_mm="ok", rel_err=float((out - ref).norm() / ref.norm()))
    except RuntimeError as e:
        emit("probe", grouped_mm="failed", error=str(e).splitlines()[0])


def routing(T, E, K, kept, device, g):
    """ids [T, K] of distinct experts, SKIP where dropped (kept: a count of leading slots, or a skip ratio)."""
    ids = torch.rand(T, E, generator=g).topk(K).indices
    w = torch.rand(T, K, generator=g)
    drop = torch.rand(T, K, generator=g) < kept if isinstance(kept, float) else torch.arange(K)[None] >= kept
    return ids.masked_fill(drop, moe_kernels.SKIP).to(device), w.to(device)


def experts(device, dry):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    paths = ["grouped", "gather"] + (["triton"] if device == "cuda" and moe_kernels.HAS_TRITON else [])
    run = timer(device)
    for name, s in (DRY_SHAPES if dry else SHAPES).items():
        E, K, H, I = s["E"], s["K"], s["H"], s["I"]
        w1 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(device, dtype)
        w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(device, dtype)
        ref_experts = SimpleNamespace(gate_up_proj=w1.float(), down_proj=w2.float())
        expert_bytes = 3 * H * I * w1.element_size()
        for path in paths:
            # correct first: fresh routing tables, the fp32 loop of model.py as the reference
            errs = []
            for T, kept in [(1, K), (1, 1), (1, 0), (7, 0.5), (64 if dry else 300, 0.88)]:
                x = torch.randn(T, H, generator=g).to(device, dtype)
                ids, w = routing(T, E, K, kept, device, g)
                ref = routed_experts(x.float(), ref_experts, ids, w, "ref")
                out = moe_kernels.run(x, w1, w2, ids, w, path).float()
                errs.append(float((out - ref).norm() / ref.norm().clamp(min=1e-30)) if ref.norm() > 0
                            else float(out.abs().max()))
            emit("experts", model=name, path=path, check="vs fp32 loop", max_rel_err=max(errs), ok=max(errs) < 2e-2)
            phases = [("decode", 1, k) for k in sorted({0, 1, 2, K // 2, K})]
            if path == "grouped":
                phases += [("prefill", n, r) for n in ((64, 256) if dry else (2048, 16384)) for r in (0.0, 0.88)]
            for phase, T, kept in phases:
                x = torch.randn(T, H, generator=g).to(device, dtype)
                ids, w = routing(T, E, K, kept, device, g)
                us = run(lambda: moe_kernels.run(x, w1, w2, ids, w, path), 3 if dry else 20)
                read = len(set(ids[ids != moe_kernels.SKIP].tolist())) * expert_bytes
                emit("experts", model=name, path=path, phase=phase, T=T, kept=kept, us=round(us, 1),
                     gb_s=round(read / us / 1e3, 1), floor_us=round(read / 4.3e6, 1))


def tiles(device, dry):
    if not (moe_kernels.HAS_TRITON and (device == "cuda" or moe_kernels._TRITON_INTERPRET)):
        emit("tiles", skipped="triton needs CUDA (or TRITON_INTERPRET=1 on a CPU)")
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    run = timer(device)
    default = dict(moe_kernels.TRITON_TILES)
    grid = [(16, 64), (32, 128)] if dry else [(16, 128), (32, 64), (32, 128), (32, 256), (64, 64), (64, 128)]
    warps = [4] if dry else [2, 4, 8]
    for name, s in (DRY_SHAPES if dry else SHAPES).items():
        E, K, H, I = s["E"], s["K"], s["H"], s["I"]
        w1 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(device, dtype)
        w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(device, dtype)
        x = torch.randn(1, H, generator=g).to(device, dtype)
        tables = {kept: routing(1, E, K, kept, device, g) for kept in range(K + 1)}
        for n, k in grid:
            for nw in warps:
                moe_kernels.TRITON_TILES.update(gate_up=(n, k), down=(n, k), num_warps=nw)
                for kept, (ids, w) in tables.items():
                    us = run(lambda: moe_kernels.run(x, w1, w2, ids, w, "triton"), 3 if dry else 50)
                    read = kept * 3 * H * I * w1.element_size()
                    emit("tiles", model=name, block_n=n, block_k=k, num_warps=nw, kept=kept, us=round(us, 2),
                         gb_s=round(read / us / 1e3, 1))
    moe_kernels.TRITON_TILES.clear()
    moe_kernels.TRITON_TILES.update(default)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["probe", "experts", "tiles"])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    args = p.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        emit(args.step, error="no CUDA device (use --dry-run on a CPU)")
        sys.exit(2)
    {"probe": probe, "experts": experts, "tiles": tiles}[args.step](device, args.dry_run)


if __name__ == "__main__":
    main()
