"""calibrate.py on the tiny built-in model: cached prefix == naive passes, removal semantics, resume, data readers,
fingerprints and one-line errors."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from calibrate import ablate_batch, calibrate, main, parser, removed
import cli
from data import kl_sum, make_batch, read_gqa, read_jsonl, select, synthetic_samples
from model import TEXT, Context, load
import processor
import qwen3_vl_moe
import router
import search
from support import tiny as builtin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    path = builtin.resolve("tiny-qwen")
    model = load(path, dtype=torch.float32, special_ids=processor.special_token_ids(path))  # as the scripts load it
    return model, processor.for_model(path, model.cfg.model_type), path


@pytest.fixture(scope="module")
def reference(tiny):
    """An uninterrupted run over 3 samples, one per batch (3 steps)."""
    model, proc, _ = tiny
    return calibrate(model, proc, synthetic_samples(3), batch_size=1, quiet=True)


@pytest.mark.parametrize("removal", ["zero", "input"])
def test_cached_prefix_equals_naive(tiny, removal):
    model, proc, _ = tiny
    layers = model.moe_layers()
    L = len(model.layers)
    batch = make_batch(synthetic_samples(2), proc, "cpu")
    cached, n, passes = ablate_batch(model, batch, layers, removal)
    naive, n_naive, naive_passes = ablate_batch(model, batch, layers, removal, naive=True)
    assert n == n_naive == len(batch.rows) > 0
    assert (cached[:, 0] > 0).all() and (cached[:-1, 1] > 1e-6).all()  # every ablation moves the answer but one:
    # vision tokens after the last layer reach no answer logit; the ablation runs as a doubled batch, whose fp32
    # sums a BLAS may block differently, so "no change" is a KL at rounding level, not exactly 0
    assert cached[-1, 1] < 1e-9
    torch.testing.assert_close(cached, naive, rtol=1e-5, atol=1e-9)  # fp32 sums in another order
    assert passes == L + 2 * sum(L - l for l in layers) and naive_passes == (1 + 2 * len(layers)) * L


def test_zero_removal_is_skipping_every_slot(tiny):
    """Independent of the wrapper: router.DMT with tau_text = inf on layer 1 alone skips all of its text slots."""
    model, proc, _ = tiny
    batch = make_batch(synthetic_samples(2), proc, "cpu")
    kl, _, _ = ablate_batch(model, batch, model.moe_layers(), "zero")
    with torch.inference_mode():
        original = model(batch.input_ids, batch.attention_mask, **batch.pixels)[batch.rows, batch.cols]
        router.install(model, lambda i: router.DMT(1e30, 0.0) if i == 1 else None)
        try:
            skipped = model(batch.input_ids, batch.attention_mask, **batch.pixels)[batch.rows, batch.cols]
        finally:
            router.uninstall(model)
    log_p, log_q = original.double().log_softmax(-1), skipped.double().log_softmax(-1)
    expected = (log_p.exp() * (log_p - log_q)).sum()
    torch.testing.assert_close(kl[1, TEXT], expected, rtol=1e-4, atol=1e-9)


def test_input_removal_substitutes_the_moe_input(tiny):
    model, _, _ = tiny
    moe = model.layers[2].mlp
    x = torch.randn(2, 5, model.cfg.hidden_size)
    modality = torch.tensor([[0, 1, 2, 0, 1], [1, 1, 0, 2, 0]])
    ctx = Context(None, None, None, modality, torch.ones(2, 5, dtype=torch.bool), "prefill")
    with torch.inference_mode():
        plain = moe(x, ctx)
        remove = modality == TEXT
        with removed(model, 2, remove, "input"):
            substituted = model.layers[2].mlp(x, ctx)
        with removed(model, 2, remove, "zero"):
            zeroed = model.layers[2].mlp(x, ctx)
    assert model.layers[2].mlp is moe and moe.policy is None  # restored
    assert torch.equal(substituted[remove], x[remove]) and torch.equal(zeroed[remove], torch.zeros_like(x[remove]))
    # the kept tokens' experts run on fewer rows, so only up to float reassociation
    torch.testing.assert_close(substituted[~remove], plain[~remove])
    torch.testing.assert_close(zeroed[~remove], plain[~remove])


def test_kl_sum_matches_float64_textbook_formula():
    g = torch.Generator().manual_seed(0)
    z_p = torch.randn(7, 50000, generator=g)
    z_q = z_p + 0.01 * torch.randn(7, 50000, generator=g)
    log_p, log_q = z_p.double().log_softmax(-1), z_q.double().log_softmax(-1)
    expected = (log_p.exp() * (log_p - log_q)).sum()
    torch.testing.assert_close(kl_sum(z_p, z_q), expected, rtol=1e-4, atol=0)
    huge = z_p.clone()
    huge[:, 0] -= 200.0  # exp(200) overflows fp32: the fp64 fallback takes over
    assert torch.isfinite(kl_sum(z_p, huge)) and kl_sum(z_p, huge) > 0


def test_alpha_document(reference, tiny):
    model, _, _ = tiny
    doc = reference
    assert doc["format"] == router.ALPHA_FORMAT and doc["model"]["fingerprint"] == router.fingerprint(model)
    assert [r["layer"] for r in doc["layers"]] == model.moe_layers()
    for m in ("text", "vision"):
        alpha = torch.tensor([r[m] for r in doc["layers"]], dtype=torch.float64)
        kl = torch.tensor([r[m] for r in doc["kl_sum"]], dtype=torch.float64)
        torch.testing.assert_close(alpha, kl / kl.sum())
    table = router.alpha_table(doc, model, "alpha")
    assert table.shape == (len(model.layers), 2) and torch.allclose(table.sum(0), torch.ones(2))


def test_resume_after_stop_equals_uninterrupted(tiny, reference, tmp_path):
    _, _, path = tiny
    out = tmp_path / "alpha.json"
    partial = tmp_path / "alpha.json.partial"
    argv = ["--model", path, "--n", "3", "--batch-size", "1", "--out", str(out), "--quiet"]
    main(parser().parse_args(argv + ["--max-batches", "1"]))  # stands for a run killed after batch 1
    assert not out.exists() and json.load(open(partial))["steps_done"] == 1
    with pytest.raises(ValueError, match="made with another removal"):
        main(parser().parse_args(argv + ["--resume", "--removal", "input"]))
    main(parser().parse_args(argv + ["--resume", "--max-batches", "1"]))
    assert json.load(open(partial))["steps_done"] == 2
    main(parser().parse_args(argv + ["--resume"]))
    resumed = json.load(open(out))
    assert not partial.exists()
    assert resumed["layers"] == reference["layers"] and resumed["kl_sum"] == reference["kl_sum"]
    assert resumed["data"]["sha256"] == reference["data"]["sha256"]
    assert {k: v for k, v in resumed["calibration"].items() if k != "seconds"} == reference["calibration"]


def test_resume_after_a_failure_fixed_between_runs(tiny, tmp_path):
    """An image only the processor refuses (aspect ratio 250) stops the run at its batch, naming the line; with the
    line fixed, --resume keeps the three finished batches and gives the uninterrupted result on the fixed file."""
    from PIL import Image
    _, _, path = tiny
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (1000, 4), (30, 30, 200)).save(tmp_path / "strip.png")
    lines = [f'{{"image": "red.png", "question": "Colour {i}?", "answer": "Red."}}' for i in range(3)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines + ['{"image": "strip.png", "question": "And this?", "answer": "Blue."}']) + "\n")
    out, partial = tmp_path / "alpha.json", tmp_path / "alpha.json.partial"
    argv = ["--model", path, "--data", str(data), "--batch-size", "1", "--out", str(out), "--quiet"]
    with pytest.raises(ValueError, match=r"d\.jsonl:4: .*strip\.png: size 1000x4 has aspect ratio 250\.0"):
        main(parser().parse_args(argv))
    assert json.load(open(partial))["steps_done"] == 3 and not out.exists()
    with pytest.raises(ValueError, match=r"alpha\.json\.partial holds an interrupted run's state: add --resume"):
        main(parser().parse_args(argv))  # never overwritten unasked
    fixed = '{"image": "red.png", "question": "And this?", "answer": "Blue."}'
    data.write_text("\n".join(lines + [fixed]) + "\n")
    main(parser().parse_args(argv + ["--resume"]))
    resumed = json.load(open(out))
    os.remove(out)
    main(parser().parse_args(argv))
    uninterrupted = json.load(open(out))
    assert resumed["kl_sum"] == uninterrupted["kl_sum"] and resumed["data"] == uninterrupted["data"]
    # a finished batch's sample edited: refused, as its sums would no longer match the data
    main(parser().parse_args(argv + ["--max-batches", "2"]))
    edited = '{"image": "red.png", "question": "Edited?", "answer": "Red."}'
    data.write_text("\n".join([edited] + lines[1:] + [fixed]) + "\n")
    with pytest.raises(ValueError, match=r"the samples of its 2 finished batch\(es\) are not the ones it read"):
        main(parser().parse_args(argv + ["--resume"]))


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update(format="modes-thresholds-partial/1"), "not a partial calibration file"),
    (lambda s: s["settings"].update(batch_size=2, removal="input"), "made with another batch_size, removal"),
    (lambda s: s.update(steps_done=-1), "counts must be integers >= 0"),
    (lambda s: s.update(steps_done=9), "at most 3 steps"),
    (lambda s: s.update(answer_tokens="12"), "counts must be integers >= 0"),
    (lambda s: s["kl_sum"][1].__setitem__(0, float("nan")), "kl_sum must be 4 rows of 2 finite numbers"),
    (lambda s: s["kl_sum"].pop(), "kl_sum must be 4 rows of 2 finite numbers"),
])
def test_damaged_partial_is_one_line(tiny, tmp_path, damage, message):
    model, proc, _ = tiny
    samples = synthetic_samples(3)
    partial = str(tmp_path / "a.json.partial")
    assert calibrate(model, proc, samples, batch_size=1, partial=partial, max_batches=2, quiet=True) is None
    state = json.load(open(partial))
    damage(state)
    cli.write_json(partial, state)
    with pytest.raises(ValueError, match=rf"^{re.escape(partial)}: .*{re.escape(message)}"):
        calibrate(model, proc, samples, batch_size=1, partial=partial, resume=True, quiet=True)


def test_fingerprint_and_refusal(tiny, tmp_path):
    model, _, path = tiny
    raw = builtin.qwen_config()
    raw["text_config"]["num_hidden_layers"] = 3
    with torch.device("meta"):
        other = qwen3_vl_moe.Qwen3VLMoe(qwen3_vl_moe.QwenConfig.from_hf(raw, "test"))
    assert router.fingerprint(other) != router.fingerprint(model)
    with torch.device("meta"):
        cfg = qwen3_vl_moe.QwenConfig.from_hf(builtin.qwen_config(), "test")
        same = qwen3_vl_moe.Qwen3VLMoe(cfg).to(torch.bfloat16)
    assert router.fingerprint(same) == router.fingerprint(model)  # dtype and device do not matter
    doc = dict(format=router.ALPHA_FORMAT, model=dict(fingerprint=router.fingerprint(other)), layers=[])
    cli.write_json(tmp_path / "alpha.json", doc)
    with pytest.raises(ValueError, match="made for another model"):
        router.load_alpha(str(tmp_path / "alpha.json"), model)


def test_jsonl_reader(tmp_path):
    from PIL import Image
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "img" / "a.png")
    lines = ['{"image": "img/a.png", "question": "What colour?", "answer": "Green."}', "",
             '{"image": ["img/a.png", "img/a.png"], "question": "Same?", "answer": "Yes."}',
             '{"question": "No image?", "answer": "Right."}',
             '{"question": "How many?", "answer": "There are Two.", "key": "two"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    samples = read_jsonl(str(tmp_path / "d.jsonl"))
    assert [len(s.images) for s in samples] == [1, 2, 0, 0] and [s.key for s in samples] == [None] * 3 + ["two"]
    assert samples[0].images[0] == str(tmp_path / "img" / "a.png") and samples[1].where.endswith(":3")


@pytest.mark.parametrize("line, error, message", [
    ('{"image": "a.png", "question": "q", "answer": ', ValueError, r"d\.jsonl:2: invalid JSON"),
    ('["not", "an", "object"]', ValueError, r"d\.jsonl:2: expected a JSON object"),
    ('{"question": "q"}', ValueError, r"d\.jsonl:2: 'answer' must be a non-empty string"),
    ('{"image": 3, "question": "q", "answer": "a"}', ValueError, r"d\.jsonl:2: 'image' must be a path"),
    ('{"image": "missing.png", "question": "q", "answer": "a"}', ValueError, r"d\.jsonl:2: .*missing\.png"),
    ('{"image": ".", "question": "q", "answer": "a"}', ValueError, r"d\.jsonl:2: .* is a folder"),
    ('{"image": "d.jsonl", "question": "q", "answer": "a"}', ValueError, r"d\.jsonl:2: .*not a readable image"),
    ('{"image": "cut.png", "question": "q", "answer": "a"}', ValueError, r"d\.jsonl:2: .*cut\.png is not a readable "
     r"image \(image file is truncated"),
    ('{"video": "frames", "question": "q", "answer": "a"}', ValueError, r"d\.jsonl:2: video folder .*frames has no "
     r"image files"),
    ('{"video": "d.jsonl", "question": "q", "answer": "a"}', ValueError, r"d\.jsonl:2: .*d\.jsonl is not a readable "
     r"image"),
    ('{"video": "missing.gif", "question": "q", "answer": "a"}', ValueError, r"d\.jsonl:2: file not found: "),
    (b'{"question": "\xff", "answer": "a"}', ValueError, r"d\.jsonl:2: not UTF-8 text"),
    ('{"question": "q", "answer": "a b", "key": "c"}', ValueError, r"d\.jsonl:2: 'key' must be one word of the answer"),
    ('{"question": "q", "answer": "a b", "key": "a b"}', ValueError, r"d\.jsonl:2: 'key' must be one word of the"),
    ('{"question": "q", "answer": "a b", "key": 1}', ValueError, r"d\.jsonl:2: 'key' must be one word of the answer"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, error, message):
    from PIL import Image
    Image.frombytes("RGB", (64, 48), bytes(range(256)) * 36).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])  # the header and half the pixels
    (tmp_path / "frames").mkdir()
    line = line if isinstance(line, bytes) else line.encode()
    (tmp_path / "d.jsonl").write_bytes(b'{"question": "fine", "answer": "ok"}\n' + line + b"\n")
    with pytest.raises(error, match=message):
        read_jsonl(str(tmp_path / "d.jsonl"))


def test_gqa_reader(tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "n1.jpg")
    questions = {"q1": {"imageId": "n1", "question": "Is it dark?", "answer": "yes", "fullAnswer": "Yes, it is."},
                 "q2": {"imageId": "n2", "question": "Where?", "answer": "no", "fullAnswer": "No."}}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    with pytest.raises(ValueError, match=r"question q2: image not found: .*n2\.jpg"):
        read_gqa(str(tmp_path / "q.json"), str(tmp_path))
    del questions["q2"]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    [s] = read_gqa(str(tmp_path / "q.json"), str(tmp_path))
    assert s.answer == "Yes, it is." and s.images == [str(tmp_path / "n1.jpg")]


def test_synthetic_data_and_selection():
    a, b = synthetic_samples(6), synthetic_samples(6)
    assert [s.answer for s in a] == [s.answer for s in b] and a[0].images[0].tobytes() == b[0].images[0].tobytes()
    assert len({s.answer for s in synthetic_samples(32)}) > 10
    items = list(range(10))
    assert select(items, 3, start=2) == [2, 3, 4]
    chosen = select(items, 4, seed=1)
    assert chosen == sorted(chosen) and len(set(chosen)) == 4 and chosen == select(items, 4, seed=1)
    with pytest.raises(ValueError, match="--n 11"):
        select(items, 11)
    assert cli.rank_items(items, 0, 3) + cli.rank_items(items, 1, 3) + cli.rank_items(items, 2, 3) == items


def test_cli_reports_bad_line_in_one_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "a"}\n{oops\n')
    r = subprocess.run([sys.executable, "calibrate.py", "--data", str(tmp_path / "d.jsonl"), "--out",
                        str(tmp_path / "a.json")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "d.jsonl:2" in r.stderr and not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("removal", ["zero", "input"])
def test_kimi_cached_prefix_equals_naive_and_search_starts_at_zero(removal):
    path = builtin.resolve("tiny-kimi")
    model = load(path, dtype=torch.float32, special_ids=processor.special_token_ids(path))  # as the scripts load it
    proc = processor.for_model(path, model.cfg.model_type)
    layers = model.moe_layers()
    assert layers == list(range(1, len(model.layers)))  # layer 0 is the dense one
    batch = make_batch(synthetic_samples(2), proc, "cpu")
    cached, n, _ = ablate_batch(model, batch, layers, removal)
    naive, _, _ = ablate_batch(model, batch, layers, removal, naive=True)
    assert n > 0 and (cached[:, 0] > 0).all()
    torch.testing.assert_close(cached, naive, rtol=1e-5, atol=1e-9)  # fp32 sums in another order
    alpha = calibrate(model, proc, synthetic_samples(2), batch_size=2, removal=removal, quiet=True)
    table = router.alpha_table(alpha, model, "alpha")
    assert table[0].tolist() == [0.0, 0.0] and torch.allclose(table.sum(0), torch.ones(2))
    evaluator = search.Evaluator(model, proc, synthetic_samples(2), table, batch_size=2, quiet=True)
    kl, skip = evaluator(0.0, 0.0)
    assert kl == 0.0 and skip["all"] == 0.0
    kl, skip = evaluator(0.05, 0.05)
    assert kl > 0 and skip["all"] > 0


def test_per_layer_alpha_removes_both_modalities_together(tiny):
    """The paper's Eq. 4: one KL per layer with its experts removed for text and vision tokens at once, in both
    columns; the cached prefix still equals full passes; on text alone it is the per-modality text column."""
    model, proc, _ = tiny
    layers = model.moe_layers()
    batch = make_batch(synthetic_samples(2), proc, "cpu")
    both, _, passes = ablate_batch(model, batch, layers, per_layer=True)
    naive, _, _ = ablate_batch(model, batch, layers, naive=True, per_layer=True)
    torch.testing.assert_close(both, naive, rtol=1e-5, atol=1e-9)
    assert torch.equal(both[:, 0], both[:, 1]) and (both[:, 0] > 0).all()
    assert passes == len(model.layers) + sum(len(model.layers) - l for l in layers)  # one removal per layer
    # independent of the stacking: removing both modalities moves the answer at least as far as text alone on
    # the layers where vision still reaches the answer, and differs from either single removal
    separate, _, _ = ablate_batch(model, batch, layers)
    assert not torch.allclose(both[:, 0], separate[:, 0]) and not torch.allclose(both[:, 0], separate[:, 1])
    text_only = make_batch([s for s in synthetic_samples(2)], proc, "cpu")
    text_only.pixels = {}
    text_only.input_ids = torch.where(text_only.input_ids == model.cfg.image_token_id, 0, text_only.input_ids)
    per_layer, _, _ = ablate_batch(model, text_only, layers, per_layer=True)
    per_modality, _, _ = ablate_batch(model, text_only, layers)
    torch.testing.assert_close(per_layer[:, 0], per_modality[:, 0], rtol=1e-6, atol=1e-12)


def test_per_layer_alpha_document(tiny):
    model, proc, _ = tiny
    doc = calibrate(model, proc, synthetic_samples(2), batch_size=2, per_layer=True, quiet=True)
    assert doc["calibration"]["form"] == "per-layer"
    table = router.alpha_table(doc, model, "alpha")
    assert torch.equal(table[:, 0], table[:, 1]) and torch.allclose(table.sum(0), torch.ones(2))
    assert calibrate(model, proc, synthetic_samples(2), batch_size=2, quiet=True)["calibration"]["form"] == \
        "per-modality"
