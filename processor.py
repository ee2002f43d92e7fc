"""Model inputs from chat messages, images and videos, without transformers.

Qwen3-VL-MoE (Qwen/Qwen3-VL-30B-A3B-Instruct):
- tokenizer: `tokenizer.json` through the `tokenizers` library; the special tokens are the added tokens marked
  "special": true, and every id (pads, vision markers, stop ids) is read from the checkpoint's files
- prompt: the Qwen3-VL Instruct chat template written out in Python (no Jinja at run time), then each
  `<|image_pad|>` expanded to one pad per merged 2x2 patch and each video to one
  `<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>` block per temporal group
- images: `smart_resize` + PIL bicubic + rescale/normalise exactly as transformers' Qwen2VLImageProcessorPil,
  then the 2x2-merge-block-major patch order the vision tower expects
- video: a folder of frames or an animated GIF (no video decoder), sampled like Qwen3VLVideoProcessor

Kimi-VL (moonshotai/Kimi-VL-A3B-Instruct):
- tokenizer: the shipped tiktoken vocabulary (`tiktoken.model`, "base64 rank" lines) converted once into a
  byte-level `tokenizers` BPE whose merges are recovered from the ranks, cached as JSON keyed by its hash
  (kimi_tokenizer.py)
- images: shrink to the patch budget with PIL bicubic, pad to multiples of 28 px, normalise, 14x14 patches
- prompt: the Instruct chat template written out in Python; video as a sequence of image blocks

InternVL-3.5 (OpenGVLab/InternVL3_5-30B-A3B-HF):
- tokenizer: `tokenizer.json` as for Qwen3-VL; `<img>`, `</img>` and `<IMG_CONTEXT>` are its added tokens
- images: dynamic tiling into 448 px tiles (the grid closest to the aspect ratio, min/max tiles from the folder,
  a thumbnail last), normalised with ImageNet statistics, as transformers' GotOcr2ImageProcessorPil
- prompt: ChatML, each image `<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>`; a video one tile per frame

generate.py and the pipeline scripts use it. Usage:
    proc = QwenProcessor.from_dir("Qwen3-VL-30B-A3B-Instruct")
    batch = proc.from_cli("What is in this image?", images=["cat.png"])
    batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"]
"""

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from tokenizers import Tokenizer

from kimi_tokenizer import KimiTokenizer, load_kimi_tokenizer


# the pixel tensors and grids the processors return, under the names the models' forward takes
PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "image_grid_hws")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# A folder of frames carries no frame rate. We take it to be the processor's own sampling rate (2 fps), so every
# frame is kept (up to max_frames) and frame i is stamped i/2 seconds; a GIF without frame durations gets the same.
DEFAULT_FOLDER_FPS = 2.0

# SHA-256 of the Qwen3-VL Instruct chat template, which render_qwen_chat reproduces (without tools).
QWEN3_VL_INSTRUCT_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ----------------------------------------------------------------------------------------------------------------
# Image and video preprocessing (Qwen2VLImageProcessorPil / Qwen3VLVideoProcessor rules)

@dataclass
class VisionPreprocessConfig:
    """Defaults are Qwen3-VL's preprocessor_config.json (images); `video_defaults()` gives the video values."""
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536  # "size.shortest_edge" in the file: a pixel count, not an edge
    max_pixels: int = 16777216  # "size.longest_edge"
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    fps: float = 2.0  # video only: frames sampled per second of video
    min_frames: int = 4
    max_frames: int = 768

    @classmethod
    def video_defaults(cls):
        # video budgets are pixels summed over all frames (video_preprocessor_config.json)
        return cls(min_pixels=4096, max_pixels=25165824)

    def update_from_json(self, d, path):
        """Overrides fields from a HF preprocessor / video-preprocessor json dict."""
        size = d.get("size") or {}
        values = {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")}
        values.update({k: d[k] for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                                         "min_frames", "max_frames", "rescale_factor", "fps") if d.get(k) is not None})
        for key, value in values.items():
            if value is None:
                continue
            real = key in ("rescale_factor", "fps")
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
                raise ValueError(f"{path}: {key} must be a number, got {value!r}")  # "16" too: a typo in the file
            if not (real or value == int(value)) or value <= 0:  # 0 pixels, a fraction of a patch
                raise ValueError(f"{path}: {key} must be {'a number' if real else 'an integer'} > 0, got {value!r}")
            setattr(self, key, float(value) if real else int(value))
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                value = _as_list(d[key])
                if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) and (v > 0 or key == "image_mean") for v in value):
                    raise ValueError(f"{path}: {key} must be 3 finite numbers{' > 0' if key == 'image_std' else ''}, "
                                     f"got {value}")
                setattr(self, key, tuple(float(v) for v in value))
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"{path}: size.shortest_edge {self.min_pixels} > size.longest_edge {self.max_pixels}")
        if self.min_frames > self.max_frames:
            raise ValueError(f"{path}: min_frames {self.min_frames} > max_frames {self.max_frames}")

    def check_agrees(self, vision, path, cfg_path):
        """The preprocessor cuts the patches the vision tower embeds: its patch, temporal patch and merge sizes
        must be config.json's, or the tower would read pixels of the wrong shape (or run on wrong ones)."""
        for key, vkey in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                          ("merge_size", "spatial_merge_size")):
            if vision.get(vkey) is not None and getattr(self, key) != vision[vkey]:
                raise ValueError(f"{path}: {key} {getattr(self, key)} disagrees with {cfg_path}'s "
                                 f"vision_config.{vkey} {vision[vkey]}")


