"""One step of benchmarks/gpu.sh: prints one JSON line per result (the shell appends them to results.jsonl).

    python3 benchmarks/gpu_run.py probe             what the numbers are measured on (versions, driver, clocks,
                                                    commit, compile settings), copy bandwidth, the SDPA kernel each
                                                    attention shape of the run gets, a grouped_mm check
    python3 benchmarks/gpu_run.py probe --quick     the same record without the SDPA and grouped_mm checks
    python3 benchmarks/gpu_run.py experts           every expert path against model.py's loop at the real Qwen and
                                                    Kimi shapes in bf16, then its time per call
    python3 benchmarks/gpu_run.py tiles             the Triton decode kernel's tiles, over kept slots
    add --dry-run: CPU, tiny shapes, the same steps and output (CI runs it so the plumbing is proven).

Kernel times are of many calls replayed in one CUDA graph (launch overhead excluded), rotating through routing
tables that touch more expert weights than the L2 cache holds, so "% of floor" compares against the copy bandwidth
measured on the same GPU in the same process. On a CPU (--dry-run) the times are host timings of the same calls
and say so ("timer": "host").
"""
import argparse
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import moe_kernels  # noqa: E402
from model import SKIP, attention, block_diagonal_attention, routed_experts  # noqa: E402

SHAPES = {"qwen3_vl_30b": dict(E=128, K=8, H=2048, I=768), "kimi_vl_a3b": dict(E=64, K=6, H=2048, I=1408)}
DRY_SHAPES = {"tiny_qwen": dict(E=32, K=4, H=128, I=64), "tiny_kimi": dict(E=16, K=4, H=128, I=64)}
# the gather path copies every slot's weights ([T, K, 3I, H]): it is checked only where that copy stays this small
GATHER_MAX_BYTES = 4 << 30
NVIDIA_SMI_FIELDS = ["driver_version", "name", "pstate", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
                     "clocks.applications.graphics", "clocks.applications.memory", "power.limit", "temperature.gpu",
                     "persistence_mode", "mig.mode.current", "ecc.mode.current"]


def emit(step, **fields):
    print(json.dumps(dict(step=step, **fields)), flush=True)


def first_line(error):
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


# ---------------------------------------------------------------------------------------------------------------
# What a number was measured on


def nvidia_smi():
    """Driver, clocks and modes of GPU 0 as nvidia-smi reports them; a field this driver does not know is asked
    for alone so the others still come back."""
    def query(fields):
        out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise RuntimeError((out.stdout + out.stderr).strip().splitlines()[0] if out.stdout + out.stderr else "")
        return dict(zip(fields, (v.strip() for v in out.stdout.strip().split(","))))
    try:
        return query(NVIDIA_SMI_FIELDS)
    except FileNotFoundError:
        return dict(error="nvidia-smi not found")
    except (RuntimeError, subprocess.TimeoutExpired):
        info = {}
        for field in NVIDIA_SMI_FIELDS:
            try:
                info.update(query([field]))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                info[field] = f"unavailable ({first_line(e)})"
        return info


def source_state():
    """The commit when the checkout has its .git (only the working tree may travel to the GPU machine, so
    GIT_COMMIT may name it instead), and a sha256 of the code and configs that ran, which needs no .git."""
    commit = os.environ.get("GIT_COMMIT")
    dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip() or commit
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    files = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    files += sorted(os.path.join(d, f) for d in ("configs", "benchmarks", "support")
                    if os.path.isdir(os.path.join(ROOT, d))
                    for f in os.listdir(os.path.join(ROOT, d)) if f.endswith((".py", ".json", ".sh")))
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0")
        with open(os.path.join(ROOT, f), "rb") as fh:
            h.update(fh.read())
    return dict(commit=commit, dirty=dirty, source_sha256=h.hexdigest()[:16], source_files=len(files))


