"""InternVL-3.5 preprocessing against transformers' GotOcr2ImageProcessorPil and InternVLProcessor (tiles, pixel
values, prompt tokens) on the tiny-internvl folder's tokenizer and preprocessor files."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import processor
from support import tiny

SIZES = [(500, 375), (1280, 720), (448, 448), (1000, 200), (37, 91), (301, 1203), (449, 447)]  # width, height


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder():
    return tiny.resolve("tiny-internvl")


@pytest.fixture(scope="module")
def reference(folder):
    """transformers' InternVLProcessor on the folder's files. Its video processor needs torchvision, so the
    class check that would import it is skipped: no video goes through it."""
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.processing_utils import ProcessorMixin
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        with open(tiny.INTERNVL_CHAT_TEMPLATE_PATH) as f:
            return InternVLProcessor(image_processor=GotOcr2ImageProcessorPil.from_pretrained(folder),
                                     tokenizer=AutoTokenizer.from_pretrained(folder), image_seq_length=256,
                                     chat_template=f.read())
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


@pytest.mark.parametrize("max_tiles", [12, 6])
@pytest.mark.parametrize("size", SIZES)
def test_tiles_equal_transformers(reference, size, max_tiles):
    image = noise_image(*size)
    ref = reference.image_processor(images=[image], crop_to_patches=True, max_patches=max_tiles, return_tensors="pt")
    ours = processor.internvl_tiles(image, processor.InternVLImageConfig(max_tiles=max_tiles))
    assert ours.shape[0] == int(ref["num_patches"][0])
    assert torch.equal(ours, ref["pixel_values"])


@pytest.mark.parametrize("max_tiles, n", [(None, 13), (6, 7), (2, 1), (1, 1)])  # 2: one tile beats 2 x 1
def test_a_four_by_three_photo_and_the_tile_cap(folder, max_tiles, n):
    proc = processor.for_model(folder, "internvl", max_tiles=max_tiles)
    out = proc.from_cli("what is it?", images=[noise_image(640, 480)])
    assert out["pixel_values"].shape == (n, 3, 448, 448)
    assert int((out["input_ids"] == proc.image_token_id).sum()) == 256 * n


def test_prompt_tokens_equal_transformers(folder, reference):
    images = [noise_image(500, 375, 1), noise_image(37, 91, 2)]
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": images[1]},
                                             {"type": "text", "text": "What is in the pictures?"}]}]
    text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ref = reference(text=text, images=images, return_tensors="pt")
    ours = processor.for_model(folder, "internvl")(messages)
    assert ours["prompt"] == text
    assert ours["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    proc = processor.for_model(folder, "internvl")
    assert {proc.tokenizer.token_to_id(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")} <= set(proc.special_ids)


def test_video_is_one_tile_per_sampled_frame(folder, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(10):
        noise_image(64, 48, i).save(frames / f"{i:02d}.png")
    proc = processor.for_model(folder, "internvl")
    proc.image_cfg.num_frames = 4
    out = proc.from_cli("describe", video=str(frames))
    block = "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"
    assert out["text"] == ("<|im_start|>user\n" + "\n".join(f"Frame{k}: {block}" for k in range(1, 5))
                           + "\ndescribe<|im_end|>\n<|im_start|>assistant\n")
    # transformers' sample_frames: arange(shift, total, total / n).int() with shift total / n / 2
    assert processor.video_frame_indices(10, 4) == [1, 3, 6, 8]
    # the frames' pixels against transformers' video processor: tests/test_internvl_video.py
    kept = [Image.open(frames / f"{k:02d}.png").convert("RGB") for k in (1, 3, 6, 8)]
    assert torch.equal(out["pixel_values"], processor.internvl_frames(kept, proc.image_cfg))


def test_video_settings_come_from_their_own_file_first(folder, tmp_path):
    """transformers' InternVL video processor reads video_preprocessor_config.json before the image processor's file:
    its frame count and statistics win for videos, images keep theirs."""
    copy = tmp_path / "with-video-config"
    copy.mkdir()
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), copy / name)
    (copy / "video_preprocessor_config.json").write_text(json.dumps({"num_frames": 3, "image_mean": [0.5] * 3,
                                                                     "image_std": [0.5] * 3}))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(10):
        noise_image(64, 48, i).save(frames / f"{i:02d}.png")
    proc = processor.for_model(str(copy), "internvl")
    assert proc.video_cfg.num_frames == 3 and proc.image_cfg.num_frames == 32
    assert proc.image_cfg.image_mean != (0.5, 0.5, 0.5)
    out = proc.from_cli("describe", video=str(frames))
    assert out["text"].count("Frame") == 3 and out["pixel_values"].shape[0] == 3
    kept = [Image.open(frames / f"{k:02d}.png").convert("RGB") for k in processor.video_frame_indices(10, 3)]
    assert torch.equal(out["pixel_values"], processor.internvl_frames(kept, proc.video_cfg))
    (copy / "video_preprocessor_config.json").write_text(json.dumps({"num_frames": 0}))
    with pytest.raises(ValueError, match=r"video_preprocessor_config.json: num_frames must be a positive number"):
        processor.for_model(str(copy), "internvl")


def test_bad_input_is_one_line(folder):
    proc = processor.for_model(folder, "internvl")
    with pytest.raises(ValueError, match="literal <IMG_CONTEXT>"):
        proc.from_cli("look: <IMG_CONTEXT>")
    with pytest.raises(ValueError, match="max_tiles must be >= 1"):
        processor.for_model(folder, "internvl", max_tiles=0)
    with pytest.raises(ValueError, match="max_tiles applies to InternVL only"):
        processor.for_model(tiny.resolve("tiny-qwen"), "qwen3_vl_moe", max_tiles=4)
