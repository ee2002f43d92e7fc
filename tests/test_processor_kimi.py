"""Kimi-VL preprocessing and prompt: hand-worked sizes and pixels, the jinja template, tiktoken ids, errors."""
import ast
import base64
import json
import math
import shutil
from pathlib import Path

import jinja2.sandbox
import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image

import kimi_vl
import processor
from model import config_from_dict
from support import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "kimi_vl"
SPECIAL_JSON = json.loads((FIXTURES / "special_tokens.json").read_text())
NAMED = {int(i): s for i, s in SPECIAL_JSON["named_special_tokens"].items()}
FIRST_SPECIAL, LAST_SPECIAL = SPECIAL_JSON["special_id_range"]
MEDIA_PAD_ID = SPECIAL_JSON["media_placeholder_token_id"]
INSTRUCT_JSON = json.loads((FIXTURES / "preprocessor_config.reconstructed.json").read_text())
INSTRUCT = processor.KimiImageConfig(in_token_limit=INSTRUCT_JSON["in_token_limit"],
                                     patch_size=INSTRUCT_JSON["patch_size"],
                                     merge_kernel_size=tuple(INSTRUCT_JSON["merge_kernel_size"]),
                                     image_mean=tuple(INSTRUCT_JSON["image_mean"]),
                                     image_std=tuple(INSTRUCT_JSON["image_std"]),
                                     pad_input=INSTRUCT_JSON["pad_input"])
THINKING = processor.KimiImageConfig(in_token_limit=16384)


def render_template(messages, add_generation_prompt=True):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string((FIXTURES / "chat_template.jinja").read_text())
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_kimi_proc")
    tiny.write_kimi_tokenizer(d)
    shutil.copy(FIXTURES / "preprocessor_config.reconstructed.json", d / "preprocessor_config.json")
    shutil.copy(FIXTURES / "config.reconstructed.json", d / "config.json")
    return d


@pytest.fixture(scope="module")
def proc(model_dir):
    return processor.KimiProcessor.from_dir(model_dir)


@pytest.fixture(scope="module")
def ref_encoding(model_dir):
    ranks = {}
    for line in (model_dir / "tiktoken.model").read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    specials = {NAMED.get(i, f"<|reserved_token_{i}|>"): i for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)}
    pat = SPECIAL_JSON["pat_str_join"].join(SPECIAL_JSON["pat_str_alternatives"])
    return tiktoken.Encoding("kimi-tiny", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)


def save_image(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


# ---- prompt ---------------------------------------------------------------------------------------------


def test_prompt_matches_template_system_two_images(tmp_path):
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"},
                                     {"type": "text", "text": "Compare the two pictures."}]},
    ]
    assert processor.format_kimi_chat(messages) == render_template(messages)


def test_prompt_matches_template_multi_turn():
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": "x.png"},
                                     {"type": "text", "text": " what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    for add_generation_prompt in (True, False):
        assert (processor.format_kimi_chat(messages, add_generation_prompt)
                == render_template(messages, add_generation_prompt))


def test_from_cli_prompt_is_the_literal_spec_format(proc, tmp_path):
    out = proc.from_cli("Describe.", images=[save_image(tmp_path / "a.png", 28, 28)])
    assert out["prompt"] == ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user"
                             "<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_end|>Describe."
                             "<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert proc.decode(out["input_ids"]) == "systemYou are a helpful assistantuserimageDescribe.assistant"
    out = proc.from_cli("Hi", system="Be brief.")
    assert out["prompt"].startswith("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user")
    assert out["pixel_values"] is None and out["image_grid_hws"] is None


def test_input_ids_and_modality_match_reference(proc, ref_encoding, tmp_path):
    # 100x50 -> padded 112x56 -> grid 4x8 -> 8 tokens; 30x30 -> padded 56x56 -> grid 4x4 -> 4 tokens
    a, b = save_image(tmp_path / "a.png", 100, 50), save_image(tmp_path / "b.png", 30, 30, seed=1)
    messages = [{"role": "system", "content": "Answer in English."},
                {"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b},
                                             {"type": "text", "text": "Which one is brighter? 图像 🎉"}]}]
    text = render_template(messages)
    first, second, rest = text.split("<|media_pad|>")
    text = first + "<|media_pad|>" * 8 + second + "<|media_pad|>" * 4 + rest
    expected = ref_encoding.encode(text, allowed_special="all")
    out = proc(messages)
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].tolist() == expected
    assert out["text"] == text
    assert out["image_grid_hws"].tolist() == [[4, 8], [4, 4]]
    assert out["pixel_values"].shape == (32 + 16, 3, 14, 14) and out["pixel_values"].dtype == torch.float32
    modality = [1 if i == MEDIA_PAD_ID else 2 if FIRST_SPECIAL <= i <= LAST_SPECIAL else 0 for i in expected]
    assert kimi_modality(proc, out["input_ids"]).tolist() == modality
    assert modality.count(1) == 12


