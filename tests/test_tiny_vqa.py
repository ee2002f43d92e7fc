"""The shipped easy-VQA checkpoint (checkpoints/tiny-vqa) answers through the user path, and support/train_vqa.py
runs.

CI never retrains: the checkpoint is committed. easy-vqa (pip install easy-vqa) holds the data; without it these
tests are skipped.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from generate import generate
from model import load, read_config
from processor import QwenProcessor

easy_vqa = pytest.importorskip("easy_vqa", reason="easy-vqa is not installed (pip install easy-vqa): it holds the "
                               "images and questions these tests ask")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-vqa")
# easy-VQA test questions (indices into get_test_questions()): the first of each of the 13 answers, and negations
QUESTIONS = [0, 1, 3, 4, 8, 11, 12, 19, 44, 54, 72, 102, 103, 147, 314]


def answer(model, proc, question, image):
    batch = proc.from_cli(question, images=[image])
    out = generate(model, batch["input_ids"][None], max_new_tokens=4, stop_ids=proc.stop_token_ids,
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])[0].tolist()
    stops = [i for i, t in enumerate(out) if t in proc.stop_token_ids]
    assert stops, f"no stop token in {out}"
    return proc.decode(out[:stops[0]]).strip()


def test_shipped_checkpoint_answers_held_out_questions(one_thread):
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    proc = QwenProcessor.from_dir(CKPT)
    model = load(CKPT, dtype=torch.float32, special_ids=proc.special_ids)  # as generate.py loads it
    got = {j: answer(model, proc, questions[j], paths[image_ids[j]]) for j in QUESTIONS}
    wrong = {questions[j]: (answers[j], got[j]) for j in QUESTIONS if got[j] != answers[j]}
    assert not wrong, f"(expected, got): {wrong}"
    assert len({answers[j] for j in QUESTIONS}) == 13


def test_shipped_checkpoint_is_small_and_really_moe():
    cfg = read_config(CKPT)
    assert os.path.getsize(os.path.join(CKPT, "model.safetensors")) <= 10 * 2**20
    assert cfg.num_hidden_layers >= 4 and all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 4
    # hidden == 2 * expert width would make the stored expert layout ambiguous by shape
    assert cfg.hidden_size != 2 * cfg.moe_intermediate_size
    # small special-token ids come from the checkpoint's own files
    proc = QwenProcessor.from_dir(CKPT)
    assert max(proc.stop_token_ids + [proc.image_token_id]) < cfg.vocab_size < 1024


def test_shipped_checkpoint_is_a_transformers_checkpoint(one_thread):
    """transformers reads the folder as it is and computes the same logits (the loader's oracle)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(CKPT, dtype=torch.float32).eval()
    ours = load(CKPT, dtype=torch.float32)
    proc = QwenProcessor.from_dir(CKPT)
    b = proc.from_cli("is there not a rectangle in the image?", images=[easy_vqa.get_test_image_paths()[5]])
    with torch.no_grad():
        want = hf(input_ids=b["input_ids"][None], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                  mm_token_type_ids=b["mm_token_type_ids"][None]).logits
        got = ours(b["input_ids"][None], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def run(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "support/train_vqa.py", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_training_smoke_and_resume(tmp_path, one_thread):
    """A few steps on a handful of images make a folder that load() and the processor read; a run resumed from
    its midway state ends with the same weights as the uninterrupted one."""
    common = ["--train-images", "8", "--val-images", "0", "--batch-size", "4", "--steps", "4", "--warmup", "2",
              "--save-every", "2"]
    r = run(*common, "--out", str(tmp_path / "a"), "--work-dir", str(tmp_path / "wa"), "--eval-n", "8",
            "--eval-batch-size", "8")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["questions"] == 8 and 0 <= result["accuracy"] <= 1
    assert "reload check" in r.stderr
    out = str(tmp_path / "a")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    proc = QwenProcessor.from_dir(out)
    model = load(out, dtype=torch.float32, special_ids=proc.special_ids)
    batch = proc.from_cli("what color is the shape?", images=[easy_vqa.get_test_image_paths()[0]])
    logits = model(batch["input_ids"][None], pixel_values=batch["pixel_values"],
                   image_grid_thw=batch["image_grid_thw"])
    assert logits.shape[-1] == model.cfg.vocab_size and torch.isfinite(logits).all()

    # resume: the state written at step 2 of run a, continued to step 4 in a fresh process
    state = tmp_path / "wa" / "train_state.pt"
    assert torch.load(state, weights_only=False)["step"] == 2
    run(*common, "--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "wa"), "--resume", "--eval-n", "0")
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
