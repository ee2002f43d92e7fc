"""benchmarks/gpu.sh and gpu_run.py on a CPU: the headline runs first, each command fits its budget, a failing step
does not stop the next, every step says how it ended on stdout, and the sweeps' pure pieces (field names, the
bandwidth floor, the tile loop going on after an error) do what their names say."""
import importlib.util
import json
import os
import shlex
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = ["qwen-decode", "qwen-prefill-b8", "kimi-decode", "kimi-prefill-b8"]
COMPILED = ["qwen-decode-compiled", "kimi-decode-compiled"]
CHECKS = ["gpu-tests", "experts", "tiles"]


def load_gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", os.path.join(ROOT, "benchmarks", "gpu_run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_run = load_gpu_run()


def plan(*args):
    """{group: (budget, [(step, limit, argv)])} of `gpu.sh --plan ARGS`, groups in run order."""
    r = subprocess.run(["bash", "benchmarks/gpu.sh", "--plan", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    groups = {}
    for line in r.stdout.splitlines():
        if line.startswith("# "):
            _, group, _, budget = line.split()
            groups[group] = (int(budget), [])
        else:
            name, limit, *argv = shlex.split(line)
            groups[group][1].append((name, int(limit), argv))
    return groups


@pytest.mark.parametrize("dry", [False, True])
def test_headline_first_compiled_alone_checks_last(dry):
    groups = plan(*(["--dry-run"] if dry else []))
    assert list(groups) == ["headline", "compiled", "checks"]
    names = {g: [s[0] for s in steps] for g, (_, steps) in groups.items()}
    # the probe (what the GPU is) may come first in each command; nothing else runs before the headline
    assert names["headline"] == ["probe"] + HEADLINE
    assert names["compiled"] == ["probe"] + COMPILED
    assert names["checks"] == ["probe"] + CHECKS
    tests = dict((s[0], s[2]) for s in groups["checks"][1])["gpu-tests"]
    assert tests[:3] == ["python3", "-m", "pytest"]
    # two named files, not the whole suite collected for its gpu marker
    assert [a for a in tests if a.startswith("tests/")] == ["tests/test_gpu.py", "tests/test_kernels.py",
                                                           "tests/test_decode_compile.py"]


def test_each_command_fits_one_call():
    for group, (budget, steps) in plan().items():
        assert budget <= 500, group  # a call is at most 600 s; the timeouts' kill-after and start-up need the rest
        assert sum(limit for _, limit, _ in steps) <= budget + 30, group
        assert all(limit <= budget for _, limit, _ in steps), group


@pytest.mark.parametrize("dry", [False, True])
def test_bench_commands_use_real_flags(dry):
    import bench
    for group, (_, steps) in plan(*(["--dry-run"] if dry else [])).items():
        for name, _, argv in steps:
            if argv[:2] != ["python3", "bench.py"]:
                continue
            args = bench.parser().parse_args(argv[2:])  # SystemExit on a flag bench.py does not have
            assert args.policy == "full,threshold" and args.target == 0.88, name
            assert args.compile is (group == "compiled"), name
            if not dry:
                assert args.random_weights and args.device == "cuda" and args.dtype == "bfloat16", name
                assert args.config.endswith("qwen3_vl_30b_a3b.json" if name.startswith("qwen")
                                            else "kimi_vl_a3b.json"), name
                assert args.batch == (8 if "prefill" in name else 1), name
            if name.startswith("qwen") and group == "headline":
                assert args.compare_transformers, name
            if "decode" in name:
                assert args.check_graph, name


def test_a_failing_step_does_not_stop_the_next(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), MODES_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               FAIL_STEP="gpu-tests")
    r = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "checks"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # every step's status line is on stdout, in order, whatever becomes of the files
    printed = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"step"') and '"status"' in line]
    assert [(d["step"], d["status"]) for d in printed] == [("probe", "ok"), ("gpu-tests", "failed"),
                                                           ("experts", "ok"), ("tiles", "ok")], r.stdout[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines[0]["command"] == "checks" and lines[0]["dry_run"] is True
    assert [d for d in lines if "status" in d] == printed
    experts = [d["data"] for d in lines if d.get("step") == "experts" and "data" in d]
    decode = [d for d in experts if d.get("phase") == "decode"]
    prefill = [d for d in experts if d.get("phase") == "prefill"]
    assert decode and prefill and all(d["ok"] for d in experts if "check" in d)
    assert all("kept" not in d for d in experts)  # each field says what it holds
    assert all(isinstance(d["kept_slots"], int) for d in decode)
    assert {d["skip_ratio"] for d in prefill} == {0.0, 0.88}
    assert all({"us", "floor_us", "pct_of_floor", "bandwidth_gb_s", "timer"} <= set(d) for d in decode + prefill)
    assert all(d["timer"] == "host" for d in decode + prefill)  # never passed off as a GPU time


def test_probe_records_what_a_number_needs(tmp_path):
    r = subprocess.run(["python3", "benchmarks/gpu_run.py", "--dry-run", "probe", "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    env, compiled, bandwidth = rows[:3]
    assert {"torch", "triton", "transformers", "commit", "source_sha256"} <= set(env)
    assert "torch.compile(" in compiled["compile"]["decode_compile_call"]
    assert {"inductor", "dynamo", "triton_tiles", "env"} <= set(compiled["compile"])
    assert bandwidth["copy_bandwidth_gb_s"] > 0 and len(rows) == 3  # --quick: no SDPA or grouped_mm checks


def test_nvidia_smi_fields_come_back_even_when_one_is_unknown(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    # answers one field at a time, refuses the whole list and one unknown field
    fake.write_text('#!/bin/sh\ncase "$3" in *,*) echo "Field is not a valid field"; exit 2;; '
                    '*clocks.applications.memory*) echo "Field is not a valid field"; exit 2;; '
                    '*driver_version*) echo "570.86.15";; *) echo "1980 MHz";; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    info = gpu_run.nvidia_smi()
    assert info["driver_version"] == "570.86.15" and info["clocks.max.sm"] == "1980 MHz"
    assert info["clocks.applications.memory"].startswith("unavailable")


def test_floor_is_from_the_measured_bandwidth():
    row = gpu_run.floor_fields(read_bytes=3e9, us=2000.0, bandwidth_gb_s=3000.0)
    assert row["floor_us"] == 1000.0 and row["pct_of_floor"] == 50.0 and row["gb_s"] == 1500.0
    faster_gpu = gpu_run.floor_fields(read_bytes=3e9, us=2000.0, bandwidth_gb_s=4300.0)
    assert faster_gpu["floor_us"] < row["floor_us"]  # no constant bandwidth inside
    assert gpu_run.floor_fields(0, 5.0, 3000.0)["pct_of_floor"] == 0.0


def test_tile_sweep_goes_on_after_a_failing_config():
    def measure(config):
        if config["block_n"] == 16:
            raise RuntimeError("out of resources: shared memory\nsecond line")
        yield dict(config, us=1.0)

    configs = gpu_run.tile_configs(dry=False)
    rows = list(gpu_run.sweep(configs, measure))
    assert len(rows) == len(configs)
    errors = [r for r in rows if "error" in r]
    assert errors and all(r["block_n"] == 16 for r in errors)
    assert errors[0]["error"] == "RuntimeError: out of resources: shared memory"  # one line
    assert [r for r in rows if "us" in r] and rows[-1]["block_n"] == 64


def test_routing_fields_hold_what_they_say():
    g = torch.Generator().manual_seed(0)
    ids, w = gpu_run.routing(4000, 128, 8, "cpu", g, skip_ratio=0.88)
    assert abs((ids == gpu_run.SKIP).float().mean().item() - 0.88) < 0.01
    ids, _ = gpu_run.routing(5, 128, 8, "cpu", g, kept_slots=3)
    assert ((ids != gpu_run.SKIP).sum(1) == 3).all()
    # decode rotation: consecutive calls read different experts, a cycle reads many (more than L2 at real sizes)
    tables = gpu_run.rotated_decode_tables(128, 8, 2, 128, "cpu", g)
    first, second = (set(t[t != gpu_run.SKIP].tolist()) for t, _ in tables[:2])
    assert len(first) == 2 and not first & second
    per_call, union = gpu_run.kept_experts(tables)
    assert per_call == 2 and union * 3 * 2048 * 768 * 2 > 2 * 50e6


def test_gpu_tests_step_selects_every_gpu_test_and_no_cpu_one():
    tests = dict((s[0], s[2]) for s in plan()["checks"][1])["gpu-tests"]
    r = subprocess.run([*tests[:3], "--collect-only", "-q", *(a for a in tests[3:] if a != "-q")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode in (0, 5), r.stdout + r.stderr  # 5: nothing selected, which the assertions below refuse
    chosen = {line.split("[")[0] for line in r.stdout.splitlines() if "::" in line}
    assert chosen == {"tests/test_kernels.py::test_cuda_bf16_paths_match_loop",
                      "tests/test_kernels.py::test_cuda_bf16_biased_paths_match_loop",
                      "tests/test_gpu.py::test_graphed_decode_matches_eager_teacher_forced",
                      "tests/test_gpu.py::test_expert_paths_at_real_shapes",
                      "tests/test_decode_compile.py::test_triton_path_clones_no_weights_when_compiled"}, r.stdout


def test_gpu_expert_tests_only_where_memory_is_bounded():
    import test_gpu
    for name, s in test_gpu.SHAPES.items():
        for path in list(test_gpu.moe_kernels.PATHS) + ["auto"]:
            cases = test_gpu.expert_cases(name, path)
            assert (1, 0.0) in cases and (4, 0.5) in cases, (name, path)  # every path is tested at decode sizes
            assert ((2048, 0.0) in cases) == (path != "gather"), (name, path)  # gather: 96 / 132 GiB
        assert test_gpu.temporary_bytes("gather", 2048, s["K"], s["H"], s["I"]) > 90 << 30


def test_gather_path_only_where_its_copy_is_bounded():
    for s in gpu_run.SHAPES.values():
        assert gpu_run.gather_bytes(2048, s["K"], s["H"], s["I"], 2) > gpu_run.GATHER_MAX_BYTES
        assert gpu_run.gather_bytes(7, s["K"], s["H"], s["I"], 2) <= gpu_run.GATHER_MAX_BYTES