def smart_resize(height, width, factor=32, min_pixels=65536, max_pixels=16777216):
    """(h', w'): multiples of `factor`, h'*w' within [min_pixels, max_pixels], aspect ratio kept as well as can be."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of {width}x{height} exceeds 200")
    # Python's round is half-to-even and the reference relies on it: 48/32 = 1.5 -> 2 but 80/32 = 2.5 -> 2
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames, height, width, temporal_factor=2, factor=32, min_pixels=4096,
                       max_pixels=25165824):
    """Like smart_resize, but the pixel budget counts all frames (Qwen3VLVideoProcessor, uncapped per frame)."""
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of {width}x{height} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image):
    """RGB PIL image; transparency is composited onto white (as transformers and qwen-vl-utils do)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path):
    """Decoded RGB image from a file, with clear one-line errors that name the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"image path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not halfway through a batch
            # camera photos store their rotation in EXIF; transformers' load_image applies it too
            return to_rgb(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def normalize_image(image, cfg):
    """RGB PIL image (or uint8 array [H, W, C]) -> float32 [C, H, W], bit-identical to transformers' rescale (fp64)
    then normalise (fp32)."""
    x = (np.asarray(image, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)  # [H, W, C]
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)  # [C, H, W]


def patchify(frames, cfg):
    """Frames [F, C, H, W] -> pixel rows [t*gh*gw, C*T*P*P] in the vision tower's order, and grid (t, gh, gw).

    An image is one frame: it is repeated to fill the temporal patch, as is the last frame of an odd-length video.
    Rows are 2x2-merge-block-major (each group of 4 consecutive rows is one visual token); a row is [c][t][y][x].
    """
    # F frames, C channels, T temporal patch, P patch side, M merge side; t/gh/gw grid in patches
    F, C, H, W = frames.shape
    T, P, M = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if F % T:
        frames = torch.cat([frames, frames[-1:].expand(T - F % T, C, H, W)])
    t, gh, gw = frames.shape[0] // T, H // P, W // P
    x = frames.view(t, T, C, gh // M, M, P, gw // M, M, P)  # (t, T, c, bh, mh, py, bw, mw, px)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, bh, bw, mh, mw, c, T, py, px)
    return x.reshape(t * gh * gw, C * T * P * P), (t, gh, gw)


def preprocess_image(image, cfg, name="image"):
    """RGB PIL image -> (pixel rows [gh*gw, C*T*P*P] float32, grid (1, gh, gw))."""
    width, height = image.size
    if min(width, height) == 0:
        raise ValueError(f"{name}: image has size {width}x{height}")
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"{name}: size {width}x{height} has aspect ratio "
                         f"{max(width, height) / min(width, height):.1f} > 200, which Qwen3-VL cannot take")
    h, w = smart_resize(height, width, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
    image = image.resize((w, h), resample=Image.BICUBIC)
    frames = torch.from_numpy(normalize_image(image, cfg))[None]  # [1, C, h, w]
    return patchify(frames, cfg)


def load_video_frames(path):
    """(list of RGB PIL frames, frames per second) from a folder of images (sorted by name) or an animated GIF."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"video folder has no image files ({', '.join(IMAGE_SUFFIXES)}): {path}")
        frames = [open_image(os.path.join(path, n)) for n in names]
        for n, frame in zip(names, frames):
            if frame.size != frames[0].size:
                raise ValueError(f"video frame {os.path.join(path, n)} is {frame.size[0]}x{frame.size[1]}, "
                                 f"but {names[0]} is {frames[0].size[0]}x{frames[0].size[1]}")
        return frames, DEFAULT_FOLDER_FPS
    if not path.lower().endswith(".gif"):
        raise ValueError(f"video must be a folder of frame images or an animated .gif (no video decoder): {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"video file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as im:
            frames, durations_ms = [], []
            for frame in ImageSequence.Iterator(im):
                frames.append(to_rgb(frame))
                durations_ms.append(frame.info.get("duration") or 0)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read video {path}: {e}") from None
    # the reference stamps sampled frame i at i/fps, so a GIF's frame timing enters only through its mean rate
    total_s = sum(durations_ms) / 1000
    return frames, (len(frames) / total_s if total_s > 0 else DEFAULT_FOLDER_FPS)


def sample_frame_indices(total_frames, video_fps, cfg):
    """Indices of the frames to keep: cfg.fps frames per second, clamped to [min_frames, max_frames] and the total."""
    n = int(total_frames / video_fps * cfg.fps)
    n = min(max(n, cfg.min_frames), cfg.max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(int)  # numpy rounds half to even, as the reference


def group_timestamps(indices, video_fps, temporal_patch_size):
    """Seconds of each temporal group: the mean of the first and last frame time of the group."""
    indices = list(indices)
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)  # padded like the frames
    seconds = [i / video_fps for i in indices]
    T = temporal_patch_size
    return [(seconds[g] + seconds[g + T - 1]) / 2 for g in range(0, len(seconds), T)]


def preprocess_video(path, cfg):
    """-> (pixel rows [t*gh*gw, C*T*P*P] float32, grid (t, gh, gw), seconds of each temporal group)."""
    frames, video_fps = load_video_frames(path)
    if len(frames) < cfg.temporal_patch_size:
        raise ValueError(f"video {path} has {len(frames)} frame(s); at least {cfg.temporal_patch_size} are needed")
    indices = sample_frame_indices(len(frames), video_fps, cfg)
    width, height = frames[0].size
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"video {path}: frame size {width}x{height} has aspect ratio "
                         f"{max(width, height) / min(width, height):.1f} > 200, which Qwen3-VL cannot take")
    h, w = smart_resize_video(len(indices), height, width, cfg.temporal_patch_size,
                              cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)
    # The reference video processor resizes with torchvision (antialiased bicubic); we use PIL bicubic like the
    # image path, so video pixels can differ from transformers' by small amounts.
    kept = [normalize_image(frames[i].resize((w, h), resample=Image.BICUBIC), cfg) for i in indices]
    pixels, grid = patchify(torch.from_numpy(np.stack(kept)), cfg)  # from [F, C, h, w]
    return pixels, grid, group_timestamps(indices, video_fps, cfg.temporal_patch_size)


# ----------------------------------------------------------------------------------------------------------------
# Qwen3-VL chat prompt

def _content_parts(message, i):
    content = message.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image", "video") or kind not in part or kind == "text" and not isinstance(
                part["text"], str):
            raise ValueError(f"messages[{i}].content[{j}] must be {{'type': 'text'|'image'|'video', <type>: ...}}, "
                             f"got {part!r:.80}")
    return list(content)


def render_qwen_chat(messages, add_generation_prompt=True, expand=None):
    """The Qwen3-VL Instruct chat template (no tools, no vision ids) written out in Python.

    Equal to rendering the official Jinja template with trim_blocks/lstrip_blocks: an optional leading system
    turn, then `<|im_start|>role\\n ... <|im_end|>\\n` per turn, each image as
    `<|vision_start|><|image_pad|><|vision_end|>` and each video as `<|vision_start|><|video_pad|><|vision_end|>`
    in the order given; there is no default system prompt. `expand(part, i, j)`, if given, returns the text
    that replaces image/video part j of message i (the processor's pad expansion).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message is only allowed as the first message")
        parts = _content_parts(message, i)
        if role != "user" and any(p["type"] != "text" for p in parts):
            raise ValueError(f"messages[{i}]: images and videos are only allowed in user messages")
        out.append(f"<|im_start|>{role}\n")
        for j, part in enumerate(parts):
            if part["type"] == "text":
                out.append(part["text"])
            elif expand is not None:
                out.append(expand(part, i, j))
            elif part["type"] == "image":
                out.append("<|vision_start|><|image_pad|><|vision_end|>")
            else:
                out.append("<|vision_start|><|video_pad|><|vision_end|>")
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Processor

def _find_chat_template(model_dir):
    """(path, template text) of the first chat template found in the places checkpoints keep it, or (None, None)."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return path, f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            template = _read_json(path).get("chat_template")
            if isinstance(template, str):
                return path, template
    return None, None


