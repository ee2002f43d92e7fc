"""What the command-line scripts share: one-line errors, argument and path checks made before the expensive work,
atomic output files and resumable state, a progress line, and torchrun data parallelism.
"""
import argparse
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


class HelpFormatter(argparse.HelpFormatter):
    """--help names every option's default (unless its help already does, or there is none to name)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


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
    """Refuse an output path that cannot be written (empty, a folder, under a regular file, in a read-only folder)
    or that names one of the run's input files, inputs = [(path or None, argument)], before any work. Missing
    folders on the way are made by the write (write_atomic), so nothing is made for a refused run."""
    check(path, f"{what}: empty path, expected a file path")
    check(not os.path.isdir(path), f"{what} {path}: is a folder, expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    above = folder
    while not os.path.exists(above):
        above = os.path.dirname(above)
    check(os.path.isdir(above), f"{what} {path}: {above} is a file, not a folder")
    check(os.access(above, os.W_OK | os.X_OK) and (not os.path.exists(path) or os.access(path, os.W_OK)),
          f"{what} {path}: not writable" + ("" if above == folder else f" ({above} is read-only)"))
    for other, name in inputs:
        check(not other or os.path.realpath(other) != os.path.realpath(path),
              f"{what} {path}: is also {name}, an input of this run; write the output elsewhere")


def check_input_path(path, what):
    """A path argument that is given must not be empty: '' is a mistake (an unset shell variable), not a default."""
    check(path is None or path.strip(), f"{what}: empty path; leave the option out for its default")
    return path


def add_threads_arg(p):
    p.add_argument("--threads", type=int, help="torch CPU threads, 0 = torch's own default (every core). Default: "
                   "$OMP_NUM_THREADS if set, else half the cores, at most 4: on a busy shared machine more threads "
                   "than free cores made calibration 14x and decoding 28x slower")


def add_max_tiles_arg(p):
    p.add_argument("--max-tiles", type=int, help="InternVL only: at most this many 448 px tiles per image (a 4:3 photo "
                   "is 13 tiles, ~3,300 vision tokens, at the folder's default of 12 + a thumbnail)")


def check_max_tiles(n):
    check(n is None or n >= 1, f"--max-tiles must be >= 1, got {n}")
    return n


def default_threads():
    """$OMP_NUM_THREADS if set, else half the usable cores, at most 4 (and at least 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


def set_threads(n):
    """--threads: n >= 1 threads, 0 = torch's default, None = default_threads(); returns the number in use."""
    check(n is None or (isinstance(n, int) and n >= 0), f"--threads must be >= 0 (0 = torch's default), got {n}")
    n = default_threads() if n is None else n
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def printable(text):
    """text with control characters other than newline and tab escaped, so a terminal shows what was generated."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text)


def check_utf8(args):
    """Refuse an argument that is not UTF-8 (Python hands such bytes over as lone surrogates, which the tokenizer
    and the JSON outputs cannot take), naming the option and the byte."""
    for name, value in (vars(args) if args is not None else {}).items():
        for text in value if isinstance(value, list) else [value]:
            bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None) \
                if isinstance(text, str) else None
            if bad is not None:
                raise ValueError(f"--{name.replace('_', '-')}: not UTF-8 text (byte {ord(text[bad]) - 0xdc00:#04x} at "
                                 f"character {bad}); give it in UTF-8")


def run(main, args):
    """main(args); bad input ends as one `error: ...` line on stderr (rank 0 only) and exit status 2, running out of
    device memory as one such line (any rank) and exit status 1."""
    start = "\r\033[K" if sys.stderr.isatty() else ""  # over a progress line left open on the terminal
    try:
        check_utf8(args)
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


def follow_umask(folder):
    """Give a folder made by tools that ignore the umask (tempfile.mkdtemp: 0700; safetensors' save_file: 0600) and
    everything in it the modes the user's umask gives new files and folders."""
    umask = os.umask(0)
    os.umask(umask)
    for top, dirs, names in os.walk(folder):
        os.chmod(top, 0o777 & ~umask)
        for name in names:
            os.chmod(os.path.join(top, name), 0o666 & ~umask)


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


def torchrun_env():
    """(rank, world size, local rank) from torchrun's variables, (0, 1, 0) without torchrun; inconsistent or
    malformed variables are refused in one line instead of hanging in the rendezvous."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    values = {}
    for k, v in env.items():
        if v is not None:
            check(v.strip().isdigit(), f"torchrun: {k}={v!r} is not a non-negative integer")
            values[k] = int(v)
    world = values.get("WORLD_SIZE", 1)
    check(world >= 1, "torchrun: WORLD_SIZE=0; it must be >= 1")
    if world == 1 and "RANK" not in values:
        return 0, 1, 0
    rank, local = values.get("RANK"), values.get("LOCAL_RANK", 0)
    check(rank is not None, f"torchrun: WORLD_SIZE={world} but RANK is not set")
    check(rank < world, f"torchrun: RANK {rank} is not below WORLD_SIZE {world}")
    local_world = values.get("LOCAL_WORLD_SIZE", world)
    check(local < local_world <= world, f"torchrun: LOCAL_RANK {local} / LOCAL_WORLD_SIZE {local_world} do not fit "
                                        f"WORLD_SIZE {world}")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        check(not missing, f"torchrun: WORLD_SIZE={world} but {' and '.join(missing)} not set (start with torchrun)")
        port = os.environ["MASTER_PORT"]
        check(port.isdigit() and 0 < int(port) < 65536, f"torchrun: MASTER_PORT={port!r} is not a port number")
    return rank, world, local


def init_distributed(device):
    """(rank, world size, device) under torchrun (nccl on CUDA, gloo on CPU), else (0, 1, device)."""
    rank, world, local = torchrun_env()
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        check(local < torch.cuda.device_count(),
              f"--device cuda: LOCAL_RANK {local}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=rendezvous(rank, world),
                                rank=rank, world_size=world)
    return dist.get_rank(), world, device


def rendezvous(rank, world):
    """torchrun's env:// store, but waiting at most $MODES_RENDEZVOUS_TIMEOUT seconds (default 300) for the other
    ranks: a rank whose peers never come (WORLD_SIZE larger than the ranks started, two ranks with one RANK) fails
    in one line instead of waiting torch's 30 minutes. The ranks' later collectives keep torch's timeout."""
    import datetime
    wait = os.environ.get("MODES_RENDEZVOUS_TIMEOUT", "300")
    check(wait.isdigit() and int(wait) > 0, f"MODES_RENDEZVOUS_TIMEOUT={wait!r}: expected seconds > 0")
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun's agent hosts it
    sys.stderr.flush()
    saved = os.dup(2)  # torch's C++ side logs each retry and the timeout with a stack trace: our line says it
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        return dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent,
                             timeout=datetime.timedelta(seconds=int(wait)))
    except (RuntimeError, OSError) as e:  # torch's DistStoreError / DistNetworkError
        raise ValueError(f"torchrun: rank {rank} of {world} could not meet the other ranks at {addr}:{port} within "
                         f"{wait} s ({str(e).splitlines()[0][:200]}); are all {world} ranks started, each with its "
                         f"own RANK?") from None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
