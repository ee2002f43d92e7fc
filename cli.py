"""What the command-line scripts share: one-line errors, argument and path checks made before the expensive work,
atomic output files and resumable state, a progress line, and torchrun data parallelism.
"""
import json
import math
import os
import sys
import tempfile
import time
import unicodedata

import torch
import torch.distributed as dist

from model import check, read_json  # noqa: F401 (the scripts' one-line refusal and JSON reader)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Errors and checks


def check_device(device):
    """`device` as torch understands it, refused with one line when it does not exist on this machine."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device (cpu, cuda, cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type != "cpu":
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    return str(d)


RUNS = "runs"  # where the scripts write by default, relative to the working directory; made when needed


def check_output(path, what="--out", inputs=()):
    """Refuse an output path that cannot be written (empty, a folder, in a missing or read-only folder, under a
    regular file) or that names one of the run's input files, inputs = [(path or None, argument)], before any work."""
    check(path, f"{what}: empty path, expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if folder == os.path.abspath(RUNS) and not os.path.lexists(folder):
        folder = os.path.dirname(folder)  # write_atomic makes the default folder; nothing is made before any work
    check(not os.path.isdir(path), f"{what} {path}: is a folder, expected a file path")
    above = folder
    while not os.path.exists(above):
        above = os.path.dirname(above)
    check(os.path.isdir(above), f"{what} {path}: {above} is a file, not a folder")
    check(above == folder, f"{what} {path}: folder {folder} does not exist")
    check(os.access(folder, os.W_OK | os.X_OK) and (not os.path.exists(path) or os.access(path, os.W_OK)),
          f"{what} {path}: not writable")
    for other, name in inputs:
        check(not other or os.path.realpath(other) != os.path.realpath(path),
              f"{what} {path}: is also {name}, an input of this run; write the output elsewhere")


def printable(text):
    """text with control characters other than newline and tab escaped, so a terminal shows what was generated."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text)


def run(main, args):
    """main(args); bad input ends as one `error: ...` line on stderr (rank 0 only) and exit status 2, running out of
    device memory as one such line (any rank) and exit status 1."""
    start = "\r\033[K" if sys.stderr.isatty() else ""  # over a progress line left open on the terminal
    try:
        main(args)
    except (OSError, ValueError) as e:
        if is_main():
            print(start + "error: " + str(e).replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as e:  # not bad input, but a fault the user fixes with smaller settings
        print(start + "error: " + str(e).splitlines()[0], file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if is_main():
            print(start + "interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Files


def write_atomic(path, data: bytes):
    """Write through a temporary file in the same folder, then rename: readers never see half a file, an earlier
    file stays intact if writing fails, and nothing is left behind. The file gets the user's umask."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, doc):
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def read_state(path, fmt, settings, what):
    """The state an interrupted run left at path (its --resume file), refused unless it has format fmt and was made
    with the same settings; the message names the settings that differ."""
    state = read_json(path, what)
    check(isinstance(state, dict) and state.get("format") == fmt, f"{path}: not a {what} file; delete it to start over")
    old = state.get("settings")
    other = [k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k]]
    check(not other, f"{path}: made with another {', '.join(other)}; delete it to start over")
    return state


def check_no_state(path, resume):
    """An interrupted run's state is never overwritten unasked: without --resume an existing file is refused."""
    check(resume or not os.path.exists(path),
          f"{path} holds an interrupted run's state: add --resume to continue it, or delete it to start over")


class ResumableOutput:
    """A script's JSON output `out` and the state of an interrupted run beside it (OUT.partial), checked before
    any work: both writable, not one of the run's inputs (pairs (path or None, argument)), and an existing state
    never overwritten unasked. Rank 0 writes; the state is replaced atomically and removed when the output is
    written."""

    def __init__(self, out, resume, inputs=(), what="--out"):
        check_output(out, what, inputs)
        self.out, self.partial, self.resume = out, out + ".partial", resume
        check_output(self.partial, f"{what}'s partial state")
        check_no_state(self.partial, resume)

    def resumed(self):
        """Whether this run continues an interrupted one (--resume and a state file present)."""
        return self.resume and os.path.exists(self.partial)

    def read(self, fmt, settings, what):
        """The interrupted run's state (read_state), or None when there is none to continue."""
        return read_state(self.partial, fmt, settings, what) if self.resumed() else None

    def save(self, state):
        if is_main():
            write_json(self.partial, state)

    def finish(self, doc):
        if is_main():
            write_json(self.out, doc)
            if os.path.exists(self.partial):
                os.remove(self.partial)


# ---------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A status line on stderr: count, rate and time left, redrawn in place on a terminal; in a log (not a
    terminal) one line every 10% or 60 s, and none with quiet or off rank 0. `total` may grow as work is found."""

    def __init__(self, name, total, quiet=False):
        self.name, self.total = name, total
        self.quiet = quiet or not is_main()
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()
        self.last_done = 0

    def update(self, done, note="", finished=False):
        if self.quiet:
            return
        now = time.perf_counter()
        if not finished:
            if done >= self.total:  # the caller's finished=True call draws the last line
                return
            if self.tty and now - self.last < 0.2:
                return
            if not self.tty and done - self.last_done < self.total / 10 and now - self.last < 60:
                return
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f", {(self.total - done) / rate:.0f} s left" if rate > 0 and not finished and done < self.total else ""
        line = f"{self.name}: {done}/{self.total}{' ' + note if note else ''} | {rate:.2f}/s, {elapsed:.0f} s{left}"
        print(("\r" + line + "\033[K") if self.tty else line, end="\n" if finished or not self.tty else "",
              file=sys.stderr, flush=True)
        self.last, self.last_done = now, done


# ---------------------------------------------------------------------------------------------------------------
# torchrun: data parallelism (a model copy and a share of the samples per rank) or model parallelism (the ranks
# run one model together, parallel.py's Shard)


def init_distributed(device):
    """(rank, world size, device) under torchrun (nccl on CUDA, gloo on CPU), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        check(local < torch.cuda.device_count(),
              f"--device cuda: LOCAL_RANK {local}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def data_parallel(model):
    """(rank, world) of the data split: the torchrun ranks when each holds a whole model, (0, 1) without torchrun
    or when they hold one model together (every rank then sees every sample)."""
    if not dist.is_initialized() or model.shard.world > 1:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_sum(t, world):
    """t summed over the `world` data-parallel ranks, in place."""
    if world > 1:
        dist.all_reduce(t)
    return t


def rank_items(items, rank, world):
    """Rank's contiguous slice of items, its share of the data (the official code's split)."""
    size = math.ceil(len(items) / world)
    return items[rank * size:(rank + 1) * size]
