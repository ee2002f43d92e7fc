"""processor.py against transformers' Qwen2VLImageProcessorPil / Qwen3VLProcessor, the real Jinja chat template,
and hand-worked video fixtures (spec qwen3_vl_moe.md §5)."""
import json
import os
import shutil

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

import qwen3_vl_moe
from model import config_from_dict
from processor import (QwenProcessor, VisionPreprocessConfig, group_timestamps, patchify, preprocess_image,
                       render_qwen_chat, sample_frame_indices, smart_resize, smart_resize_video, special_token_ids,
                       to_rgb)
from support import tiny

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "qwen3_vl_moe")
TEMPLATE = os.path.join(FIXTURES, "chat_template_qwen3_vl_instruct.jinja")
PRE_CFG = json.load(open(os.path.join(FIXTURES, "preprocessor_config.json")))
SPECIAL_TOKENS = {k: v for k, v in json.load(open(os.path.join(FIXTURES, "special_tokens.json"))).items()
                  if not k.startswith("_")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_tiny")
    tiny.write_qwen_tokenizer(str(d))
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(FIXTURES, name), d / name)
    return str(d)


@pytest.fixture(scope="module")
def proc(model_dir):
    return QwenProcessor.from_dir(model_dir)


def noise_image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)


def hf_image_processor(**overrides):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil
    kw = {k: PRE_CFG[k] for k in ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")}
    kw.update(overrides)
    return Qwen2VLImageProcessorPil(**kw)


def render_jinja(messages):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(open(TEMPLATE).read()).render(messages=messages, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------------
# images

def test_smart_resize_spec_examples():
    # worked examples of spec §5.1 (height, width) -> (h', w')
    assert smart_resize(1365, 2048) == (1376, 2048)
    assert smart_resize(1024, 1024) == (1024, 1024)
    assert smart_resize(100, 100) == (256, 256)
    assert smart_resize(50, 100) == (192, 384)
    assert smart_resize(48, 4000) == (64, 4000)  # round(1.5) = 2 (half to even); 64*4000 >= 65536


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    rng = np.random.default_rng(1)
    for h, w in rng.integers(1, 6000, (300, 2)):
        if max(h, w) / min(h, w) <= 200:
            assert smart_resize(int(h), int(w)) == hf_smart_resize(int(h), int(w), 32, 65536, 16777216)


@pytest.mark.parametrize("width,height,mode", [(100, 50, "RGB"), (333, 517, "RGB"), (20, 20, "RGB"),
                                               (3000, 17, "RGB"), (61, 47, "RGBA"), (90, 70, "L")])
def test_image_matches_transformers(width, height, mode):
    image = noise_image(width, height, seed=width, mode=mode)
    ours, grid = preprocess_image(to_rgb(image), VisionPreprocessConfig())
    ref = hf_image_processor()(images=[image], return_tensors="pt")
    assert torch.equal(torch.tensor([grid]), ref["image_grid_thw"])
    assert ours.dtype == torch.float32 and ours.shape == ref["pixel_values"].shape
    assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-6


def test_image_downscale_branch_matches_transformers():
    # a small max_pixels exercises the floor branch without a 16-megapixel image
    cfg = VisionPreprocessConfig(min_pixels=32 * 32, max_pixels=128 * 128)
    image = noise_image(517, 333, seed=3)
    ours, grid = preprocess_image(image, cfg)
    ref = hf_image_processor(size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128})(images=[image],
                                                                                          return_tensors="pt")
    # beta = sqrt(333 * 517 / 16384) = 3.24; h = floor(333 / 3.24 / 32) * 32 = 96, w = floor(517 / 3.24 / 32) * 32 = 128
    assert grid == (1, 6, 8) and torch.equal(torch.tensor([grid]), ref["image_grid_thw"])
    assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-6


def test_image_patch_order_by_hand():
    # 64x32 image (no resize with these limits) whose 16x16 patch (r, c) has channel values 40r+10c+{0,1,2}
    cfg = VisionPreprocessConfig(min_pixels=32 * 32)
    a = np.zeros((32, 64, 3), dtype=np.uint8)
    for r in range(2):
        for c in range(4):
            a[16 * r:16 * r + 16, 16 * c:16 * c + 16] = [40 * r + 10 * c + k for k in range(3)]
    pixels, grid = preprocess_image(Image.fromarray(a), cfg)
    assert grid == (1, 2, 4) and pixels.shape == (8, 3 * 2 * 16 * 16)
    # 2x2 merge blocks left to right, each block row-major
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for row, (r, c) in zip(pixels, order):
        expected = torch.tensor([((40 * r + 10 * c + k) / 255 - 0.5) / 0.5 for k in range(3)])
        assert torch.allclose(row.view(3, 2 * 256), expected[:, None].expand(3, 512), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# prompt and token ids

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
                                  {"type": "text", "text": "Compare these two pictures."},
                                  {"type": "image", "image": "c.png"}]}],
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": " brief."}]},
     {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "video", "video": "v.gif"}]},
     {"role": "assistant", "content": "A cat walks."},
     {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "And this?\n"}]}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prompt_matches_jinja_template(messages):
    assert render_qwen_chat(messages) == render_jinja(messages)