def read_tokenizer_json(model_dir):
    """(tokenizer, path of tokenizer.json, ids of its special tokens) of a checkpoint folder, or one line naming
    what is missing or malformed."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"tokenizer.json not found in {model_dir}")
    try:
        tokenizer = Tokenizer.from_file(tok_path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"cannot load {tok_path}: {e}") from None
    return tokenizer, tok_path, {t["id"] for t in _read_json(tok_path).get("added_tokens") or [] if t.get("special")}


class QwenProcessor:
    """Chat messages (+ images, video) -> input_ids and pixel tensors for Qwen3-VL-MoE."""

    def __init__(self, tokenizer, *, image_token_id, video_token_id, pad_token_id, stop_token_ids, special_ids,
                 image_cfg=None, video_cfg=None):
        self.tokenizer = tokenizer
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.pad_token_id = pad_token_id
        self.stop_token_ids = list(stop_token_ids)
        self.special_ids = sorted(special_ids)
        self.image_cfg = image_cfg or VisionPreprocessConfig()
        self.video_cfg = video_cfg or VisionPreprocessConfig.video_defaults()

    @classmethod
    def from_dir(cls, model_dir):
        """Reads tokenizer.json, tokenizer_config.json, config.json and, when present, generation_config.json,
        preprocessor_config.json, video_preprocessor_config.json and the chat template of a checkpoint folder."""
        tokenizer, tok_path, special_ids = read_tokenizer_json(model_dir)

        def token_id(token, needed_for):
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ValueError(f"{tok_path} has no token {token} (needed for {needed_for})")
            return tid

        # The prompt is built from the literal Qwen token strings, so the config's ids must name exactly those.
        cfg_path = os.path.join(model_dir, "config.json")
        config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                           ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
            tid = token_id(token, key)
            if config.get(key) is not None and config[key] != tid:
                raise ValueError(f"{cfg_path}: {key}={config[key]} but {tok_path} has {token} at id {tid}")
            if tid not in special_ids:
                raise ValueError(f"{tok_path}: {token} (id {tid}) is not marked special")

        tok_cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        tok_cfg = _read_json(tok_cfg_path) if os.path.isfile(tok_cfg_path) else {}
        pad = tok_cfg.get("pad_token") or "<|endoftext|>"
        pad = pad["content"] if isinstance(pad, dict) else pad

        # stop on the model's eos (config, generation_config) and on both turn and document ends
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen_cfg = _read_json(gen_path) if os.path.isfile(gen_path) else {}
        text_cfg = config.get("text_config") or {}
        stop = _as_list(text_cfg.get("eos_token_id", config.get("eos_token_id")))
        stop += _as_list(gen_cfg.get("eos_token_id"))
        stop += [token_id("<|im_end|>", "stop ids"), token_id("<|endoftext|>", "stop ids")]

        # pixel settings: preprocessor files win, then the vision tower's config, then Qwen3-VL's values
        image_cfg, video_cfg = VisionPreprocessConfig(), VisionPreprocessConfig.video_defaults()
        vision = config.get("vision_config") or {}
        for c in (image_cfg, video_cfg):
            c.update_from_json({"patch_size": vision.get("patch_size"), "merge_size": vision.get("spatial_merge_size"),
                                "temporal_patch_size": vision.get("temporal_patch_size")}, cfg_path)
        for name, c in (("preprocessor_config.json", image_cfg), ("video_preprocessor_config.json", video_cfg)):
            path = os.path.join(model_dir, name)
            if os.path.isfile(path):
                c.update_from_json(_read_json(path), path)
                c.check_agrees(vision, path, cfg_path)

        template_path, template = _find_chat_template(model_dir)
        if template is not None and hashlib.sha256(template.encode()).hexdigest() != QWEN3_VL_INSTRUCT_TEMPLATE_SHA256:
            warnings.warn(f"{template_path}: chat template differs from the Qwen3-VL Instruct template; prompts are "
                          f"still built in the Instruct format", stacklevel=2)
        return cls(tokenizer, image_token_id=token_id("<|image_pad|>", "images"),
                   video_token_id=token_id("<|video_pad|>", "videos"), pad_token_id=token_id(pad, "pad_token"),
                   stop_token_ids=list(dict.fromkeys(int(s) for s in stop)), special_ids=special_ids,
                   image_cfg=image_cfg, video_cfg=video_cfg)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, messages, add_generation_prompt=True):
        """-> dict: input_ids [S] int64, mm_token_type_ids [S] (1 image pad, 2 video pad),
        pixel_values [N, C*T*P*P] float32 / image_grid_thw [n, 3] (or None), pixel_values_videos /
        video_grid_thw (or None), prompt (chat text before pad expansion) and text (after)."""
        images, videos = [], []

        def expand(part, i, j):
            if part["type"] == "image":
                src = part["image"]
                if isinstance(src, (str, os.PathLike)):
                    name, image = os.fspath(src), open_image(os.fspath(src))
                elif isinstance(src, Image.Image):
                    name, image = f"messages[{i}].content[{j}] (PIL image)", to_rgb(src)
                else:
                    raise ValueError(f"messages[{i}].content[{j}].image must be a path or a PIL image, "
                                     f"got {type(src).__name__}")
                pixels, (t, gh, gw) = preprocess_image(image, self.image_cfg, name)
                images.append((pixels, (t, gh, gw)))
                n = t * gh * gw // self.image_cfg.merge_size ** 2  # one token per merged 2x2 block
                return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
            if not isinstance(part["video"], (str, os.PathLike)):
                raise ValueError(f"messages[{i}].content[{j}].video must be a path, got {type(part['video']).__name__}")
            pixels, (t, gh, gw), seconds = preprocess_video(os.fspath(part["video"]), self.video_cfg)
            videos.append((pixels, (t, gh, gw)))
            n = gh * gw // self.video_cfg.merge_size ** 2
            # each temporal group is its own vision block, preceded by its time as plain text
            return "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>"
                           for s in seconds)

        prompt = render_qwen_chat(messages, add_generation_prompt)  # also validates the messages
        for i, message in enumerate(messages):
            for j, part in enumerate(_content_parts(message, i)):
                # a pad typed as text would get no pixels and break the pad/feature count of the model
                if part["type"] == "text" and ("<|image_pad|>" in part["text"] or "<|video_pad|>" in part["text"]):
                    raise ValueError(f"messages[{i}].content[{j}]: text contains a literal <|image_pad|> or "
                                     f"<|video_pad|>; pass images and videos as parts instead")
        text = render_qwen_chat(messages, add_generation_prompt, expand=expand)
        input_ids = torch.tensor(self.encode(text), dtype=torch.long)
        mm_token_type_ids = (input_ids == self.image_token_id).long() + 2 * (input_ids == self.video_token_id).long()
        return {
            "input_ids": input_ids,
            "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": torch.cat([p for p, _ in images]) if images else None,
            "image_grid_thw": torch.tensor([g for _, g in images], dtype=torch.long) if images else None,
            "pixel_values_videos": torch.cat([p for p, _ in videos]) if videos else None,
            "video_grid_thw": torch.tensor([g for _, g in videos], dtype=torch.long) if videos else None,
            "prompt": prompt,
            "text": text,
        }

    def from_cli(self, prompt, images=(), video=None, system=None):
        """One user turn: the images first, then the video, then the text (plus an optional system turn)."""
        content = [{"type": "image", "image": path} for path in images]
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "system", "content": system}] if system is not None else []
        return self(messages + [{"role": "user", "content": content}])


# ---------------------------------------------------------------------------------------------------------------
# Kimi-VL: MoonViT preprocessing and the Instruct prompt (its tokenizer: kimi_tokenizer.py)

MEDIA_PAD = "<|media_pad|>"
IMAGE_BLOCK = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant"
ROLE_TOKENS = {"system": "<|im_system|>", "user": "<|im_user|>", "assistant": "<|im_assistant|>"}


def read_json_if_present(path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------------------
# Images and video


@dataclass
class KimiImageConfig:
    """preprocessor_config.json; the defaults are the released Kimi-VL-A3B-Instruct values."""
    in_token_limit: int = 4096  # patch budget before the resize (16384 for Thinking-2506)
    patch_size: int = 14
    merge_kernel_size: tuple = (2, 2)
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    pad_input: bool = True

    @classmethod
    def from_file(cls, path):
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: cannot read preprocessor config ({e})") from None

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1
        for key in ("in_token_limit", "patch_size"):
            if not integer(getattr(cfg, key)):
                raise ValueError(f"{path}: {key} must be an integer >= 1, got {getattr(cfg, key)!r}")
        if len(cfg.merge_kernel_size) != 2 or not all(integer(v) for v in cfg.merge_kernel_size):
            raise ValueError(f"{path}: merge_kernel_size must be 2 integers >= 1, got {list(cfg.merge_kernel_size)}")
        for key in ("image_mean", "image_std"):
            v = getattr(cfg, key)
            if len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                      and (x > 0 or key == "image_mean") for x in v):
                raise ValueError(f"{path}: {key} must be 3 finite numbers{' > 0' if key == 'image_std' else ''}, "
                                 f"got {list(v)}")
        return cfg

    def check_agrees(self, vision, path, cfg_path):
        """Patches and merge windows are config.json's vision tower's (see VisionPreprocessConfig.check_agrees)."""
        for key in ("patch_size", "merge_kernel_size"):
            want = vision.get(key)
            if want is not None and getattr(self, key) != (tuple(want) if isinstance(want, list) else want):
                raise ValueError(f"{path}: {key} {getattr(self, key)} disagrees with {cfg_path}'s "
                                 f"vision_config.{key} {want}")


def kimi_image_size(width: int, height: int, cfg: KimiImageConfig):
    """(resized w, h), (final w, h) in pixels for an input of width x height, per KimiVLImageProcessor.rescale."""
    p, (mh, mw) = cfg.patch_size, cfg.merge_kernel_size
    n = (width // p) * (height // p)
    if n > cfg.in_token_limit:
        scale = math.sqrt(cfg.in_token_limit / n)
        width, height = int(width * scale), int(height * scale)
    if cfg.pad_input:  # pad right/bottom to a whole number of merge windows (28 px)
        final = (math.ceil(width / (mw * p)) * mw * p, math.ceil(height / (mh * p)) * mh * p)
    else:  # centre crop to whole merge windows instead
        final = (width - width % (mw * p), height - height % (mh * p))
    return (width, height), final


def kimi_open_image(path) -> Image.Image:
    """Decoded RGB image from a file, with one-line errors that name the file.

    No EXIF rotation and alpha is dropped, not composited: the Kimi-VL model card feeds Image.open(path) to the
    reference processor, which does neither.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        raise ValueError(f"image path is a folder, not a file: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def preprocess_kimi_image(img: Image.Image, cfg: KimiImageConfig, name: str = "image"):
    """PIL image -> pixel_values [h*w, 3, P, P] float32 (patches row-major) and the patch grid (h, w).

    Differs from the reference only for non-RGB inputs: we convert to RGB first, the reference resizes and
    pads in the original mode (RGBA is resized premultiplied, palette padding is index 0).
    """
    img = img.convert("RGB")
    (rw, rh), (fw, fh) = kimi_image_size(img.width, img.height, cfg)
    p = cfg.patch_size
    if fw // p >= 512 or fh // p >= 512:  # the vision RoPE table covers 512x512 patches
        raise ValueError(f"{name}: {img.width}x{img.height} px gives a {fh // p}x{fw // p} patch grid, "
                         f"over 511 per side")
    if fw == 0 or fh == 0:
        raise ValueError(f"{name}: {img.width}x{img.height} px is smaller than one {2 * p} px merge window")
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)  # PIL antialiases when shrinking, as the reference
    if cfg.pad_input:
        canvas = Image.new("RGB", (fw, fh), (0, 0, 0))  # black padding: -1 after normalisation
        canvas.paste(img, (0, 0))
        img = canvas
    else:
        left, top = (rw - fw) // 2, (rh - fh) // 2
        img = img.crop((left, top, left + fw, top + fh))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255  # [3, H, W]
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    gh, gw = fh // p, fw // p
    x = x.view(3, gh, p, gw, p).permute(1, 3, 0, 2, 4)  # [gh, gw, 3, P, P]
    return x.reshape(gh * gw, 3, p, p), (gh, gw)


