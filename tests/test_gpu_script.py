"""benchmarks/gpu.sh --dry-run: the GPU command's plumbing on a CPU (tiny models and shapes, the same steps and
output), so a lent GPU's few minutes are not spent discovering a typo."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = ["qwen-decode", "qwen-prefill-b8", "kimi-decode", "kimi-prefill-b8"]
COMPILED = ["qwen-decode-compiled", "kimi-decode-compiled"]
STEPS = ["probe", "gpu-tests", "experts", "tiles"] + HEADLINE + COMPILED


def test_dry_run_produces_every_result(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), BUDGET="1500", MODES_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1600)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    status = {d["step"]: d["status"] for d in lines if "status" in d}
    log = (tmp_path / "log.txt").read_text()
    assert status == {s: "ok" for s in STEPS}, log[-3000:]
    data = {}
    for d in lines:
        if "data" in d:
            data.setdefault(d["step"], []).append(d["data"])
    assert any("copy_bandwidth_gb_s" in d for d in data["probe"]) and any("sdpa" in d for d in data["probe"])
    assert all(d["ok"] for d in data["experts"] if "check" in d) and any("us" in d for d in data["experts"])
    assert data["tiles"]  # measured under TRITON_INTERPRET, else one line saying why not
    for step in HEADLINE + COMPILED:
        *streamed, bench = data[step]  # bench.py's lines: a header, one per row as measured, the whole result last
        assert [d["record"] for d in streamed] == ["header"] + ["row"] * len(bench["rows"]), step
        assert [{k: v for k, v in d.items() if k != "record"} for d in streamed[1:]] == bench["rows"], step
        assert [row["policy"] for row in bench["rows"]][:2] == ["full", "threshold"], step
        assert not any("error" in row for row in bench["rows"]), step
        assert bench["rows"][1]["skip_prefill_all"] >= 0.88
        assert bench["copy_bandwidth_timer"] == "host"  # a CPU's copy is never passed off as a GPU one
        if "decode" in step:
            checks = [row["graph_check"] for row in bench["rows"] if row["policy"] != "transformers"]
            assert checks and all(c["ok"] and c["top1_decided"] > 0 for c in checks), (step, checks)
            assert all(c["exact_required"] == ("compiled" not in step) for c in checks), step  # eager: bitwise
            assert all(row["step_peak_bytes"] > 0 and row["eager_step_peak_bytes"] > 0
                       for row in bench["rows"] if row["policy"] != "transformers"), step
    assert [row["policy"] for row in data["qwen-decode"][-1]["rows"]] == ["full", "threshold", "transformers"]
    assert data["qwen-prefill-b8"][-1]["batch"] == 2
