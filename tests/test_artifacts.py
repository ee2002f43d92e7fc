"""Every shipped artifact loads against the model it was made for, with the current code, on any machine.

- The fingerprint identifies the checkpoint's architecture (config.json's values by their hub names and the
  checkpoint's tensor shapes), not the code's dataclasses: the same in both config dialects, with unrelated keys,
  in a rank split; different for any architectural change. Its value for tiny-vqa is pinned, so a refactor that
  moves it fails here, not in a user's saved thresholds.
- Files made by earlier versions (the code's dataclass hashed) keep loading: their fingerprints are rebuilt.
- Data is identified by content (questions, answers, image bytes), not by where the files sit.
- Result files hold no machine's absolute path."""
import glob
import json
import os
import shutil
import types

import pytest

import cli
import data
from model import build, read_config
from parallel import Shard
import router
from support import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "**", "*.json"), recursive=True))
FORMATS = (router.ALPHA_FORMAT, router.THRESHOLDS_FORMAT)

# The fingerprint of tiny-vqa, and those earlier versions wrote for it and for the real configs (the first 12 hex
# digits). A change here invalidates every file users have saved: only ever add legacy values, never edit them.
TINY_VQA = "c0714fa067d4"
LEGACY = {"checkpoints/tiny-vqa": {"979d9d5754f0", "9c823bd06fdb"},  # before / after 2026-12-01
          "configs/qwen3_vl_30b_a3b.json": {"8110c26410ff", "4fef16dcfb5b"},
          "configs/qwen3_vl_235b_a22b.json": {"fa91bc10649a", "8f5f6d6022d2"},
          "configs/kimi_vl_a3b.json": {"3cac0362ae20"}}


def skeleton(path):
    return build(read_config(os.path.join(ROOT, path)), "meta")


def artifacts():
    """(file, document) of every shipped alpha or thresholds file."""
    docs = [(p, json.load(open(p))) for p in SHIPPED]
    return [(p, d) for p, d in docs if isinstance(d, dict) and d.get("format") in FORMATS]


def test_every_shipped_artifact_loads_against_its_model():
    found = artifacts()
    assert len(found) >= 4, [p for p, _ in found]  # alpha.json and three thresholds files at least
    for path, doc in found:
        model = build(read_config(tiny.resolve(doc["model"]["path"])), "meta")
        if doc["format"] == router.ALPHA_FORMAT:
            router.load_alpha(path, model)
        else:
            policy = router.load_thresholds(path, model)
            assert float(policy.tau[0]) == pytest.approx(doc["tau"]["text"], rel=1e-6)


def test_shipped_thresholds_name_the_shipped_alpha():
    for path, doc in artifacts():
        if doc["format"] == router.THRESHOLDS_FORMAT:
            alpha = os.path.join(os.path.dirname(path), "alpha.json")  # each model's folder has its own
            assert doc["alpha_file"]["sha256"] == data._file_sha256(alpha), path
            assert doc["layers"] == json.load(open(alpha))["layers"], path


def test_shipped_results_hold_no_absolute_path():
    def strings(x):
        if isinstance(x, dict):
            return [s for v in x.values() for s in strings(v)]
        return [s for v in x for s in strings(v)] if isinstance(x, list) else [x] if isinstance(x, str) else []
    for path in SHIPPED:
        bad = [s for s in strings(json.load(open(path))) if os.path.isabs(s) or s.startswith("~")]
        assert not bad, (path, bad[:3])


def test_fingerprint_pinned_and_legacy_rebuilt():
    assert router.fingerprint(skeleton("checkpoints/tiny-vqa"))[:12] == TINY_VQA
    for path, old in LEGACY.items():
        assert {f[:12] for f in router.legacy_fingerprints(skeleton(path))} == old, path


def rewrite(tmp_path, change, name="ckpt"):
    """A copy of tiny-vqa's config.json with change(raw) applied, as a folder's config."""
    raw = json.load(open(os.path.join(ROOT, "checkpoints", "tiny-vqa", "config.json")))
    change(raw)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    return build(read_config(str(folder)), "meta")


def to_transformers5(raw):
    t = raw["text_config"]
    t["rope_parameters"] = dict(t.pop("rope_scaling"), rope_theta=t.pop("rope_theta"))
    t["num_local_experts"] = t.pop("num_experts")
    t.pop("norm_topk_prob", None)