def test_input_ids_match_transformers_processor(proc, model_dir):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen3_vl import Qwen3VLProcessor

    class ImageOnlyProcessor(Qwen3VLProcessor):
        # the video processor needs torchvision; this test passes no video
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    ref_proc = ImageOnlyProcessor(image_processor=hf_image_processor(), tokenizer=tokenizer, video_processor=None)
    images = [noise_image(333, 517, seed=5), noise_image(100, 50, seed=6), noise_image(20, 20, seed=7)]
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "image", "image": images[1]},
                                             {"type": "text", "text": "What is in these images? Answer the question."},
                                             {"type": "image", "image": images[2]}]}]
    ours = proc(messages)
    ref = ref_proc(text=[render_jinja(messages)], images=images, return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"][0])
    assert torch.equal(ours["mm_token_type_ids"], ref["mm_token_type_ids"][0])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-6
    assert ours["pixel_values_videos"] is None and ours["video_grid_thw"] is None


def test_from_cli_and_modality(proc, model_dir, tmp_path):
    path = tmp_path / "img.png"
    noise_image(100, 50).save(path)
    out = proc.from_cli("What is this?", images=[str(path)], system="Be brief.")
    n = 12 * 24 // 4  # spec §5.1: 100x50 -> grid 12x24 -> 72 tokens
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n
                + "<|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n")
    assert out["text"] == expected
    ids = out["input_ids"].tolist()
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    assert ids == tokenizer.encode(expected, add_special_tokens=False).ids
    special = {v for v in SPECIAL_TOKENS.values() if v <= 151656}  # Qwen marks tool/fim/think tokens non-special
    expected_modality = [1 if i in (151655, 151656) else 2 if i in special else 0 for i in ids]
    assert model_modality(model_dir, out["input_ids"]).tolist() == expected_modality
    assert expected_modality.count(1) == n
    assert proc.decode(out["input_ids"]) == "system\nBe brief.\nuser\nWhat is this?\nassistant\n"


def model_modality(model_dir, ids, phase="prefill"):
    """The model's token modalities, with its special tokens read from the checkpoint's tokenizer files."""
    cfg = config_from_dict(tiny.qwen_config(), "tiny")
    with torch.device("meta"):
        model = qwen3_vl_moe.Qwen3VLMoe(cfg)
    model.special_ids = torch.tensor(sorted(set(special_token_ids(model_dir)) - set(cfg.media_token_ids)))
    return model.modality(ids, phase)


def test_modality_batched(model_dir):
    ids = torch.tensor([[151644, 100, 151655, 151656, 151657, 151667],
                        [151652, 151653, 151645, 151643, 5, 151654]])
    # <tool_call> 151657 and <think> 151667 are not marked special in Qwen's tokenizer, <|vision_pad|> is
    expected = torch.tensor([[2, 0, 1, 1, 0, 0], [2, 2, 2, 2, 0, 2]])
    assert torch.equal(model_modality(model_dir, ids), expected)
    assert torch.equal(model_modality(model_dir, ids, "decode"), expected.masked_fill(expected == 1, 0))