def kimi_modality(proc, ids):
    """The model's token modalities with the special block the tokenizer names (what the loader reads)."""
    cfg = config_from_dict(tiny.kimi_config(), "tiny")
    with torch.device("meta"):
        model = kimi_vl.KimiVL(cfg)
    model.special_ids = torch.tensor(sorted(set(proc.special_ids) - {MEDIA_PAD_ID}))
    return model.modality(ids, "prefill")


def test_modality_hand_built(proc):
    ids = torch.tensor([[5, 163605, 163586, 163700, 100, 163839], [163584, 0, 163583, 163605, 163604, 7]])
    assert kimi_modality(proc, ids).tolist() == [[0, 1, 2, 2, 0, 2], [2, 0, 0, 1, 2, 0]]


def test_token_ids_from_the_checkpoint_files(proc):
    assert proc.stop_token_ids == [163586, 163585]  # <|im_end|>, [EOS] (config.json's eos is [EOS] again)
    assert proc.pad_token_id == 163839 and proc.image_token_id == 163605
    assert proc.special_ids == list(range(FIRST_SPECIAL, LAST_SPECIAL + 1))


# ---- images ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, size, resized, final, tokens", [
    (INSTRUCT, (448, 448), (448, 448), (448, 448), 256),
    (INSTRUCT, (640, 480), (640, 480), (644, 504), 414),
    (INSTRUCT, (1024, 1024), (897, 897), (924, 924), 1089),
    (INSTRUCT, (1920, 1080), (1196, 672), (1204, 672), 1032),
    (INSTRUCT, (1792, 1792), (896, 896), (896, 896), 1024),
    (THINKING, (1024, 1024), (1024, 1024), (1036, 1036), 1369),
    (THINKING, (1920, 1080), (1920, 1080), (1932, 1092), 2691),
    (THINKING, (1792, 1792), (1792, 1792), (1792, 1792), 4096),
])
def test_image_sizes_from_the_spec_table(cfg, size, resized, final, tokens):
    got_resized, got_final = processor.kimi_image_size(*size, cfg)
    assert (got_resized, got_final) == (resized, final)
    assert (final[0] // 14) * (final[1] // 14) // 4 == tokens


def transformers_navit_resize():
    """transformers' Kimi-K2.5 size rule, lifted from its source: the module imports torchvision, which is not
    installable beside the CPU torch here, so the class itself cannot be built."""
    import transformers
    src = Path(transformers.__file__).parent / "models" / "kimi_k25" / "image_processing_kimi_k25.py"
    if not src.is_file():
        pytest.skip("transformers has no kimi_k25 image processor")
    fn = [n for n in ast.parse(src.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "navit_resize"]
    if not fn:
        pytest.skip("navit_resize not found in transformers' kimi_k25 image processor")
    namespace = {"math": math}
    exec(compile(ast.Module(body=fn, type_ignores=[]), str(src), "exec"), namespace)
    return namespace["navit_resize"]


@pytest.mark.parametrize("width, height", [(448, 448), (640, 480), (1024, 1024), (1920, 1080), (333, 517),
                                           (100, 50), (3000, 200), (29, 1000), (4000, 3000), (14, 14)])
def test_image_sizes_match_transformers_k25_rule(width, height):
    # Kimi-VL and Kimi-K2.5 share the budget/pad rule; K2.5 adds a per-side cap that these sizes do not reach
    navit_resize = transformers_navit_resize()
    (rh, rw), (ph, pw) = navit_resize(height, width, 14, 2, INSTRUCT.in_token_limit, 512)
    assert processor.kimi_image_size(width, height, INSTRUCT) == ((rw, rh), (pw, ph))


def test_pixels_and_patch_order_hand_worked():
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # H=20, W=30 -> padded 28 x 56 -> grid 2 x 4
    pixels, grid = processor.preprocess_kimi_image(Image.fromarray(arr), INSTRUCT)
    assert grid == (2, 4) and pixels.shape == (8, 3, 14, 14)
    expected = np.full((8, 3, 14, 14), -1.0, dtype=np.float32)  # black padding normalises to -1
    for row in range(2):
        for col in range(4):
            for y in range(14):
                for x in range(14):
                    py, px = row * 14 + y, col * 14 + x
                    if py < 20 and px < 30:
                        value = (arr[py, px].astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
                        expected[row * 4 + col, :, y, x] = value
    torch.testing.assert_close(pixels, torch.from_numpy(expected), atol=0, rtol=0)


def test_downscale_uses_pil_bicubic():
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (1000, 1200, 3), dtype=np.uint8))
    # 85*71 = 6035 patches > 4096: scale sqrt(4096/6035) -> 988 x 823, padded to 1008 x 840 -> grid 60 x 72
    pixels, grid = processor.preprocess_kimi_image(img, INSTRUCT)
    assert grid == (60, 72)
    canvas = np.zeros((840, 1008, 3), dtype=np.uint8)
    canvas[:823, :988] = np.asarray(img.resize((988, 823), Image.Resampling.BICUBIC))
    full = pixels.view(60, 72, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, 840, 1008)
    expected = torch.from_numpy(canvas).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(full, expected, atol=1e-6, rtol=0)


# ---- video ----------------------------------------------------------------------------------------------

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (51, 102, 153)]  # exact in the GIF palette


