"""
How bench.py measures: wall time synchronised on CUDA, the copy bandwidth a decode step is held against, the peak
memory of one call (CUDA allocator counters, or the CPU profiler's allocation record), the memory free for a run,
and the machine the numbers come from. Nothing here knows about models or policies.
"""
import contextlib
import os
import platform
import resource
import statistics
import sys
import time

import torch

import moe_kernels


def timed(fn, device):
    """(result, seconds) of fn(), synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def host_peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def copy_bandwidth(device, n_bytes=1 << 28):
    """(bytes/s of a device-to-device copy, read + write: the ceiling a decode step can reach, how it was timed).
    On CUDA, events around 10 back-to-back copies (a host timer around one copy reads ~10 % low there)."""
    x, y = torch.empty(2, n_bytes // 4, dtype=torch.float32, device=device)  # source and target
    if not device.startswith("cuda"):
        times = [timed(lambda: y.copy_(x), device)[1] for _ in range(5)]
        return 2 * n_bytes / statistics.median(times[1:]), "host"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(6):
        start.record()
        for _ in range(10):
            y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10)
    return 2 * n_bytes / statistics.median(times[1:]), "cuda events"


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 silenced within the block: torch's CPU profiler prints start and stop lines from C++ on every
    use, noise around the table. Python errors are raised, and printed after the block, as usual."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def step_memory(fn, token, device):
    """(peak bytes above what was allocated before the call, bytes still allocated after it, its output dropped) of
    fn(token): from the CUDA allocator's counters (its peak counter is reset), or on a CPU from the profiler's
    record of each allocation. A CUDA graph allocates its memory pool when captured, on its first call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(token)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn(token)
    level = peak = 0
    for size in allocation_sizes(prof):
        level += size
        peak = max(peak, level)
    return peak, level


def allocation_sizes(prof):
    """Each allocation (bytes > 0) and release (< 0) a profiler with profile_memory=True recorded, in order."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)
    events = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree()) if e.tag == _EventType.Allocation]
    return [e.extra_fields.alloc_size for e in sorted(events, key=lambda e: e.start_time_ns)]


def machine(device):
    """What the numbers were measured on: processor or GPU, cores and threads, and torch's parallel settings."""
    info = dict(torch=torch.__version__, python=platform.python_version(), cores=os.cpu_count(),
                threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads())
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}",
                    triton=moe_kernels.triton_kernels()["triton"].__version__ if moe_kernels.HAS_TRITON else None)
    elif os.path.isfile("/proc/cpuinfo"):  # Linux names the processor there
        with open("/proc/cpuinfo") as f:
            info["device"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    info["device"] = info.get("device") or platform.processor() or platform.machine()
    info["blas"] = next((part.split("=", 1)[1] for part in torch.__config__.show().replace(",", " ").split()
                         if part.startswith("BLAS_INFO=")), None)
    info["parallel"] = next((line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
                             if line.startswith("ATen parallel backend")), None)
    return info


def free_bytes(device):
    """Memory free for this run on `device`: the CUDA driver's count, or the host's available memory (what the
    kernel can give without swapping: MemAvailable, else free pages)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