def compile_settings():
    """What a compiled decode step's timing depends on: the torch.compile call of moe_kernels.DecodeStep, the
    Inductor and Dynamo settings that change the code it generates, the Triton tiles and the TORCH*/TRITON*
    environment."""
    call = next((line.strip() for line in inspect.getsource(moe_kernels.DecodeStep.__init__).splitlines()
                 if "torch.compile(" in line), None)
    inductor = {}
    try:
        from torch._inductor import config as ic
        for name in ("max_autotune", "max_autotune_gemm", "coordinate_descent_tuning", "epilogue_fusion",
                     "freezing", "fx_graph_cache", "triton.cudagraphs", "triton.cudagraph_trees"):
            obj = ic
            for part in name.split("."):
                obj = getattr(obj, part, None)
            inductor[name] = obj if isinstance(obj, (bool, int, float, str, type(None))) else repr(obj)
    except ImportError as e:
        inductor["error"] = first_line(e)
    dynamo = {name: getattr(torch._dynamo.config, name, None) for name in ("cache_size_limit", "recompile_limit")}
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(("TORCH", "TRITON", "CUDA_", "PYTORCH", "NVIDIA_TF32", "OMP_NUM_THREADS"))}
    return dict(decode_compile_call=call, inductor=inductor, dynamo=dynamo, triton_tiles=dict(moe_kernels.TRITON_TILES),
                decode_max_slots=moe_kernels.DECODE_MAX_SLOTS, env=env)


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device):
    info = dict(torch=torch.__version__, python=platform.python_version(), device=device,
                triton=getattr(getattr(moe_kernels, "triton", None), "__version__", None),
                transformers=version("transformers"), numpy=version("numpy"), host=platform.node(),
                cpus=os.cpu_count(), **source_state())
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nvidia_smi=nvidia_smi())
    return info


# ---------------------------------------------------------------------------------------------------------------
# Timing


def copy_bandwidth_gb_s(device, n_bytes, copies=10, rounds=5):
    """GB/s of a device-to-device copy, read + write bytes (the ceiling a weight-streaming decode reaches): CUDA
    events around `copies` back-to-back copies, median of `rounds` (host timers read ~10 % low on a GPU)."""
    x = torch.empty(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(rounds):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(copies):
                y.copy_(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e-3 / copies)
        else:
            t0 = time.perf_counter()
            for _ in range(copies):
                y.copy_(x)
            times.append((time.perf_counter() - t0) / copies)
    return 2 * n_bytes / statistics.median(times) / 1e9


def graph_us(fn, calls, rep_ms=10):
    """(microseconds per call, how timed) of fn, which makes `calls` kernel calls, replayed in a CUDA graph.
    Triton's do_bench_cudagraph when importable; else our own capture of enough fn() calls for ~rep_ms,
    timed with CUDA events around each replay."""
    try:
        from triton.testing import do_bench_cudagraph
    except ImportError:
        do_bench_cudagraph = None
    if do_bench_cudagraph is not None:
        try:
            return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3 / calls, "cuda graph (triton)"
        except TypeError:  # an older signature (no return_mode): our own capture below
            pass
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles Triton kernels) outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    inner = max(1, min(1000, int(rep_ms * 1e-3 / max(time.perf_counter() - t0, 1e-6))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    times = []
    for _ in range(10):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    return statistics.median(times) / calls, "cuda graph (events)"


def time_us(fn, calls, device, reps):
    """(microseconds per call, how timed): a CUDA graph on the GPU (falling back to events around eager calls,
    with the reason, when the calls cannot be captured); host timers on a CPU."""
    if device == "cuda":
        try:
            return graph_us(fn, calls)
        except Exception as e:  # e.g. a host sync inside the capture: still a number, marked as eager
            torch.cuda.synchronize()
            reason = first_line(e)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fn()
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) * 1e3 / reps / calls, f"eager events (capture failed: {reason})"
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times), "host"


def floor_fields(read_bytes, us, bandwidth_gb_s):
    """The bandwidth view of one call: GB/s reached and the time the measured copy bandwidth needs to stream
    read_bytes (the floor), as a share of the measured time."""
    floor_us = read_bytes / (bandwidth_gb_s * 1e3)  # GB/s * 1e3 = bytes per microsecond
    return dict(read_bytes=int(read_bytes), us=round(us, 2), gb_s=round(read_bytes / us / 1e3, 1) if us > 0 else None,
                floor_us=round(floor_us, 2), pct_of_floor=round(100 * floor_us / us, 1) if us > 0 else None,
                bandwidth_gb_s=round(bandwidth_gb_s, 1))