VIDEO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


def kimi_video_frames(path, max_frames: int = 64, max_side: int = 480) -> list:
    """A video as RGB PIL frames: a folder of frame images (sorted by name) or an animated GIF.

    Kimi-VL has no video tokens: a video is a run of image blocks, one per frame. Like the MoDES evaluation
    wrapper we keep at most 64 frames, sampled uniformly (round(linspace)), and shrink each frame (PIL bicubic,
    aspect kept, sizes truncated as in the reference resize) so its long side is at most 480 px.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in VIDEO_EXTENSIONS)
        if not files:
            raise ValueError(f"video folder has no image files ({', '.join(VIDEO_EXTENSIONS)}): {path}")
        keep = np.linspace(0, len(files) - 1, min(len(files), max_frames)).round().astype(int)
        frames = [kimi_open_image(files[k]) for k in keep]
    else:
        if path.stat().st_size == 0:
            raise ValueError(f"video file is empty (0 bytes): {path}")
        try:
            with Image.open(path) as gif:
                frames = [f.convert("RGB") for f in ImageSequence.Iterator(gif)]
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read video {path}: {e}") from None
        keep = np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int)
        frames = [frames[k] for k in keep]
    out = []
    for img in frames:
        scale = max_side / max(img.size)
        if scale < 1:
            size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC)
        out.append(img)
    return out


# ----------------------------------------------------------------------------------------------------------
# Chat prompt and the processor


def is_image_part(part: dict) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part  # the template's own test


def format_kimi_chat(messages: list, add_generation_prompt: bool = True) -> str:
    """The Instruct chat template written out: default system turn if none, then per turn
    <role token>role<|im_middle|>content<|im_end|>; content parts are joined with no separator and each
    image part becomes one IMAGE_BLOCK (a video part one block per frame, see KimiProcessor)."""
    if not messages:
        raise ValueError("messages is empty")
    out = []
    if not isinstance(messages[0], dict) or messages[0].get("role") != "system":
        out.append(f"<|im_system|>system<|im_middle|>{DEFAULT_SYSTEM}<|im_end|>")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}]: a message must be a dict, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLE_TOKENS:
            raise ValueError(f"messages[{i}]: role must be system, user or assistant, got {role!r}")
        out.append(f"{ROLE_TOKENS[role]}{role}<|im_middle|>")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise ValueError(f"messages[{i}].content[{j}]: a part must be a dict, got {type(part).__name__}")
                if is_image_part(part):
                    out.append(IMAGE_BLOCK)
                elif isinstance(part.get("text"), str):
                    out.append(part["text"])
                else:
                    raise ValueError(f"messages[{i}].content[{j}]: part needs a 'text' string or an 'image', "
                                     f"got keys {sorted(part)}")
        else:
            raise ValueError(f"messages[{i}]: content must be a string or a list of parts")
        out.append("<|im_end|>")
    if add_generation_prompt:
        out.append("<|im_assistant|>assistant<|im_middle|>")
    return "".join(out)


class KimiProcessor:
    """Chat messages (+ images, video frames) -> input_ids and pixel tensors for Kimi-VL."""

    def __init__(self, tokenizer: KimiTokenizer, *, image_token_id: int, pad_token_id: int, stop_token_ids: list,
                 image_cfg: KimiImageConfig = None):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id  # <|media_pad|>, for images and video frames alike
        self.pad_token_id = pad_token_id
        self.stop_token_ids = list(stop_token_ids)
        self.special_ids = sorted(tokenizer.special_ids)
        self.image_cfg = image_cfg or KimiImageConfig()

    @classmethod
    def from_dir(cls, model_dir):
        """Reads tiktoken.model, tokenizer_config.json and, when present, config.json, generation_config.json and
        preprocessor_config.json (else the released Instruct values) of a checkpoint folder."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder not found: {model_dir}")
        tokenizer = load_kimi_tokenizer(model_dir)
        config, tok_cfg, gen_cfg = (read_json_if_present(model_dir / name) for name in
                                    ("config.json", "tokenizer_config.json", "generation_config.json"))
        image_token_id = tokenizer.token_to_id(MEDIA_PAD)
        # the prompt is built from the literal token strings, so the config's id must name exactly that one
        if config.get("media_placeholder_token_id", image_token_id) != image_token_id:
            raise ValueError(f"{model_dir / 'config.json'}: media_placeholder_token_id "
                             f"{config['media_placeholder_token_id']} but the tokenizer has {MEDIA_PAD} "
                             f"at {image_token_id}")
        pad, eos = tok_cfg.get("pad_token", "[PAD]"), tok_cfg.get("eos_token", "[EOS]")
        pad = pad["content"] if isinstance(pad, dict) else pad  # some configs store serialised AddedTokens
        eos = eos["content"] if isinstance(eos, dict) else eos
        # stop on the turn end, the tokenizer's eos and any eos the configs name
        stop = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id(eos)]
        text_cfg = config.get("text_config") or {}
        for e in (text_cfg.get("eos_token_id", config.get("eos_token_id")), gen_cfg.get("eos_token_id")):
            if e is not None:
                stop += e if isinstance(e, list) else [e]
        pre_path = model_dir / "preprocessor_config.json"
        image_cfg = KimiImageConfig.from_file(pre_path) if pre_path.is_file() else KimiImageConfig()
        if pre_path.is_file():
            image_cfg.check_agrees(config.get("vision_config") or {}, pre_path, model_dir / "config.json")
        return cls(tokenizer, image_token_id=image_token_id, pad_token_id=tokenizer.token_to_id(pad),
                   stop_token_ids=list(dict.fromkeys(int(i) for i in stop)), image_cfg=image_cfg)

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text)

    def __call__(self, messages: list, add_generation_prompt: bool = True) -> dict:
        """-> dict: input_ids [S] int64, pixel_values [sum h*w, 3, 14, 14] float32 and
        image_grid_hws [n, 2] int64 (or None), prompt (chat text before pad expansion) and text (after).

        Images and video frames are taken in prompt order; the i-th <|media_pad|> becomes h*w/4 copies for
        the i-th image (one per merged 2x2 patch group), as the reference processor does on the text.
        """
        messages = self._videos_as_frames(messages)
        prompt = format_kimi_chat(messages, add_generation_prompt)  # also validates roles and parts
        pixel_values, grids = [], []
        for i, message in enumerate(messages):
            content = message["content"]
            for j, part in enumerate([{"text": content}] if isinstance(content, str) else content):
                if not is_image_part(part):
                    # a pad typed as text would get no pixels and break the pad/feature count of the model
                    if MEDIA_PAD in part["text"]:
                        raise ValueError(f"messages[{i}].content[{j}]: text contains a literal {MEDIA_PAD}; "
                                         f"pass images as parts instead")
                    continue
                src = part.get("image", part.get("image_url"))
                if isinstance(src, Image.Image):
                    name, image = part.get("name", f"messages[{i}].content[{j}] (PIL image)"), src.convert("RGB")
                elif isinstance(src, (str, os.PathLike)):
                    name, image = os.fspath(src), kimi_open_image(src)
                else:
                    raise ValueError(f"messages[{i}].content[{j}]: image must be a path or a PIL image, "
                                     f"got {type(src).__name__}")
                patches, grid = preprocess_kimi_image(image, self.image_cfg, name)
                pixel_values.append(patches)
                grids.append(grid)
        mh, mw = self.image_cfg.merge_kernel_size
        pieces = prompt.split(MEDIA_PAD)
        counts = [gh * gw // (mh * mw) for gh, gw in grids]
        text = pieces[0] + "".join(MEDIA_PAD * n + piece for n, piece in zip(counts, pieces[1:]))
        input_ids = torch.tensor(self.encode(text), dtype=torch.int64)
        return {
            "input_ids": input_ids,
            "pixel_values": torch.cat(pixel_values) if grids else None,
            "image_grid_hws": torch.tensor(grids, dtype=torch.int64) if grids else None,
            "prompt": prompt,
            "text": text,
        }

    @staticmethod
    def _videos_as_frames(messages: list) -> list:
        """Replace each video part by one image part per sampled frame."""
        out = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                parts = []
                for part in content:
                    if isinstance(part, dict) and (part.get("type") == "video" or "video" in part):
                        frames = kimi_video_frames(part["video"])
                        parts += [{"type": "image", "image": f, "name": f"{part['video']} frame {k}"}
                                  for k, f in enumerate(frames)]
                    else:
                        parts.append(part)
                message = {**message, "content": parts}
            out.append(message)
        return out

    def from_cli(self, prompt: str, images=(), video=None, system=None) -> dict:
        """One user turn: the images first, then the video frames, then the text."""
        content = [{"type": "image", "image": str(p)} for p in images]
        if video is not None:
            content.append({"type": "video", "video": str(video)})
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "system", "content": system}] if system is not None else []
        return self(messages + [{"role": "user", "content": content}])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# ---------------------------------------------------------------------------------------------------------------