def test_gif_video_becomes_image_blocks(proc, tmp_path):
    frames = [Image.new("RGB", (600, 300), c) for c in COLOURS]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = proc.from_cli("What happens?", video=str(gif))
    # each frame: 600x300 -> long side 480 -> 480x240 -> padded 504x252 -> grid 18x36 -> 162 tokens
    assert out["prompt"].count(processor.IMAGE_BLOCK) == 5
    assert out["image_grid_hws"].tolist() == [[18, 36]] * 5
    assert (out["input_ids"] == MEDIA_PAD_ID).sum().item() == 5 * 162
    per_frame = out["pixel_values"].view(5, 18, 36, 3, 14, 14)
    for k, colour in enumerate(COLOURS):
        top_left = per_frame[k, 0, 0, :, 0, 0]
        torch.testing.assert_close(top_left, torch.tensor(colour, dtype=torch.float32) / 127.5 - 1)
        assert (per_frame[k, 17, :, :, 13, :] == -1).all()  # rows 240..251 are padding


def test_video_folder_is_sampled_uniformly(tmp_path):
    for k in range(10):
        Image.new("RGB", (20, 10), (k * 20,) * 3).save(tmp_path / f"{k:02d}.png")
    frames = processor.kimi_video_frames(tmp_path, max_frames=4)  # round(linspace(0, 9, 4)) = 0, 3, 6, 9
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 60, 120, 180]
    assert [f.size for f in frames] == [(20, 10)] * 4


# ---- bad input ------------------------------------------------------------------------------------------


