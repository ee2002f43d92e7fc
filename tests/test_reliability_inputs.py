"""Issue 21, bad input and faults: config values, checkpoint files, empty and non-UTF-8 arguments, torchrun
variables, and support/train_vqa.py, each refused in one line before any work (or a damaged cache rebuilt)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cli
import model
import kimi_tokenizer
import processor
from support import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQA = os.path.join(ROOT, "checkpoints", "tiny-vqa")


def copy_of(folder, tmp_path, name="ckpt"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def edit_json(path, change):
    doc = json.load(open(path))
    change(doc)
    open(path, "w").write(json.dumps(doc))


# ---------------------------------------------------------------------------------------------------------------
# Config values: type, range, agreement (item 3)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["text_config"].update(hidden_size="128"), "text_config.hidden_size must be an integer >= 1, got '128'"),
    (lambda r: r["text_config"].update(num_experts_per_tok=0), "text_config.num_experts_per_tok must be an integer >= 1"),
    (lambda r: r["text_config"].update(num_hidden_layers=2.5), "text_config.num_hidden_layers must be an integer"),
    (lambda r: r["text_config"].update(rms_norm_eps=-1e-6), "text_config.rms_norm_eps must be a number > 0"),
    (lambda r: r["text_config"].update(rope_theta="5e6"), "text_config.rope_theta must be a number > 0"),
    (lambda r: r["text_config"].update(attention_bias="false"), "attention_bias must be true or false"),
    (lambda r: r["text_config"].update(num_key_value_heads=3), "is not a multiple of num_key_value_heads 3"),
    (lambda r: r["text_config"].update(mlp_only_layers=[7]), "mlp_only_layers [7] must be layer indices below 4"),
    (lambda r: r["text_config"]["rope_scaling"].update(mrope_section=[6, -5, 5]), "must be integers >= 0"),
    (lambda r: r["vision_config"].update(patch_size=0), "vision_config.patch_size must be an integer >= 1, got 0"),
    (lambda r: r["vision_config"].update(num_position_embeddings=60), "must be a square"),
    (lambda r: r["vision_config"].update(out_hidden_size=64), "vision_config.out_hidden_size 64 must be"),
    (lambda r: r["vision_config"].update(deepstack_visual_indexes=[0, 9]), "deepstack_visual_indexes [0, 9]"),
    (lambda r: r.update(image_token_id=10 ** 6), "the vision token ids must be below vocab_size"),
    (lambda r: r.update(image_token_id=True), "image_token_id must be an integer >= 0, got True"),
])
def test_qwen_config_value_refused_by_name(tmp_path, change, message):
    folder = copy_of(VQA, tmp_path)
    edit_json(folder / "config.json", change)
    with pytest.raises(ValueError, match="config.json: .*" + message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        model.read_config(str(folder))


def kimi_raw():
    return json.load(open(os.path.join(ROOT, "configs", "kimi_vl_a3b.json")))


@pytest.mark.parametrize("change, message", [
    (lambda r: r["text_config"].update(num_experts_per_tok=0), "text_config.num_experts_per_tok must be an integer >= 1"),
    (lambda r: r["text_config"].update(kv_lora_rank="512"), "text_config.kv_lora_rank must be an integer >= 1"),
    (lambda r: r["text_config"].update(routed_scaling_factor=float("nan")), "routed_scaling_factor must be a number"),
    (lambda r: r["vision_config"].update(patch_size=-14), "vision_config.patch_size must be an integer >= 1"),
    (lambda r: r["vision_config"].update(merge_kernel_size=[2, 0]), "merge_kernel_size must be 2 integers >= 1"),
    (lambda r: r.update(media_placeholder_token_id=10 ** 7), "must be below vocab_size"),
])
def test_kimi_config_value_refused_by_name(change, message):
    raw = kimi_raw()
    change(raw)
    with pytest.raises(ValueError, match="kimi.json: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        model.config_from_dict(raw, "kimi.json")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(patch_size=16), "patch_size 16 disagrees with .*config.json's vision_config.patch_size 8"),
    (lambda d: d.update(merge_size=1), "merge_size 1 disagrees"),
    (lambda d: d.update(patch_size="8"), "patch_size must be a number, got '8'"),
    (lambda d: d.update(size={"shortest_edge": 0, "longest_edge": 4096}), "min_pixels must be an integer > 0, got 0"),
    (lambda d: d.update(size={"shortest_edge": 4096, "longest_edge": 0}), "max_pixels must be an integer > 0, got 0"),
    (lambda d: d.update(image_std=[0.5, 0, 0.5]), "image_std must be 3 finite numbers > 0"),
])
def test_preprocessor_config_checked_and_agrees_with_config(tmp_path, change, message):
    folder = copy_of(VQA, tmp_path)
    edit_json(folder / "preprocessor_config.json", change)
    with pytest.raises(ValueError, match="preprocessor_config.json: " + message):
        processor.QwenProcessor.from_dir(str(folder))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(patch_size=16), "patch_size 16 disagrees"),
    (lambda d: d.update(in_token_limit=0), "in_token_limit must be an integer >= 1, got 0"),
    (lambda d: d.update(merge_kernel_size=[2, 3]), r"merge_kernel_size \(2, 3\) disagrees"),
])
def test_kimi_preprocessor_checked_and_agrees(tmp_path, change, message):
    folder = copy_of(tiny.resolve("tiny-kimi"), tmp_path)
    edit_json(folder / "preprocessor_config.json", change)
    with pytest.raises(ValueError, match="preprocessor_config.json: " + message):
        processor.KimiProcessor.from_dir(str(folder))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files: an index that lies, truncated shards, a damaged cache entry (item 4)


def sharded(tmp_path):
    """tiny-vqa split into two shards with an index."""
    from safetensors.torch import load_file, save_file
    folder = copy_of(VQA, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    names = sorted(tensors)
    parts = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for f, part in parts.items():
        save_file({n: tensors[n] for n in part}, str(folder / f))
    index = {"weight_map": {n: f for f, part in parts.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, parts


def test_sharded_copy_loads(tmp_path):
    folder, _ = sharded(tmp_path)
    model.load(str(folder), dtype=torch.float32)


def test_an_index_that_lies_is_named(tmp_path):
    folder, parts = sharded(tmp_path)
    lie = parts["a.safetensors"][0]
    edit_json(folder / "model.safetensors.index.json", lambda d: d["weight_map"].update({lie: "b.safetensors"}))
    with pytest.raises(ValueError, match=f"names 1 tensor\\(s\\) in shards that do not hold them: {lie} "
                                         r"\(b.safetensors\)"):
        model.load(str(folder), dtype=torch.float32)


@pytest.mark.parametrize("cut", [10, 4000, 6_000_000])
def test_a_truncated_safetensors_file_is_named(tmp_path, cut):
    folder = copy_of(VQA, tmp_path)
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(cut)
    with pytest.raises(ValueError, match="model.safetensors: (truncated|not a readable safetensors file)"):
        model.load(str(folder), dtype=torch.float32)


@pytest.mark.parametrize("damage", ["truncate-weights", "delete-tokenizer", "garble-config"])
def test_a_damaged_built_in_checkpoint_is_written_again(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("MODES_CACHE", str(tmp_path))
    path = tiny.resolve("tiny-qwen")
    weights = open(os.path.join(path, "model.safetensors"), "rb").read()
    if damage == "truncate-weights":
        open(os.path.join(path, "model.safetensors"), "wb").write(weights[: len(weights) // 2])
    elif damage == "delete-tokenizer":
        os.remove(os.path.join(path, "tokenizer.json"))
    else:
        open(os.path.join(path, "config.json"), "w").write("{")
    assert tiny.resolve("tiny-qwen") == path
    assert "is damaged" in capsys.readouterr().err
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == weights  # the same seeded weights
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # nothing left aside


def test_a_damaged_shipped_checkpoint_is_named(tmp_path, monkeypatch):
    folder = copy_of(VQA, tmp_path)
    os.remove(folder / "tokenizer.json")
    monkeypatch.setitem(tiny.SHIPPED, "tiny-vqa", str(folder))
    with pytest.raises(FileNotFoundError, match="shipped tiny-vqa checkpoint is damaged .*missing tokenizer.json.*"
                                                "git checkout"):
        tiny.resolve("tiny-vqa")


# ---------------------------------------------------------------------------------------------------------------
# Empty paths, files given as folders, hub ids, non-UTF-8 text (items 6 and 14)


@pytest.mark.parametrize("name, message", [
    ("", "--model: empty"), ("  ", "--model: empty"),
    ("Qwen/Qwen3-VL-30B-A3B-Instruct", "hf download Qwen/Qwen3-VL-30B-A3B-Instruct --local-dir Qwen3-VL-30B-A3B"),
    ("moonshotai/Kimi-VL-A3B-Instruct", "looks like a Hugging Face hub id"),
    ("./nowhere/x", "no such folder"),
])
def test_model_names_that_are_not_folders(name, message):
    with pytest.raises(OSError if name.strip() else ValueError, match=message.replace("/", "/")):
        tiny.resolve(name)


def test_a_model_that_is_a_file(tmp_path):
    (tmp_path / "m").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file; expected a checkpoint folder"):
        tiny.resolve(str(tmp_path / "m"))


@pytest.mark.parametrize("script, argv, message", [
    ("calibrate", ["--data", ""], "--data: empty path"),
    ("calibrate", ["--gqa-questions", "", "--gqa-images", "x"], "--gqa-questions: empty path"),
    ("calibrate", ["--plot", ""], "--plot: empty path"),
    ("calibrate", ["--model", ""], "--model: empty"),
    ("calibrate", ["--threads", "-2"], "--threads must be >= 0"),
    ("search", ["--alpha", ""], "--alpha: empty path"),
    ("search", ["--out", ""], "--out: empty path"),
    ("calibrate", ["--data", "caf\udce9.jsonl"], "--data: not UTF-8 text (byte 0xe9 at character 3)"),
    ("generate", ["--prompt", "what \udcff?"], "--prompt: not UTF-8 text (byte 0xff at character 5)"),
])
def test_empty_and_non_utf8_arguments(capsys, tmp_path, monkeypatch, script, argv, message):
    import importlib
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit:
        cli.run(module.main, module.parser().parse_args(argv))
    err = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and len(err) == 1 and message in err[0], err
    assert os.listdir(tmp_path) == []


def test_non_utf8_prompt_bytes_from_the_shell():
    r = subprocess.run([sys.executable, "generate.py", "--model", "tiny-vqa", "--prompt", b"what \xff color?"],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode, r.stderr) == (2, "error: --prompt: not UTF-8 text (byte 0xff at character 5); give it in "
                                           "UTF-8\n")


# ---------------------------------------------------------------------------------------------------------------
# torchrun variables (item 7)


@pytest.mark.parametrize("env, message", [
    (dict(WORLD_SIZE="2", RANK="2"), "RANK 2 is not below WORLD_SIZE 2"),
    (dict(WORLD_SIZE="2", RANK="5", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"), "RANK 5 is not below WORLD_SIZE 2"),
    (dict(WORLD_SIZE="two"), "WORLD_SIZE='two' is not a non-negative integer"),
    (dict(WORLD_SIZE="0"), "WORLD_SIZE=0"),
    (dict(WORLD_SIZE="2"), "WORLD_SIZE=2 but RANK is not set"),
    (dict(WORLD_SIZE="2", RANK="-1"), "RANK='-1' is not a non-negative integer"),
    (dict(WORLD_SIZE="2", RANK="0"), "MASTER_ADDR and MASTER_PORT not set"),
    (dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="2", LOCAL_WORLD_SIZE="2"), "LOCAL_RANK 2 / LOCAL_WORLD_SIZE 2"),
    (dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="http"), "MASTER_PORT='http'"),
])
def test_inconsistent_torchrun_variables_are_one_line(monkeypatch, env, message):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="torchrun: .*" + message.replace("(", r"\(")):
        cli.init_distributed("cpu")


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_whose_peers_never_come_fails_instead_of_hanging(rank):
    """WORLD_SIZE 2 but one process: within MODES_RENDEZVOUS_TIMEOUT, one line, exit 2 (torch would wait 30 min)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, WORLD_SIZE="2", RANK=rank, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               MODES_RENDEZVOUS_TIMEOUT="3", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "calibrate.py", "--n", "1", "--quiet", "--out", os.devnull + ".json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1 and "could not meet the other ranks" in err[0], r.stderr