# InternVL-3.5 (OpenGVLab/InternVL3_5-30B-A3B-HF): dynamic tiling, the ChatML prompt with <img> blocks, video frames

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class InternVLImageConfig:
    """The -HF preprocessor_config.json (GotOcr2ImageProcessor) values of InternVL-3.5; the class defaults of
    transformers' image and video processors (CLIP statistics, 384 px) are not InternVL's and never used."""
    tile: int = 448  # size.height == size.width: the vision tower's image_size
    min_tiles: int = 1  # min_patches
    max_tiles: int = 12  # max_patches: a 4:3 photo becomes 4 x 3 tiles + a thumbnail (3,330 tokens)
    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD
    rescale_factor: float = 1 / 255
    num_frames: int = 32  # video: frames sampled per video (lmms-eval's InternVL setting)

    @classmethod
    def from_file(cls, path):
        d, cfg = _read_json(path), cls()
        size = d.get("size") or {}
        if size.get("height", cfg.tile) != size.get("width", cfg.tile):
            raise ValueError(f"{path}: size {size} must be square (InternVL tiles are)")
        values = {"tile": size.get("height"), "min_tiles": d.get("min_patches"), "max_tiles": d.get("max_patches"),
                  "rescale_factor": d.get("rescale_factor"), "num_frames": d.get("num_frames")}
        for key, value in values.items():
            if value is not None:
                if not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"{path}: {key} must be a positive number, got {value!r}")
                setattr(cfg, key, value if key == "rescale_factor" else int(value))
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                value = _as_list(d[key])
                if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                    raise ValueError(f"{path}: {key} must be 3 numbers, got {value}")
                setattr(cfg, key, tuple(float(v) for v in value))
        if cfg.min_tiles > cfg.max_tiles:
            raise ValueError(f"{path}: min_patches {cfg.min_tiles} > max_patches {cfg.max_tiles}")
        return cfg