# ---------------------------------------------------------------------------------------------------------------
# Routing tables


def routing(T, E, K, device, g, kept_slots=None, skip_ratio=None):
    """ids [T, K] of distinct experts, SKIP where dropped (the slots from kept_slots on, or each slot with
    probability skip_ratio), and fp32 mixing weights [T, K]."""
    ids = torch.rand(T, E, generator=g).topk(K).indices
    w = torch.rand(T, K, generator=g)
    if skip_ratio is not None:
        drop = torch.rand(T, K, generator=g) < skip_ratio
    else:
        drop = torch.arange(K)[None].expand(T, K) >= kept_slots
    return ids.masked_fill(drop, SKIP).to(device), w.to(device)


def rotated_decode_tables(E, K, kept_slots, n, device, g):
    """n one-token routing tables whose experts walk through all E in steps of K, so consecutive calls read
    different experts' weights and a cycle reads far more than the L2 cache holds (at the real shapes)."""
    tables = []
    for i in range(n):
        ids = (torch.arange(K) + i * K) % E
        ids = ids.masked_fill(torch.arange(K) >= kept_slots, SKIP)[None]
        tables.append((ids.to(device), torch.rand(1, K, generator=g).to(device)))
    return tables


def kept_experts(tables):
    """Distinct experts each table reads, averaged, and distinct over the whole rotation."""
    per = [len(set(ids[ids != SKIP].tolist())) for ids, _ in tables]
    union = set().union(*(set(ids[ids != SKIP].tolist()) for ids, _ in tables))
    return sum(per) / len(per), len(union)


def gather_bytes(T, K, H, I, element_size):
    return T * K * 3 * H * I * element_size


# ---------------------------------------------------------------------------------------------------------------
# Steps