# ---------------------------------------------------------------------------------------------------------------
# support/train_vqa.py: everything checked first, the checkpoint built aside and moved in whole (item 1)


def train(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "support", "train_vqa.py"), *map(str, argv)], cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


SMOKE = ["--train-images", "8", "--val-images", "0", "--batch-size", "4", "--steps", "2", "--warmup", "1",
         "--eval-n", "0"]


@pytest.mark.parametrize("argv, message", [
    ([], "--out checkpoints/tiny-vqa: holds a checkpoint already (the shipped tiny-vqa); add --overwrite"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--patch-size", "0"], "--patch-size must be >= 1, got 0"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--lr", "nan"], "--lr must be finite and > 0"),
    (["--top-k", "40"], "--top-k 40 exceeds --experts 32"),
    (["--image-size", "60"], "--image-size 60 must be a multiple of 2 x --patch-size (16)"),
    (["--eval-only", "--eval-n", "0"], "--eval-n 0: must be >= 1"),
    (["--eval-only", "--model", "nowhere"], "--eval-only: nowhere is not a checkpoint folder"),
    (["--out", ""], "--out: empty path"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
])
def test_train_refuses_before_writing(tmp_path, argv, message):
    before = {f: os.stat(os.path.join(VQA, f)).st_mtime_ns for f in os.listdir(VQA)}
    r = train(*argv, "--work-dir", tmp_path / "work")
    err = r.stderr.splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], r.stderr
    assert {f: os.stat(os.path.join(VQA, f)).st_mtime_ns for f in os.listdir(VQA)} == before
    assert not os.path.exists(tmp_path / "work")


