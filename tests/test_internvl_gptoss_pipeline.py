"""The built-in tiny-internvl-gpt-oss (InternVL-3.5 with a gpt-oss decoder, random weights) end to end: it loads and
generates, its harmony-style prompt marks the template's tokens SPECIAL, and calibrate -> search -> generate with the
thresholds skips experts."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import calibrate
import data
import model
import processor
import search
from support import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "examples", "shape.png")
HARMONY = ("<|start|>", "<|message|>", "<|end|>")


def run(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def folder():
    return tiny.resolve("tiny-internvl-gpt-oss")


@pytest.fixture(scope="module")
def proc(folder):
    return processor.for_model(folder, "internvl")


def test_builtin_is_a_gpt_oss_internvl(folder):
    cfg = model.config_from_dict(json.load(open(os.path.join(folder, "config.json"))), folder)
    assert cfg.decoder == "gpt_oss" and set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.sliding_window == 4 and cfg.vocab_size == 201088
    assert cfg.image_token_id == 200021  # configs/internvl3_5_gpt_oss_20b_a4b.json's placeholder


def test_generates(folder):
    r = run("generate.py", "--model", "tiny-internvl-gpt-oss", "--prompt", "hi", "--image", IMAGE,
            "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stdout + r.stderr


def test_prompt_is_harmony_and_its_tokens_are_special(folder, proc):
    assert proc.style == "harmony"
    out = proc.from_cli("What is this?", images=[IMAGE])
    assert out["text"].startswith("<|start|>system<|message|>You are InternVL")
    assert out["text"].endswith("What is this?<|end|><|start|>assistant")
    ids = out["input_ids"]
    special = processor.special_token_ids(folder)
    net = model.load(folder, "cpu", torch.float32, special_ids=special)
    modality = net.modality(ids[None], "prefill")[0]
    for token in HARMONY + ("<img>", "</img>"):
        tid = proc.tokenizer.token_to_id(token)
        assert tid in special and (ids == tid).any(), token
        assert (modality[ids == tid] == model.SPECIAL).all(), token
    assert (modality[ids == proc.image_token_id] == model.VISION).all()
    assert (modality == model.TEXT).any()
    # stops: gpt-oss's <|return|>, and a harmony reply decodes to its final message only
    ret, msg = proc.tokenizer.token_to_id("<|return|>"), proc.tokenizer.token_to_id("<|message|>")
    assert ret in proc.stop_token_ids
    reply = proc.encode("final") + [msg] + proc.encode("a cat") + [ret]
    reply = [proc.tokenizer.token_to_id("<|channel|>")] + reply
    assert proc.decode(reply) == "a cat"


def test_python_render_equals_the_folders_jinja_template(folder, proc):
    jinja2 = pytest.importorskip("jinja2")
    template = open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8").read()
    assert json.load(open(os.path.join(folder, "tokenizer_config.json")))["chat_template"] == template
    render = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template).render
    cases = [
        [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "hi"}]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
         {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
    ]
    for messages in cases:
        for gen in (True, False):
            assert processor.render_harmony_chat(messages, gen) == render(messages=messages, add_generation_prompt=gen)
    assert proc(cases[0])["prompt"] == render(messages=cases[0], add_generation_prompt=True)


def test_calibrate_search_generate_skips(folder, proc, tmp_path, monkeypatch):
    assert proc.tokenizer.token_to_id(data.END_OF_TURN) is None  # data.py takes the processor's end of turn
    alpha, thresholds = tmp_path / "alpha.json", tmp_path / "thresholds.json"
    common = ["--model", "tiny-internvl-gpt-oss", "--n", "2", "--batch-size", "2", "--quiet", "--threads", "1"]
    calibrate.main(calibrate.parser().parse_args(common + ["--out", str(alpha)]))
    search.main(search.parser().parse_args(common + ["--alpha", str(alpha), "--grid", "8", "--target", "0.5",
                                                     "--out", str(thresholds)]))
    assert thresholds.is_file()
    r = run("generate.py", "--model", "tiny-internvl-gpt-oss", "--prompt", "hi", "--image", IMAGE,
            "--max-new-tokens", "4", "--thresholds", str(thresholds))
    assert r.returncode == 0, r.stderr
    m = re.search(r"skipped routed-expert slots: prefill ([\d.]+)%", r.stdout + r.stderr)
    assert m and float(m.group(1)) > 0, r.stdout + r.stderr


def test_a_chatml_template_without_chatml_tokens_is_refused(folder, tmp_path):
    """The -HF folder may ship ChatML (what ms-swift assumes) over a vocabulary without its tokens: the prompt would
    then be tokenised into bytes. Refused in one line naming the token; a harmony template still works."""
    copy = tmp_path / "chatml"
    copy.mkdir()
    for name in os.listdir(folder):
        if name != "chat_template.jinja" and os.path.isfile(os.path.join(folder, name)):
            os.symlink(os.path.join(folder, name), copy / name)
    tok_cfg = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    os.remove(copy / "tokenizer_config.json")
    chatml = open(os.path.join(ROOT, "configs", "internvl3_5_chat_template.jinja"), encoding="utf-8").read()
    (copy / "tokenizer_config.json").write_text(json.dumps(dict(tok_cfg, chat_template=chatml)))
    with pytest.raises(ValueError, match=r"has no token <\|im_start\|> \(needed for the ChatML chat template\)"):
        processor.for_model(str(copy), "internvl")
    r = run("generate.py", "--model", str(copy), "--prompt", "hi", "--max-new-tokens", "1")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "<|im_start|>" in err[0] and "Traceback" not in r.stderr, r.stderr