def test_missing_image(proc, tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found: .*nope.png"):
        proc.from_cli("x", images=[tmp_path / "nope.png"])


def test_zero_size_image(proc, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"image file is empty \(0 bytes\): .*empty.png"):
        proc.from_cli("x", images=[tmp_path / "empty.png"])


def test_unreadable_image(proc, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*junk.jpg"):
        proc.from_cli("x", images=[tmp_path / "junk.jpg"])


def test_image_path_is_a_folder(proc, tmp_path):
    with pytest.raises(ValueError, match="image path is a folder"):
        proc.from_cli("x", images=[tmp_path])


def test_image_too_wide_for_the_position_table(proc, tmp_path):
    # 7200x14: 514 patches, under the budget, but padded to 7224 px = 516 patches per row > 511
    path = save_image(tmp_path / "strip.png", 7200, 14)
    with pytest.raises(ValueError, match=r"strip.png: 7200x14 px gives a 2x516 patch grid"):
        proc.from_cli("x", images=[path])


def test_video_errors(proc, tmp_path):
    with pytest.raises(FileNotFoundError, match="video not found: .*missing.gif"):
        proc.from_cli("x", video=tmp_path / "missing.gif")
    (tmp_path / "frames").mkdir()
    with pytest.raises(ValueError, match="video folder has no image files .*frames"):
        proc.from_cli("x", video=tmp_path / "frames")
    (tmp_path / "empty.gif").write_bytes(b"")
    with pytest.raises(ValueError, match="video file is empty .*empty.gif"):
        proc.from_cli("x", video=tmp_path / "empty.gif")


def test_message_errors(proc):
    with pytest.raises(ValueError, match=r"messages\[0\]: role must be system, user or assistant"):
        proc([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: text contains a literal <\|media_pad\|>"):
        proc([{"role": "user", "content": [{"type": "text", "text": "sneaky <|media_pad|>"}]}])
    with pytest.raises(ValueError, match=r"messages\[0\].content\[1\]: part needs a 'text' string or an 'image'"):
        proc([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}])
    with pytest.raises(ValueError, match="messages is empty"):
        proc([])


def test_bad_config_json(model_dir, tmp_path):
    for name in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"media_placeholder_token_id": 163000}))
    with pytest.raises(ValueError, match="config.json: media_placeholder_token_id 163000"):
        processor.KimiProcessor.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        processor.KimiProcessor.from_dir(tmp_path)


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found: .*absent"):
        processor.KimiProcessor.from_dir(tmp_path / "absent")


def test_bad_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="preprocessor_config.json: cannot read preprocessor config"):
        processor.KimiImageConfig.from_file(tmp_path / "preprocessor_config.json")


def test_tokenizer_without_media_pad(model_dir, tmp_path):
    shutil.copy(model_dir / "tiktoken.model", tmp_path / "tiktoken.model")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]["163605"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"token '<\|media_pad\|>' is not in the vocabulary"):
        processor.KimiProcessor.from_dir(tmp_path)


def test_centre_crop_when_padding_is_off():
    cfg = processor.KimiImageConfig(pad_input=False)
    arr = np.random.default_rng(5).integers(0, 256, (50, 100, 3), dtype=np.uint8)
    # 100x50 -> cropped to 84x28 (whole 28 px windows), offsets left (100-84)//2 = 8, top (50-28)//2 = 11
    pixels, grid = processor.preprocess_kimi_image(Image.fromarray(arr), cfg)
    assert grid == (2, 6)
    expected = torch.from_numpy(arr.astype(np.float32)) / 127.5 - 1  # [H, W, 3]
    torch.testing.assert_close(pixels[0, :, 0, 0], expected[11, 8])  # top-left of the crop
    torch.testing.assert_close(pixels[11, :, 13, 13], expected[11 + 27, 8 + 83])  # bottom-right
    with pytest.raises(ValueError, match="tiny: 20x40 px is smaller than one 28 px merge window"):
        processor.preprocess_kimi_image(Image.new("RGB", (20, 40)), cfg, "tiny")


def test_alpha_is_dropped_not_composited(proc, tmp_path):
    Image.new("RGBA", (28, 28), (200, 10, 10, 0)).save(tmp_path / "clear.png")
    out = proc.from_cli("x", images=[tmp_path / "clear.png"])
    torch.testing.assert_close(out["pixel_values"][0, :, 0, 0], torch.tensor([200.0, 10.0, 10.0]) / 127.5 - 1)


def test_bad_image_part_types(proc):
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: image must be a path or a PIL image, got int"):
        proc([{"role": "user", "content": [{"type": "image", "image": 3}]}])
    with pytest.raises(ValueError, match=r"messages\[0\].content\[0\]: a part must be a dict, got str"):
        proc([{"role": "user", "content": ["hello"]}])


def test_pil_image_part(proc):
    img = Image.new("RGB", (56, 28), (255, 255, 255))
    out = proc([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "?"}]}])
    assert out["image_grid_hws"].tolist() == [[2, 4]]
    assert (out["pixel_values"] == 1).all()