@pytest.mark.parametrize("change", [
    to_transformers5,
    lambda raw: raw.update(transformers_version="9.9", torch_dtype="float16", architectures=["X"]),
    lambda raw: raw["text_config"].update(rope_theta=float(raw["text_config"]["rope_theta"])),  # 5e6 and 5000000
    lambda raw: raw["text_config"].update(head_dim=None),  # derived from hidden_size / heads when null
], ids=["transformers5-dialect", "unrelated-keys", "float-spelling", "derived-head-dim"])
def test_same_architecture_same_fingerprint(tmp_path, change):
    assert router.fingerprint(rewrite(tmp_path, change)) == router.fingerprint(skeleton("checkpoints/tiny-vqa"))


@pytest.mark.parametrize("change", [
    lambda raw: raw["text_config"].update(num_experts_per_tok=2),
    lambda raw: raw["text_config"].update(rms_norm_eps=1e-5),
    lambda raw: raw["text_config"]["rope_scaling"].update(mrope_section=[8, 4, 4]),
    lambda raw: raw["vision_config"].update(deepstack_visual_indexes=[0, 1]),
    lambda raw: raw.update(image_token_id=395),
    lambda raw: raw["text_config"].update(moe_intermediate_size=64),
], ids=["top-k", "eps", "mrope", "deepstack", "token-id", "expert-width"])
def test_other_architecture_other_fingerprint(tmp_path, change):
    other = rewrite(tmp_path, change)
    tiny_vqa = skeleton("checkpoints/tiny-vqa")
    assert router.fingerprint(other) != router.fingerprint(tiny_vqa)
    assert not router.legacy_fingerprints(other) & router.legacy_fingerprints(tiny_vqa)


def test_fingerprint_of_a_rank_split_is_the_whole_models():
    cfg = read_config(tiny.resolve("tiny-kimi"))
    whole, half = build(cfg, "meta"), build(cfg, "meta", shard=Shard(1, 2))
    assert router.fingerprint(half) == router.fingerprint(whole)
    assert router.legacy_fingerprints(half) == router.legacy_fingerprints(whole)


def test_an_old_file_for_another_checkpoint_is_refused(tmp_path):
    doc = json.load(open(os.path.join(ROOT, "benchmarks", "tiny-vqa", "alpha.json")))
    cli.write_json(tmp_path / "alpha.json", doc)
    with pytest.raises(ValueError, match="made for another model"):
        router.load_alpha(str(tmp_path / "alpha.json"), skeleton("configs/qwen3_vl_30b_a3b.json"))


# ---------------------------------------------------------------------------------------------------------------
# Data identity


def test_data_identity_is_content_not_location(tmp_path):
    from PIL import Image
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(a / "red.png")
    (a / "d.jsonl").write_text(json.dumps(dict(image="red.png", question="what color?", answer="red")) + "\n")
    shutil.copytree(a, b)
    here, there = data.read_jsonl(str(a / "d.jsonl")), data.read_jsonl(str(b / "d.jsonl"))
    assert data.data_hash(here) == data.data_hash(there)
    assert data.path_data_hash(here) != data.path_data_hash(there)  # what earlier files recorded
    assert data.same_data(there, data.path_data_hash(there)) and data.same_data(there, data.data_hash(here))
    Image.new("RGB", (32, 32), (30, 200, 30)).save(b / "red.png")  # same name, other pixels
    assert data.data_hash(data.read_jsonl(str(b / "d.jsonl"))) != data.data_hash(here)
    (b / "d.jsonl").write_text(json.dumps(dict(image="red.png", question="what colour?", answer="red")) + "\n")
    assert not data.same_data(data.read_jsonl(str(b / "d.jsonl")), data.data_hash(here))


def test_synthetic_and_video_data_hash_by_content(tmp_path):
    from PIL import Image
    assert data.data_hash(data.synthetic_samples(3)) == data.data_hash(data.synthetic_samples(3))
    assert data.data_hash(data.synthetic_samples(3)) != data.data_hash(data.synthetic_samples(3, seed=1))
    for name in ("f1", "f2"):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.new("RGB", (28, 28), (k * 90, 10, 10)).save(tmp_path / name / f"{k}.png")
    s1, s2 = (data.Sample("q", "a", [], str(tmp_path / n)) for n in ("f1", "f2"))
    assert data.data_hash([s1]) == data.data_hash([s2])


def test_shipped_thresholds_calibration_data_is_checkable_here():
    """evaluate.py re-reads a thresholds file's calibration data and checks it by hash: with the shipped files,
    on any machine the easy-vqa package is installed on."""
    pytest.importorskip("easy_vqa")
    import evaluate
    for path, doc in artifacts():
        if doc["format"] == router.THRESHOLDS_FORMAT:
            args = types.SimpleNamespace(thresholds=path, data=None, eval_n=2, fits=None)
            calib = evaluate.fidelity_inputs(args)[1]
            assert len(calib) == doc["data"]["n"]
