"""InternVL-3.5 video against transformers on the built-in tiny checkpoints of both decoders (Qwen3-MoE, gpt-oss):
transformers' InternVLProcessor with its InternVLVideoProcessor, and InternVLForConditionalGeneration, against our
processor and model. Prompt tokens, frame sampling, pixel values, fp32 logits and greedy tokens.

We read a video as a folder of frame files, transformers as decoded frames: the same PNGs go to both, as a folder
to us and as PIL images to it. Sampling defaults differ: transformers keeps every frame unless asked to sample
(do_sample_frames=True with num_frames, or fps), we keep at most num_frames (32, lmms-eval's setting). So a long
video gets the same explicit count on both sides, and a short one (at most 32 frames) the defaults of both.

transformers' video processor imports torchvision, and PyPI's torchvision is a CUDA build that cannot load beside
the CPU torch: .ci/run runs this file in its own environment, and it skips anywhere torchvision does not load."""
import numpy as np
import pytest
import torch
from PIL import Image

try:
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
except Exception as e:  # no torchvision: ModuleNotFoundError; a CUDA torchvision beside a CPU torch: RuntimeError
    pytest.skip(f"transformers' InternVLVideoProcessor cannot be imported ({type(e).__name__}: {e}); it needs a "
                f"torchvision that loads beside this torch (.ci/run runs this file in .ci-video)",
                allow_module_level=True)

from transformers.video_utils import VideoMetadata

import processor
from generate import generate
from model import load
from support import tiny
from test_internvl_model import assert_logits_close

TEMPLATES = {"tiny-internvl": tiny.INTERNVL_CHAT_TEMPLATE_PATH,
             "tiny-internvl-gpt-oss": tiny.INTERNVL_GPT_OSS_CHAT_TEMPLATE_PATH}
# name -> (frames in the folder, frame width x height, frames to sample or None for both sides' defaults)
VIDEOS = {"sampled": (10, (37, 91), 4), "every_frame": (5, (301, 203), None)}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def checkpoint(request):
    """(folder, transformers' processor, transformers' model in fp32 with eager attention, our model in fp32)."""
    from transformers import AutoProcessor, InternVLForConditionalGeneration
    folder = tiny.resolve(request.param)
    with open(TEMPLATES[request.param], encoding="utf-8") as f:
        ref = AutoProcessor.from_pretrained(folder, chat_template=f.read())
    assert isinstance(ref.video_processor, InternVLVideoProcessor)
    hf = InternVLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    return folder, ref, hf, load(folder, dtype=torch.float32)


def write_video(path, n_frames, size, seed=0):
    """n_frames noise frames of size (width, height) as 00.png, 01.png, ... in folder path; -> the frames as read
    back (PNG is lossless: the same pixels for both sides)."""
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n_frames):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path / f"{i:02d}.png")
    return [Image.open(path / f"{i:02d}.png").convert("RGB") for i in range(n_frames)]


def both(checkpoint, tmp_path, video):
    """(transformers' inputs, ours) for a system turn and a user turn with text around the video."""
    folder, ref, _, _ = checkpoint
    n_frames, size, num_frames = VIDEOS[video]
    frames = write_video(tmp_path / "frames", n_frames, size)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Watch this."}, {"type": "video"},
                                             {"type": "text", "text": "What happens?"}]}]
    text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    sampling = {} if num_frames is None else {"do_sample_frames": True, "num_frames": num_frames}
    theirs = ref(text=text, videos=[frames], return_tensors="pt", **sampling)
    proc = processor.for_model(folder, "internvl")
    if num_frames is not None:
        proc.image_cfg.num_frames = num_frames
    messages[1]["content"][1]["video"] = str(tmp_path / "frames")
    ours = proc(messages)
    assert ours["prompt"] == text
    return theirs, ours


def test_frame_indices_equal_transformers():
    sample = InternVLVideoProcessor().sample_frames
    for total in range(1, 41):
        for n in range(1, total + 1):
            want = sample(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=n).tolist()
            assert processor.video_frame_indices(total, n) == want, (total, n)
    # more frames asked for than there are: transformers refuses, we keep them all
    with pytest.raises(ValueError, match="exceeds"):
        sample(VideoMetadata(total_num_frames=3, fps=30.0), num_frames=4)
    assert processor.video_frame_indices(3, 4) == [0, 1, 2]


@pytest.mark.parametrize("video", list(VIDEOS))
def test_prompt_and_pixels_equal_transformers(checkpoint, tmp_path, video):
    theirs, ours = both(checkpoint, tmp_path, video)
    n_frames, _, num_frames = VIDEOS[video]
    n = num_frames or n_frames
    assert ours["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert ours["text"].count("<img>") == n and f"Frame{n}: <img>" in ours["text"]
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape == (n, 3, 448, 448)
    # one uint8 level is 0.017 after normalisation; transformers fuses rescale and normalise, 1 ulp apart from ours
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-6)


def test_logits_and_greedy_tokens_match_transformers(checkpoint, tmp_path):
    _, _, hf, ours = checkpoint
    theirs, mine = both(checkpoint, tmp_path, "sampled")
    ids, pixels = mine["input_ids"][None], mine["pixel_values"]
    with torch.no_grad():
        ref = hf(input_ids=theirs["input_ids"], pixel_values=theirs["pixel_values"]).logits
        assert_logits_close(ours(ids, pixel_values=pixels), ref)
    del ref  # [1, S, vocabulary] fp32: about 1 GB at gpt-oss's vocabulary
    out = hf.generate(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"],
                      pixel_values=theirs["pixel_values"], max_new_tokens=6, do_sample=False, eos_token_id=None,
                      pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = out.sequences[0, ids.shape[1]:]
    assert generate(ours, ids, max_new_tokens=6, pixel_values=pixels)[0].tolist() == want.tolist()
    # random weights may repeat one token, so each decode step's logits are compared too
    cache = ours.new_cache(1, ids.shape[1] + len(want))
    with torch.no_grad():
        steps = [ours(ids, cache=cache, pixel_values=pixels, last_only=True)[:, -1]]
        for token in want[:-1]:
            steps.append(ours.decode_step(token.view(1, 1), cache))
            cache.length += 1
    for got, logits in zip(steps, out.logits, strict=True):
        assert_logits_close(got, logits)