def test_ids_from_checkpoint_files(model_dir, tmp_path):
    for name in os.listdir(model_dir):
        shutil.copy(os.path.join(model_dir, name), tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "top_k": 20}))
    proc = QwenProcessor.from_dir(str(tmp_path))
    assert proc.stop_token_ids == [151645, 151643]
    assert proc.pad_token_id == 151643
    assert (proc.image_token_id, proc.video_token_id) == (151655, 151656)
    assert proc.image_cfg.min_pixels == 65536 and proc.image_cfg.max_pixels == 16777216
    assert proc.video_cfg.min_pixels == 4096 and proc.video_cfg.max_pixels == 25165824
    # without preprocessor_config.json the patch geometry comes from the vision tower's config
    os.remove(tmp_path / "preprocessor_config.json")
    config = json.load(open(tmp_path / "config.json"))
    config["vision_config"]["patch_size"] = 14
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert QwenProcessor.from_dir(str(tmp_path)).image_cfg.patch_size == 14


# ---------------------------------------------------------------------------------------------------------------
# video (hand-worked from spec §5.4 and video_preprocessor_values.json: 2 fps, 4..768 frames)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def test_gif_video_by_hand(proc, tmp_path):
    path = tmp_path / "clip.gif"
    frames = [Image.new("RGB", (64, 32), c) for c in COLOURS]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    out = proc([{"role": "user", "content": [{"type": "video", "video": str(path)},
                                             {"type": "text", "text": "Describe."}]}])
    # 5 frames at 4 fps: int(5 / 4 * 2) = 2 -> raised to min_frames 4; linspace(0, 4, 4) = 0, 1.33, 2.67, 4
    # -> frames 0, 1, 3, 4; groups (0, 1) and (3, 4) at (0 + 0.25) / 2 and (0.75 + 1.0) / 2 seconds.
    # 64x32 with 4 frames is inside [4096, 25165824] pixels: no resize, grid (2, 2, 4), 2 tokens per group.
    assert out["video_grid_thw"].tolist() == [[2, 2, 4]]
    block = "<|vision_start|>" + "<|video_pad|>" * 2 + "<|vision_end|>"
    assert out["text"] == ("<|im_start|>user\n<0.1 seconds>" + block + "<0.9 seconds>" + block
                           + "Describe.<|im_end|>\n<|im_start|>assistant\n")
    # row = [c][t][y][x]; temporal group g holds frames (0, 1) or (3, 4), all 8 rows of a group alike
    pixels = out["pixel_values_videos"]
    assert pixels.shape == (2 * 2 * 4, 1536) and pixels.dtype == torch.float32
    for g, (fa, fb) in enumerate([(0, 1), (3, 4)]):
        expected = torch.tensor([[COLOURS[fa][c] / 127.5 - 1, COLOURS[fb][c] / 127.5 - 1] for c in range(3)])
        for row in pixels[8 * g: 8 * g + 8]:
            assert torch.allclose(row.view(3, 2, 256), expected[:, :, None].expand(3, 2, 256), atol=1e-6)
    assert (out["input_ids"] == 151656).sum() == 4


def test_gif_prompt_matches_jinja_plus_expansion(proc, tmp_path):
    path = tmp_path / "clip.gif"
    frames = [Image.new("RGB", (64, 32), c) for c in COLOURS]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Watch: "}, {"type": "video", "video": str(path)},
                                             {"type": "text", "text": "What happens?"}]}]
    out = proc(messages)
    # transformers 4.57 (the checkpoint's release) replaces the whole <|vision_start|><|video_pad|><|vision_end|>
    block = "<|vision_start|>" + "<|video_pad|>" * 2 + "<|vision_end|>"
    expected = render_jinja(messages).replace("<|vision_start|><|video_pad|><|vision_end|>",
                                              "<0.1 seconds>" + block + "<0.9 seconds>" + block)
    assert out["text"] == expected and out["prompt"] == render_jinja(messages)