def test_train_refuses_more_validation_images_than_exist(tmp_path):
    pytest.importorskip("easy_vqa")
    r = train("--val-images", "100000", "--out", tmp_path / "new", "--work-dir", tmp_path / "w")
    assert r.returncode == 2 and "--val-images 100000: the training split has" in r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [b"not a state", b""])
def test_train_refuses_a_resume_file_that_is_not_one(tmp_path, content):
    pytest.importorskip("easy_vqa")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "train_state.pt").write_bytes(content)
    r = train(*SMOKE, "--out", tmp_path / "new", "--work-dir", tmp_path / "w", "--resume")
    assert r.returncode == 2 and "train_state.pt: not a training state" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_train_builds_aside_and_replaces_only_when_asked(tmp_path):
    """A finished run's folder follows the umask; a second run into it needs --overwrite, and a run refused on its
    resume state leaves the finished checkpoint as it was."""
    pytest.importorskip("easy_vqa")
    out = tmp_path / "ckpt"
    old = os.umask(0o027)
    try:
        r = train(*SMOKE, "--out", out, "--work-dir", tmp_path / "w")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert {f: os.stat(out / f).st_mode & 0o777 for f in os.listdir(out)} == {f: 0o640 for f in os.listdir(out)}
    assert os.stat(out).st_mode & 0o777 == 0o750
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    r = train(*SMOKE, "--out", out, "--work-dir", tmp_path / "w")
    assert r.returncode == 2 and "holds a checkpoint already" in r.stderr
    os.makedirs(tmp_path / "w", exist_ok=True)
    torch.save({"not": "a state"}, tmp_path / "w" / "train_state.pt")
    r = train(*SMOKE, "--out", out, "--work-dir", tmp_path / "w", "--resume", "--overwrite")
    assert r.returncode == 2 and "not a training state of this script" in r.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "w"]  # no temporary folder left behind
    r = train(*SMOKE, "--out", out, "--work-dir", tmp_path / "w2", "--overwrite", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "w"]


def test_a_truncated_converted_tokenizer_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MODES_CACHE", str(tmp_path / "cache"))
    folder = copy_of(tiny.resolve("tiny-kimi"), tmp_path)
    for f in os.listdir(folder):
        if f.startswith("tokenizer.modes-"):
            os.remove(folder / f)
    want = kimi_tokenizer.load_kimi_tokenizer(folder).encode("what color is the shape?")
    [cached] = [f for f in os.listdir(folder) if f.startswith("tokenizer.modes-")]
    data = (folder / cached).read_bytes()
    (folder / cached).write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match="damaged converted tokenizer"):
        assert kimi_tokenizer.load_kimi_tokenizer(folder).encode("what color is the shape?") == want
    assert (folder / cached).read_bytes() == data