def probe(device, dry, quick=False):
    emit("probe", **environment(device))
    emit("probe", compile=compile_settings())
    n = (8 << 20) if dry else (1 << 30)
    emit("probe", copy_bandwidth_gb_s=round(copy_bandwidth_gb_s(device, n), 1), bytes=n,
         timer="cuda events" if device == "cuda" else "host")
    if quick:
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # the SDPA kernel each attention shape of gpu.sh gets (bf16 on the GPU): the one actually run, from the
    # profiler's op names, and which backends accept it
    S, T, B, N = (64, 8, 2, 256) if dry else (2048, 327, 8, 6400)
    cases = {"qwen decode (GQA folded, mask)": ("causal", (1, 4, 8, 128), (1, 4, T, 128), 128, True),
             "qwen prefill (is_causal, GQA)": ("causal", (B, 32, S, 128), (B, 4, S, 128), 128, False),
             "kimi prefill (is_causal, 192-d q/k)": ("causal", (B, 16, S, 192), (B, 16, S, 192), 128, False),
             # vision towers: one 1280 px (Qwen, 80x80 patches) / 1260 px (Kimi, 90x90) image per segment
             "qwen vision (block diagonal)": ("block", (N, 16, 72), (N, 16, 72), 72, False),
             "kimi vision (block diagonal)": ("block", ((8100 if not dry else N), 16, 72),
                                              ((8100 if not dry else N), 16, 72), 72, False)}
    for name, (kind, qs, ks, dv, masked) in cases.items():
        try:
            q, k = torch.randn(qs, device=device, dtype=dtype), torch.randn(ks, device=device, dtype=dtype)
            v = torch.randn(ks[:-1] + (dv,), device=device, dtype=dtype)
            mask = torch.ones(qs[0], 1, qs[2], ks[2], dtype=torch.bool, device=device) if masked else None
            call = (lambda: attention(q, k, v, mask)) if kind == "causal" else \
                (lambda: block_diagonal_attention(q, k, v, [qs[0] // 2, qs[0] - qs[0] // 2]))
            emit("probe", sdpa=name, q=list(qs), k=list(ks), chosen=sdpa_ops(call), eligible=sdpa_eligible(call),
                 default_us=round(time_us(call, 1, device, 3 if dry else 10)[0], 1))
        except Exception as e:  # one shape failing says so and the others still run
            emit("probe", sdpa=name, error=first_line(e))
    # grouped_mm on this device, against a loop over the groups
    g = torch.Generator().manual_seed(0)
    a = torch.randn(96, 64, generator=g).to(device, dtype)
    b = torch.randn(4, 64, 32, generator=g).to(device, dtype)
    offs = torch.tensor([10, 40, 40, 96], dtype=torch.int32, device=device)
    try:
        out = moe_kernels._grouped_mm(a, b, offs=offs).float()
        ref = torch.cat([a[s:e].float() @ b[i].float() for i, (s, e) in enumerate(zip([0, 10, 40, 40], offs.tolist()))])
        emit("probe", grouped_mm="ok", rel_err=float((out - ref).norm() / ref.norm()))
    except (RuntimeError, TypeError) as e:
        emit("probe", grouped_mm="failed", error=first_line(e))


def sdpa_ops(call):
    """The aten SDPA kernels a call runs (flash, efficient, cudnn or math), read from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    names = {e.name for e in prof.events()}
    kernels = sorted(n.replace("aten::", "") for n in names
                     if n.startswith("aten::_scaled_dot_product_") or n.endswith("_attention_forward"))
    return kernels or sorted(n for n in names if "attention" in n)


def sdpa_eligible(call):
    works = {}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if not hasattr(torch.nn.attention.SDPBackend, backend):
            continue
        try:
            with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
                call()
            works[backend] = True
        except RuntimeError:
            works[backend] = False
    return works


def experts(device, dry):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    paths = ["grouped", "gather"] + (["triton"] if device == "cuda" and moe_kernels.HAS_TRITON else [])
    bandwidth = copy_bandwidth_gb_s(device, (8 << 20) if dry else (1 << 30))
    reps = 2 if dry else 20
    for name, s in (DRY_SHAPES if dry else SHAPES).items():
        E, K, H, I = s["E"], s["K"], s["H"], s["I"]
        w1 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(device, dtype)
        w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(device, dtype)
        ref_experts = SimpleNamespace(gate_up_proj=w1.float(), down_proj=w2.float())
        expert_bytes = 3 * H * I * w1.element_size()
        for path in paths:
            # correct first: fresh routing tables, the fp32 loop of model.py as the reference
            errs, skipped = [], []
            for T, kept_slots, skip_ratio in [(1, K, None), (1, 1, None), (1, 0, None), (7, None, 0.5),
                                              (64 if dry else 300, None, 0.88)]:
                if path == "gather" and gather_bytes(T, K, H, I, w1.element_size()) > GATHER_MAX_BYTES:
                    skipped.append(T)  # its weight copies would not fit (or would dominate memory)
                    continue
                x = torch.randn(T, H, generator=g).to(device, dtype)
                ids, w = routing(T, E, K, device, g, kept_slots=kept_slots, skip_ratio=skip_ratio)
                ref = routed_experts(x.float(), ref_experts, ids, w, "ref")
                out = moe_kernels.run(x, w1, w2, ids, w, path).float()
                errs.append(float((out - ref).norm() / ref.norm()) if ref.norm() > 0 else float(out.abs().max()))
            emit("experts", model=name, path=path, check="vs fp32 loop", max_rel_err=max(errs), ok=max(errs) < 2e-2,
                 **({"not_checked_T": skipped, "why": f"gather copies over {GATHER_MAX_BYTES >> 30} GiB"}
                    if skipped else {}))
            # decode: one token, 0..K kept slots, rotating through tables that walk over every expert
            for kept_slots in sorted({0, 1, 2, K // 2, K}):
                tables = rotated_decode_tables(E, K, kept_slots, E, device, g)
                x = torch.randn(1, H, generator=g).to(device, dtype)
                fn = lambda: [moe_kernels.run(x, w1, w2, ids, w, path) for ids, w in tables]  # noqa: E731
                us, how = time_us(fn, len(tables), device, reps)
                per_call, union = kept_experts(tables)
                emit("experts", model=name, path=path, phase="decode", T=1, kept_slots=kept_slots, timer=how,
                     rotation_bytes=union * expert_bytes, **floor_fields(per_call * expert_bytes, us, bandwidth))
            if path != "grouped":
                continue  # gather and triton are decode paths: at prefill sizes they copy or re-read every slot
            # prefill: every expert is read, so L2 reuse across calls is small next to the compute
            for T in ((64, 256) if dry else (2048, 16384)):
                for skip_ratio in (0.0, 0.88):
                    tables = [routing(T, E, K, device, g, skip_ratio=skip_ratio) for _ in range(2)]
                    x = torch.randn(T, H, generator=g).to(device, dtype)
                    fn = lambda: [moe_kernels.run(x, w1, w2, ids, w, path) for ids, w in tables]  # noqa: E731
                    us, how = time_us(fn, len(tables), device, reps)
                    per_call, _ = kept_experts(tables)
                    kept_pairs = sum(int((ids != SKIP).sum()) for ids, _ in tables) / len(tables)
                    emit("experts", model=name, path=path, phase="prefill", T=T, skip_ratio=skip_ratio, timer=how,
                         kept_pairs=kept_pairs, tflops=round(2 * kept_pairs * 3 * H * I / us / 1e6, 2),
                         **floor_fields(per_call * expert_bytes, us, bandwidth))


def tile_configs(dry):
    grid = [(16, 64), (32, 128)] if dry else [(16, 128), (32, 64), (32, 128), (32, 256), (64, 64), (64, 128)]
    return [dict(block_n=n, block_k=k, num_warps=nw) for n, k in grid for nw in ([4] if dry else [2, 4, 8])]


def sweep(configs, measure):
    """Rows of measure(config) for every config; one that raises becomes an error row and the sweep goes on."""
    for config in configs:
        try:
            yield from measure(config)
        except Exception as e:  # a tile Triton cannot compile or launch (e.g. out of shared memory)
            yield dict(config, error=first_line(e))


def tiles(device, dry):
    if not (moe_kernels.HAS_TRITON and (device == "cuda" or moe_kernels._TRITON_INTERPRET)):
        emit("tiles", skipped="triton needs CUDA (or TRITON_INTERPRET=1 on a CPU)")
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    bandwidth = copy_bandwidth_gb_s(device, (8 << 20) if dry else (1 << 30))
    default = dict(moe_kernels.TRITON_TILES)
    try:
        for name, s in (DRY_SHAPES if dry else SHAPES).items():
            E, K, H, I = s["E"], s["K"], s["H"], s["I"]
            w1 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(device, dtype)
            w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(device, dtype)
            x = torch.randn(1, H, generator=g).to(device, dtype)
            expert_bytes = 3 * H * I * w1.element_size()
            tables = {k: rotated_decode_tables(E, K, k, E, device, g) for k in sorted({1, 2, K // 2, K})}

            def measure(config):
                moe_kernels.TRITON_TILES.update(gate_up=(config["block_n"], config["block_k"]),
                                                down=(config["block_n"], config["block_k"]),
                                                num_warps=config["num_warps"])
                for kept_slots, rot in tables.items():
                    fn = lambda: [moe_kernels.run(x, w1, w2, ids, w, "triton") for ids, w in rot]  # noqa: E731
                    us, how = time_us(fn, len(rot), device, 2 if dry else 20)
                    yield dict(config, kept_slots=kept_slots, timer=how,
                               **floor_fields(kept_experts(rot)[0] * expert_bytes, us, bandwidth))

            for row in sweep(tile_configs(dry), measure):
                emit("tiles", model=name, **row)
    finally:
        moe_kernels.TRITON_TILES.clear()
        moe_kernels.TRITON_TILES.update(default)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["probe", "experts", "tiles"])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--quick", action="store_true", help="probe: only the record and the copy bandwidth")
    args = p.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        emit(args.step, error="no CUDA device (use --dry-run on a CPU)")
        sys.exit(2)
    if args.step == "probe":
        probe(device, args.dry_run, args.quick)
    else:
        {"experts": experts, "tiles": tiles}[args.step](device, args.dry_run)


if __name__ == "__main__":
    main()