def test_folder_video_pads_odd_frame_count(proc, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, c in enumerate(COLOURS[:3]):
        Image.new("RGB", (64, 32), c).save(folder / f"frame_{k:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    out = proc.from_cli("Go", video=str(folder))
    # folder = 2 fps: 3 frames kept (min(max(3, 4), 768, 3)), padded to 4 by repeating frame 2;
    # groups (0, 1) -> (0 + 0.5) / 2 = 0.25 -> "0.2" (half to even), (2, 2) -> 1.0
    assert out["video_grid_thw"].tolist() == [[2, 2, 4]]
    assert "<0.2 seconds><|vision_start|>" in out["text"] and "<1.0 seconds><|vision_start|>" in out["text"]
    last = out["pixel_values_videos"][8].view(3, 2, 256)
    assert torch.allclose(last[:, 0], last[:, 1]) and abs(last[2, 0, 0].item() - 1.0) < 1e-6  # blue twice


def test_video_rules_match_transformers():
    # the video processor class needs torchvision to be built, but its pure functions can be called directly
    import importlib
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata
    V = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    cfg = VisionPreprocessConfig.video_defaults()
    rng = np.random.default_rng(2)
    for total, fps, h, w in zip(rng.integers(2, 3000, 200), rng.uniform(0.5, 60, 200), rng.integers(1, 4000, 200),
                                rng.integers(1, 4000, 200)):
        total, h, w = int(total), int(h), int(w)
        ref_indices = V.Qwen3VLVideoProcessor.sample_frames(SimpleNamespace(fps=2, min_frames=4, max_frames=768),
                                                            VideoMetadata(total_num_frames=total, fps=fps))
        indices = sample_frame_indices(total, fps, cfg)
        assert indices.tolist() == ref_indices.tolist()
        assert group_timestamps(indices, fps, 2) == Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2)
        if max(h, w) / min(h, w) <= 100:
            assert (smart_resize_video(len(indices), h, w, 2, 32, 4096, 25165824)
                    == V.smart_resize(len(indices), h, w, 2, 32, 4096, 25165824))
    frames = torch.randn(5, 3, 64, 96)  # odd frame count: the last frame is repeated
    ref, *ref_grid = V.Qwen3VLVideoProcessor.patchify(None, frames[None], 16, 2, 2)
    ours, grid = patchify(frames, cfg)
    assert grid == tuple(ref_grid) == (3, 4, 6) and torch.equal(ours, ref[0])


def test_frame_sampling_long_clip():
    cfg = VisionPreprocessConfig.video_defaults()
    # 100 frames at 25 fps = 4 s -> 8 frames at 2 fps: linspace(0, 99, 8) rounded
    assert sample_frame_indices(100, 25.0, cfg).tolist() == [0, 14, 28, 42, 57, 71, 85, 99]
    assert group_timestamps([0, 14, 28], 25.0, 2) == [(0 + 14 / 25) / 2, 28 / 25]


# ---------------------------------------------------------------------------------------------------------------
# tiny tokenizer

def test_tiny_tokenizer_real_ids_and_roundtrip(model_dir, tmp_path):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    for token, tid in SPECIAL_TOKENS.items():
        assert tok.token_to_id(token) == tid and tok.id_to_token(tid) == token
    added = json.load(open(os.path.join(model_dir, "tokenizer.json")))["added_tokens"]
    assert {t["id"] for t in added if t["special"]} == set(range(151643, 151657))
    regular = tok.get_vocab(with_added_tokens=False)
    assert 256 < len([i for i in regular.values() if i < 151643]) < 1000
    assert len(tok.encode(" the assistant").ids) == 2  # ordinary words got merges
    for text in ["What is in this image? Naïve café, 日本語 ✓\n\n  tabs\tand 123",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    cfg = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
    assert cfg["chat_template"] == open(TEMPLATE).read()
    assert (cfg["eos_token"], cfg["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    tiny.write_qwen_tokenizer(str(tmp_path))  # deterministic
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(tmp_path / name, "rb").read() == open(os.path.join(model_dir, name), "rb").read()


# ---------------------------------------------------------------------------------------------------------------
# bad input: one-line errors that name the culprit

def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_missing_image(proc, tmp_path):
    path = str(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        proc.from_cli("hi", images=[path])


def test_unreadable_and_empty_image(proc, tmp_path):
    bad, empty = tmp_path / "bad.png", tmp_path / "empty.jpg"
    bad.write_text("this is not a png")
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        proc.from_cli("hi", images=[str(bad)])
    with pytest.raises(ValueError, match="empty \\(0 bytes\\).*empty.jpg"):
        proc.from_cli("hi", images=[str(empty)])


def test_truncated_image(proc, tmp_path):
    good, cut = tmp_path / "good.png", tmp_path / "cut.png"
    noise_image(64, 64).save(good)
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png"):
        proc.from_cli("hi", images=[str(cut)])


def test_aspect_ratio_over_200(proc, tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (402, 2)).save(path)
    with pytest.raises(ValueError, match="strip.png: size 402x2 has aspect ratio 201.0"):
        proc.from_cli("hi", images=[str(path)])


def test_video_errors(proc, tmp_path):
    empty_dir = tmp_path / "empty_frames"
    empty_dir.mkdir()
    (empty_dir / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files.*empty_frames"):
        proc.from_cli("hi", video=str(empty_dir))
    with pytest.raises(FileNotFoundError, match="missing_clip"):
        proc.from_cli("hi", video=str(tmp_path / "missing_clip"))
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="folder of frame images or an animated .gif.*clip.mp4"):
        proc.from_cli("hi", video=str(mp4))
    still = tmp_path / "still.gif"
    Image.new("RGB", (64, 32)).save(still)
    with pytest.raises(ValueError, match="still.gif has 1 frame"):
        proc.from_cli("hi", video=str(still))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 32)).save(mixed / "a.png")
    Image.new("RGB", (32, 32)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="b.png is 32x32, but a.png is 64x32"):
        proc.from_cli("hi", video=str(mixed))


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "hi"}], r"messages\[0\].role"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], r"messages\[1\]: a system message"),
    ([{"role": "assistant", "content": [{"type": "image", "image": "x.png"}]}], r"messages\[0\]: images and videos"),
    (user({"type": "audio", "audio": "x.wav"}), r"messages\[0\].content\[0\]"),
    (user({"type": "image"}), r"messages\[0\].content\[0\]"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be"),
    (user({"type": "text", "text": "<|image_pad|>"}), r"messages\[0\].content\[0\]: text contains a literal"),
    (user({"type": "image", "image": 5}), r"messages\[0\].content\[0\].image must be a path or a PIL image"),
    (user({"type": "video", "video": None}), r"messages\[0\].content\[0\].video must be a path"),
])
def test_bad_messages(proc, messages, match):
    with pytest.raises(ValueError, match=match):
        proc(messages)


def test_bad_model_dir(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        QwenProcessor.from_dir(str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        QwenProcessor.from_dir(str(tmp_path))
    for name in os.listdir(model_dir):
        shutil.copy(os.path.join(model_dir, name), tmp_path / name)
    config = json.load(open(tmp_path / "config.json"))
    config["image_token_id"] = 151654
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: image_token_id=151654 but .* has <\|image_pad\|> at id 151655"):
        QwenProcessor.from_dir(str(tmp_path))
    shutil.copy(os.path.join(model_dir, "config.json"), tmp_path / "config.json")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": "big"}}))
    with pytest.raises(ValueError, match="preprocessor_config.json: min_pixels must be a number, got 'big'"):
        QwenProcessor.from_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        QwenProcessor.from_dir(str(tmp_path))


def test_foreign_chat_template_warns(model_dir, tmp_path):
    for name in os.listdir(model_dir):
        shutil.copy(os.path.join(model_dir, name), tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.warns(UserWarning, match="chat_template.jinja: chat template differs"):
        QwenProcessor.from_dir(str(tmp_path))
