"""bench.py without --model, --config and --policy: MoDES against the full model on tiny-vqa, with an aligned
table of skip ratios and speed-ups; the JSON lines kept for pipes (benchmarks/gpu.sh records every JSON line) and
left out on a terminal; --threads; requests that cannot fit refused in one line before anything is allocated."""
import io
import json
import os
import subprocess
import sys
import time

import pytest

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--repeats", "1", "--warmup", "0", "--decode-steps", "2", "--threads", "1"]


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_demo_shows_modes_against_full_and_keeps_the_json_lines():
    r = run(*QUICK)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert [x.get("record") for x in records] == ["header", "row", "row", None]  # the contract: as measured, then all
    header, result = records[0], records[-1]
    assert header["threads"] == 1 and header["source"].endswith("tiny-vqa")
    assert [row["policy"] for row in result["rows"]] == ["full", "modes"] and lines[-1].startswith("{")
    table = lines[lines.index(next(line for line in lines if line.startswith("# MoDES"))) + 1:-1]
    assert table[0].split() == ["policy", "skip", "prefill", "skip", "decode", "TTFT", "decode", "speed-up"]
    assert len({len(line) for line in table[1:]}) == 1, table  # aligned: every line as wide
    modes = table[-1].split()
    assert modes[0] == "modes" and modes[-2].endswith("x") and float(modes[3].rstrip("%")) > 50  # skips, speed-up
    assert "1 threads" in lines[0]  # the header line names the threads


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_demo_on_a_terminal_prints_the_table_and_the_result_last(monkeypatch, tmp_path):
    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    bench.main(bench.parser().parse_args(QUICK + ["--json", str(tmp_path / "r.json")]))
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("{") for line in lines) == 1 and lines[-1].startswith("{")  # only the whole result
    assert json.loads(lines[-1]) == json.loads((tmp_path / "r.json").read_text())
    assert any(line.startswith("modes ") for line in lines)


def test_explicit_policy_is_unchanged():
    args = bench.parser().parse_args(["--policy", "full"])
    bench.check_args(args)
    assert (args.model, args.policy, args.thresholds, args.json_lines) == ("tiny-qwen", ["full"], None, True)
    args = bench.parser().parse_args(["--model", "tiny-kimi"])
    bench.check_args(args)
    assert (args.model, args.policy, args.demo) == ("tiny-kimi", ["full"], False)


def test_real_size_model_refused_before_allocating():
    t0 = time.perf_counter()
    r = run("--config", "configs/qwen3_vl_235b_a22b.json", "--random-weights")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert r.stderr.startswith("error: --config configs/qwen3_vl_235b_a22b.json: needs about ")
    assert "weights +" in r.stderr and "KV cache" in r.stderr and "free on cpu" in r.stderr
    assert r.stdout == "" and time.perf_counter() - t0 < 60


@pytest.mark.parametrize("extra,message", [(["--text-tokens", "1000000"], "max_position_embeddings"),
                                           (["--threads", "-1"], "--threads must be >= 0")])
def test_refused_in_one_line(extra, message):
    r = run("--model", "tiny-qwen", *extra)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr[-2000:]
