"""Start-up: --help and an argument error answer without importing the compiler stack (torch._inductor, triton:
seconds), which moe_kernels.py imports only when the triton path or a compiled decode step is first used."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["bench.py", "calibrate.py", "search.py", "generate.py", "evaluate.py", "support/train_vqa.py",
           "support/train_scenes.py", "benchmarks/gpu_run.py"]
PROBE = """
import runpy, sys
script, args = sys.argv[1], sys.argv[2:]
sys.argv = [script] + args
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted(m for m in ("torch._inductor", "triton") if m in sys.modules)
print("EXIT", code, "HEAVY", ",".join(heavy) or "-", file=sys.stderr)
"""


def probe(script, *args):
    """(exit status, the compiler modules imported) of `python script args`, run to the end of argument parsing."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", PROBE, script, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1].split()
    assert last[0] == "EXIT", out.stderr[-2000:]
    return last[1], last[3]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_compiler(script):
    code, heavy = probe(script, "--help")
    assert code in ("0", "None") and heavy == "-", (script, code, heavy)


@pytest.mark.parametrize("script", ["bench.py", "calibrate.py", "search.py"])
def test_argument_error_imports_no_compiler(script):
    code, heavy = probe(script, "--no-such-option")
    assert code == "2" and heavy == "-", (script, code, heavy)
