"""Per-MoE-layer microbenchmark of kernels.moe_experts on one GPU (kernels.md section 7.6).

Run from the repo root:  python benchmarks/kernels_gpu.py            (H100/H200, bf16, real Qwen/Kimi shapes)
                         python benchmarks/kernels_gpu.py --smoke    (CPU, tiny shapes: checks the script only)
Decode: T=1 with k' kept slots; prefill: N tokens with skip ratio s. Each timing cycles through NSETS different
routing tables so the kept experts are not already in L2 (H100 L2 50 MB vs 9.4-17.3 MB per expert).
Last stdout line: one JSON document.
"""
import argparse, json, os, statistics, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402

MODELS = {"qwen3_vl": dict(E=128, K=8, H=2048, I=768), "kimi_vl": dict(E=64, K=6, H=2048, I=1408)}
SMOKE = {"tiny": dict(E=16, K=8, H=64, I=32)}
NSETS = 8


def routing(T, E, K, kept, device, g):
    ids = torch.rand(T, E, generator=g).topk(K).indices                      # [T, K] distinct experts per token
    w = torch.rand(T, K, generator=g)
    if isinstance(kept, float):                                               # prefill: skip ratio
        drop = torch.rand(T, K, generator=g) < kept
    else:                                                                     # decode: keep the first `kept` slots
        drop = torch.arange(K)[None, :] >= kept
    return ids.masked_fill(drop, kernels.SKIP).to(device), w.to(device)


def timed(fn, inputs, device, reps):
    for a in inputs:
        fn(*a)                                                                # warm-up, compile, any recompile
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for a in inputs:
                fn(*a)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / len(inputs) * 1e3)        # us per call
        else:
            t0 = time.perf_counter()
            for a in inputs:
                fn(*a)
            times.append((time.perf_counter() - t0) / len(inputs) * 1e6)
    return statistics.median(times)


def main(smoke):
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    torch._inductor.config.coordinate_descent_tuning = True                   # gpt-fast: M=1 bmm -> fused reduction
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, m in (SMOKE if smoke else MODELS).items():
        E, K, H, I = m["E"], m["K"], m["H"], m["I"]
        w_gate_up = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(device, dtype)
        w_down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(device, dtype)
        expert_bytes = 3 * H * I * w_down.element_size()
        paths = ["grouped", "gather"] + (["triton"] if device == "cuda" and kernels.HAS_TRITON else [])
        for path in paths:
            for compiled in (False, True):
                torch._dynamo.reset()
                f = lambda x, ids, w, path=path: kernels.moe_experts(x, w_gate_up, w_down, ids, w, path=path)
                if compiled:
                    f = torch.compile(f, fullgraph=True)
                # correctness first: against the fp32 loop on one small routing table
                x = torch.randn(4, H, generator=g).to(device, dtype)
                ids, w = routing(4, E, K, 0.5, device, g)
                ref = kernels.moe_experts(x, w_gate_up, w_down, ids, w, path="loop").float()
                err = ((f(x, ids, w).float() - ref).norm() / ref.norm()).item()
                phases = [("decode", 1, k) for k in sorted({0, 1, 2, 4, K})]
                if path == "grouped":
                    phases += [("prefill", n, s) for n in ((256, 1024) if smoke else (256, 1024, 2048, 4096, 8192))
                               for s in (0.0, 0.5, 0.88)]
                for phase, T, kept in phases:
                    inputs = [(torch.randn(T, H, generator=g).to(device, dtype), *routing(T, E, K, kept, device, g))
                              for _ in range(NSETS)]
                    us = timed(f, inputs, device, reps=3 if smoke else 20)
                    pairs = sum(int((a[1] != kernels.SKIP).sum()) for a in inputs) / NSETS
                    touched = sum(len(set(a[1][a[1] != kernels.SKIP].tolist())) for a in inputs) / NSETS
                    rows.append(dict(model=name, path=path, compiled=compiled, phase=phase, T=T, kept=kept,
                                     us=round(us, 1), rel_err=f"{err:.1e}",
                                     GBps=round(touched * expert_bytes / us / 1e3, 1),
                                     TFLOPs=round(pairs * 6 * H * I / us / 1e6, 2)))
                    print(rows[-1], flush=True)
    header = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
              "torch": torch.__version__, "triton": getattr(getattr(kernels, "triton", None), "__version__", None)}
    print(f"{'model':9} {'path':8} {'comp':5} {'phase':8} {'T':>5} {'kept':>5} {'us':>9} {'GB/s':>7} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['model']:9} {r['path']:8} {str(r['compiled']):5} {r['phase']:8} {r['T']:5} {r['kept']!s:>5} "
              f"{r['us']:9.1f} {r['GBps']:7.1f} {r['TFLOPs']:8.2f}")
    print(json.dumps({"header": header, "rows": rows}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    main(parser.parse_args().smoke)