def tile_grid(width, height, tile, min_tiles, max_tiles):
    """(columns, rows) of the tiling whose aspect ratio is closest to the image's, among the grids of min_tiles ..
    max_tiles tiles sorted by tile count. On an exact tie the larger grid wins only while the image's area exceeds
    half the grid's (GotOcr2's get_optimal_tiled_canvas, InternVL's dynamic_preprocess)."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(width / height - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def internvl_tiles(image, cfg, max_tiles=None):
    """RGB PIL image -> tiles [n, 3, tile, tile] float32: the image resized (PIL bicubic) to its grid and cut
    row-major, then, when there is more than one tile, the whole image resized to one tile as a thumbnail, last.
    max_tiles caps cfg.max_tiles (1: the thumbnail alone, as transformers does without tiling)."""
    cap = min(cfg.max_tiles, max_tiles or cfg.max_tiles)
    t = cfg.tile
    if cap == 1:
        tiles = [image.resize((t, t), resample=Image.BICUBIC)]
    else:
        cols, rows = tile_grid(image.width, image.height, t, min(cfg.min_tiles, cap), cap)
        canvas = image.resize((t * cols, t * rows), resample=Image.BICUBIC)
        tiles = [canvas.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
        if len(tiles) > 1:
            tiles.append(image.resize((t, t), resample=Image.BICUBIC))
    return torch.from_numpy(np.stack([normalize_image(tile, cfg) for tile in tiles]))


def internvl_frames(frames, cfg):
    """RGB PIL frames -> tiles [n, 3, tile, tile] float32, each frame squashed to one tile. transformers' video
    processor resizes uint8 tensors with torchvision, which on the CPU is torch's antialiased bicubic; PIL's
    bicubic (the image path) differs from it by a level or two on about 1% of the pixels."""
    x = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).contiguous()  # [n, 3, h, w]
    x = torch.nn.functional.interpolate(x, size=(cfg.tile, cfg.tile), mode="bicubic", align_corners=False,
                                        antialias=True)  # uint8 in, uint8 out (rounded and clamped)
    return torch.from_numpy(np.stack([normalize_image(f.permute(1, 2, 0).numpy(), cfg) for f in x]))  # [n, 3, t, t]


def video_frame_indices(total, num_frames):
    """Uniform sampling with a half-interval initial shift (transformers' InternVLVideoProcessor.sample_frames);
    a video of at most num_frames frames keeps them all."""
    if total <= num_frames:
        return list(range(total))
    return torch.arange(total / num_frames / 2, total, total / num_frames).int().tolist()


# chat style -> (answer prefix, end of turn) of a teacher-forced answer after the generation prompt
CHAT_STYLES = {"chatml": ("", "<|im_end|>"), "harmony": ("<|channel|>final<|message|>", "<|return|>")}

# the system message of InternVL's `internvl3_5_gpt_oss` conversation template (the GPT-OSS variant's default)
INTERNVL_GPT_OSS_SYSTEM = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\n"
                           "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-06\n\nReasoning: low\n\n"
                           "# Valid channels: final. Channel must be included for every message.")


def chat_style(template):
    """'chatml', 'harmony' or None (no template, or one of neither kind) from a chat template's text."""
    if template is None:
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start|>" in template and "<|message|>" in template:
        return "harmony"
    return None


def render_harmony_chat(messages, add_generation_prompt=True, expand=None):
    """The GPT-OSS variant's harmony-style template (configs/internvl3_5_gpt_oss_chat_template.jinja) written out:
    `<|start|>system<|message|>{system}<|end|>` (the first message's text, else InternVL's default system
    message), then `<|start|>user<|message|>...<|end|>` per user turn and
    `<|start|>assistant<|channel|>final<|message|>...<|end|>` per earlier answer; the generation prompt is
    `<|start|>assistant`. Image / video parts as in render_qwen_chat (`expand(part, i, j)` or the
    `<IMG_CONTEXT>\\n` / `<video>\\n` placeholders)."""
    render_qwen_chat(messages, add_generation_prompt)  # the same validation
    system, first = INTERNVL_GPT_OSS_SYSTEM, 0
    if messages[0]["role"] == "system":
        system, first = "".join(p["text"] for p in _content_parts(messages[0], 0)), 1
    out = [f"<|start|>system<|message|>{system}<|end|>"]
    for i in range(first, len(messages)):
        role = messages[i]["role"]
        out.append("<|start|>assistant<|channel|>final<|message|>" if role == "assistant"
                   else f"<|start|>{role}<|message|>")
        for j, part in enumerate(_content_parts(messages[i], i)):
            if part["type"] == "text":
                out.append(part["text"])
            elif expand is not None:
                out.append(expand(part, i, j))
            else:
                out.append("<IMG_CONTEXT>\n" if part["type"] == "image" else "<video>\n")
        out.append("<|end|>")
    if add_generation_prompt:
        out.append("<|start|>assistant")
    return "".join(out)


class InternVLProcessor:
    """Chat messages (+ images, video) -> input_ids and tiles for InternVL-3.5 (Qwen3 or GPT-OSS decoder).

    The prompt is the folder's chat template written out, in the style the template has: ChatML
    (`render_qwen_chat`, no default system prompt; the Qwen3 variant) or harmony (`render_harmony_chat`, when the
    template has `<|start|>` / `<|message|>` and no `<|im_start|>`; the GPT-OSS variant). Each image part is
    `<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>` and a newline, each video part
    `Frame1: <img>...</img>\\nFrame2: ...` (one 448 px tile per frame) and a newline.

    answer_prefix / end_of_turn: what a teacher-forced answer is wrapped in after the generation prompt (ChatML:
    nothing / `<|im_end|>`; harmony: `<|channel|>final<|message|>` / `<|return|>`)."""

    def __init__(self, tokenizer, *, image_token_id, pad_token_id, stop_token_ids, special_ids, tokens_per_tile,
                 image_cfg=None, video_cfg=None, max_tiles=None, style="chatml"):
        if style not in CHAT_STYLES:
            raise ValueError(f"chat style must be one of {', '.join(CHAT_STYLES)}, got {style!r}")
        self.style = style
        self.answer_prefix, self.end_of_turn = CHAT_STYLES[style]
        self.tokenizer = tokenizer
        self.image_token_id, self.pad_token_id = image_token_id, pad_token_id
        self.stop_token_ids = list(stop_token_ids)
        self.special_ids = sorted(special_ids)
        self.tokens_per_tile = tokens_per_tile
        self.image_cfg = image_cfg or InternVLImageConfig()
        self.video_cfg = video_cfg or self.image_cfg  # frames: the tile side, statistics and frame count
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        self.max_tiles = max_tiles  # a cap below the folder's max_patches: a 4:3 photo is 13 tiles at 12

    @classmethod
    def from_dir(cls, model_dir, max_tiles=None):
        """Reads tokenizer.json, tokenizer_config.json, config.json and, when present, generation_config.json,
        preprocessor_config.json, video_preprocessor_config.json and the chat template of an -HF checkpoint folder."""
        tokenizer, tok_path, special_ids = read_tokenizer_json(model_dir)

        def token_id(token, needed_for):
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ValueError(f"{tok_path} has no token {token} (needed for {needed_for})")
            return tid

        cfg_path = os.path.join(model_dir, "config.json")
        config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        image_token_id = token_id("<IMG_CONTEXT>", "images")
        token_id("<img>", "images"), token_id("</img>", "images")
        # the prompt is built from the literal token strings, so the config's id must name exactly that one
        if config.get("image_token_id", image_token_id) != image_token_id:
            raise ValueError(f"{cfg_path}: image_token_id={config['image_token_id']} but {tok_path} has "
                             f"<IMG_CONTEXT> at id {image_token_id}")
        tok_cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        tok_cfg = _read_json(tok_cfg_path) if os.path.isfile(tok_cfg_path) else {}
        pad = tok_cfg.get("pad_token") or "<|endoftext|>"
        pad = pad["content"] if isinstance(pad, dict) else pad
        gen_path = os.path.join(model_dir, "generation_config.json")
        gen_cfg = _read_json(gen_path) if os.path.isfile(gen_path) else {}
        text_cfg = config.get("text_config") or {}
        stop = _as_list(text_cfg.get("eos_token_id", config.get("eos_token_id")))
        stop += _as_list(gen_cfg.get("eos_token_id"))
        template_path, template = _find_chat_template(model_dir)
        style = chat_style(template)
        if template is not None and style is None:
            warnings.warn(f"{template_path}: neither a ChatML nor a harmony chat template; prompts are built in "
                          f"ChatML, the template of InternVL-3.5's Qwen3 decoder", stacklevel=2)
        style = style or "chatml"
        if style == "harmony":  # gpt-oss's generation_config stops: <|return|>, <|endoftext|>, <|call|>
            stop += [token_id(t, "stop ids") for t in ("<|return|>", "<|endoftext|>", "<|call|>")]
            for t in ("<|start|>", "<|message|>", "<|end|>", "<|channel|>"):
                token_id(t, "the harmony chat template")
        else:  # a gpt-oss vocabulary has no ChatML tokens unless the -HF conversion added them
            token_id("<|im_start|>", "the ChatML chat template")
            stop += [token_id("<|im_end|>", "stop ids"), token_id("<|endoftext|>", "stop ids")]
        pre_path = os.path.join(model_dir, "preprocessor_config.json")
        image_cfg = InternVLImageConfig.from_file(pre_path) if os.path.isfile(pre_path) else InternVLImageConfig()
        # transformers reads a video's settings from their own file first, then from the image processor's
        vid_path = os.path.join(model_dir, "video_preprocessor_config.json")
        video_cfg = InternVLImageConfig.from_file(vid_path) if os.path.isfile(vid_path) else image_cfg
        return cls(tokenizer, image_token_id=image_token_id, pad_token_id=token_id(pad, "pad_token"),
                   stop_token_ids=list(dict.fromkeys(int(s) for s in stop)), special_ids=special_ids,
                   tokens_per_tile=config.get("image_seq_length", 256), image_cfg=image_cfg, video_cfg=video_cfg,
                   max_tiles=max_tiles, style=style)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        """Text of ids; with skip_special_tokens a harmony reply keeps only its last message (what follows the
        last `<|message|>`: the channel name and any earlier analysis message are headers, not the answer)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens and self.style == "harmony":
            message = self.tokenizer.token_to_id("<|message|>")
            if message in ids:
                ids = ids[len(ids) - ids[::-1].index(message):]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages, add_generation_prompt, expand):
        if self.style == "harmony":
            return render_harmony_chat(messages, add_generation_prompt, expand=expand)
        return render_qwen_chat(messages, add_generation_prompt, expand=expand)

    def image_block(self, n_tiles):
        return "<img>" + "<IMG_CONTEXT>" * (self.tokens_per_tile * n_tiles) + "</img>"

    def __call__(self, messages, add_generation_prompt=True):
        """-> dict: input_ids [S] int64, pixel_values [n_tiles, 3, 448, 448] float32 (or None: every image's tiles
        and every video's frames in prompt order), prompt (chat text with one placeholder per image or video, as
        transformers' template renders it) and text (after expansion)."""
        tiles = []

        def placeholder(part, i, j):
            return "<IMG_CONTEXT>\n" if part["type"] == "image" else "<video>\n"

        def expand(part, i, j):
            if part["type"] == "image":
                src = part["image"]
                if isinstance(src, (str, os.PathLike)):
                    image = open_image(os.fspath(src))
                elif isinstance(src, Image.Image):
                    image = to_rgb(src)
                else:
                    raise ValueError(f"messages[{i}].content[{j}].image must be a path or a PIL image, "
                                     f"got {type(src).__name__}")
                tiles.append(internvl_tiles(image, self.image_cfg, self.max_tiles))
                return self.image_block(len(tiles[-1])) + "\n"
            if not isinstance(part["video"], (str, os.PathLike)):
                raise ValueError(f"messages[{i}].content[{j}].video must be a path, got {type(part['video']).__name__}")
            frames, _ = load_video_frames(os.fspath(part["video"]))
            keep = video_frame_indices(len(frames), self.video_cfg.num_frames)
            tiles.append(internvl_frames([frames[k] for k in keep], self.video_cfg))
            return "\n".join(f"Frame{k + 1}: " + self.image_block(1) for k in range(len(keep))) + "\n"

        prompt = self.render(messages, add_generation_prompt, expand=placeholder)  # also validates them
        for i, message in enumerate(messages):
            for j, part in enumerate(_content_parts(message, i)):
                # a context token typed as text would get no pixels and break the token/feature count
                if part["type"] == "text" and "<IMG_CONTEXT>" in part["text"]:
                    raise ValueError(f"messages[{i}].content[{j}]: text contains a literal <IMG_CONTEXT>; pass "
                                     f"images and videos as parts instead")
        text = self.render(messages, add_generation_prompt, expand=expand)
        return {"input_ids": torch.tensor(self.encode(text), dtype=torch.long),
                "pixel_values": torch.cat(tiles) if tiles else None, "prompt": prompt, "text": text}

    def from_cli(self, prompt, images=(), video=None, system=None):
        """One user turn: the images first, then the video, then the text (plus an optional system turn)."""
        content = [{"type": "image", "image": path} for path in images]
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "system", "content": system}] if system is not None else []
        return self(messages + [{"role": "user", "content": content}])


def special_token_ids(path):
    """Ids of the tokens marked special in a checkpoint folder's tokenizer files (tokenizer.json, else
    tokenizer_config.json's added_tokens_decoder), read without building a tokenizer."""
    tok, tok_cfg = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
    try:
        if os.path.isfile(tok):
            return sorted(t["id"] for t in _read_json(tok).get("added_tokens", []) if t.get("special"))
        if os.path.isfile(tok_cfg):
            added = _read_json(tok_cfg).get("added_tokens_decoder", {})
            return sorted(int(i) for i, t in added.items() if t.get("special"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable special tokens in its tokenizer files ({e})") from None
    return []


def for_model(path, model_type, max_tiles=None):
    """The processor of the checkpoint folder `path`, by its config's model_type. max_tiles: InternVL's cap on the
    tiles of one image (default: the folder's max_patches)."""
    kinds = {"qwen3_vl_moe": QwenProcessor, "kimi_vl": KimiProcessor, "internvl": InternVLProcessor}
    if model_type not in kinds:
        raise ValueError(f"{path}: no processor for model_type {model_type!r}")
    if model_type == "internvl":
        return InternVLProcessor.from_dir(path, max_tiles)
    if max_tiles is not None:
        raise ValueError(f"{path}: max_tiles applies to InternVL only, not {model_type}")
    return kinds[model_type].from_dir(path)
