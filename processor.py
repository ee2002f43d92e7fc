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
- `write_tiny_tokenizer(dir)`: a small byte-level BPE carrying the real Qwen special tokens at their real ids,
  for tiny test checkpoints

Usage:
    proc = QwenProcessor.from_dir("Qwen3-VL-30B-A3B-Instruct")
    batch = proc.from_cli("What is in this image?", images=["cat.png"])
    batch["input_ids"], batch["modality"], batch["pixel_values"], batch["image_grid_thw"]
"""

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Token modality codes shared by the whole project (router, calibration, statistics).
TEXT, VISION, SPECIAL = 0, 1, 2

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
            try:
                setattr(self, key, float(value) if key in ("rescale_factor", "fps") else int(value))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {key} must be a number, got {value!r}") from None
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                value = _as_list(d[key])
                if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                    raise ValueError(f"{path}: {key} must be 3 numbers, got {value}")
                setattr(self, key, tuple(float(v) for v in value))
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"{path}: size.shortest_edge {self.min_pixels} > size.longest_edge {self.max_pixels}")


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
    """RGB PIL image -> float32 [C, H, W], bit-identical to transformers' rescale (fp64) then normalise (fp32)."""
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


class QwenProcessor:
    """Chat messages (+ images, video) -> input_ids, modality codes and pixel tensors for Qwen3-VL-MoE."""

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
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model folder not found: {model_dir}")
        tok_path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"tokenizer.json not found in {model_dir}")
        try:
            tokenizer = Tokenizer.from_file(tok_path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"cannot load {tok_path}: {e}") from None
        added = _read_json(tok_path).get("added_tokens") or []
        special_ids = {t["id"] for t in added if t.get("special")}

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

        template_path, template = _find_chat_template(model_dir)
        if template is not None and hashlib.sha256(template.encode()).hexdigest() != QWEN3_VL_INSTRUCT_TEMPLATE_SHA256:
            warnings.warn(f"{template_path}: chat template differs from the Qwen3-VL Instruct template; prompts are "
                          f"still built in the Instruct format", stacklevel=2)
        return cls(tokenizer, image_token_id=token_id("<|image_pad|>", "images"),
                   video_token_id=token_id("<|video_pad|>", "videos"), pad_token_id=token_id(pad, "pad_token"),
                   stop_token_ids=list(dict.fromkeys(int(s) for s in stop)), special_ids=special_ids,
                   image_cfg=image_cfg, video_cfg=video_cfg)

    def modality_of(self, input_ids):
        """TEXT / VISION (image and video pads) / SPECIAL (other special tokens) per token, same shape as input."""
        input_ids = torch.as_tensor(input_ids)
        modality = torch.full_like(input_ids, TEXT, dtype=torch.long)
        special = torch.tensor(self.special_ids, dtype=input_ids.dtype, device=input_ids.device)
        modality[torch.isin(input_ids, special)] = SPECIAL
        modality[(input_ids == self.image_token_id) | (input_ids == self.video_token_id)] = VISION
        return modality

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, messages, add_generation_prompt=True):
        """-> dict: input_ids [S] int64, modality [S], mm_token_type_ids [S] (1 image pad, 2 video pad),
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
            "modality": self.modality_of(input_ids),
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


# ----------------------------------------------------------------------------------------------------------------
# Tiny tokenizer for test checkpoints

# Added tokens of the Qwen3 tokenizer, in id order from 151643; True where tokenizer.json marks them "special".
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
QWEN_FIRST_ADDED_ID = 151643

# Qwen2/Qwen3 pre-tokenizer split (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TINY_CORPUS = """\
The user shows the assistant an image and asks: what is in this image? The assistant looks at the picture and
answers in a short sentence. There is a cat on the table, a dog in the garden and a red car on the street.
Describe the video. The video shows a person walking through the park; after ten seconds a bird flies over the
water. How many people are in the photo? There are two people standing next to the window. What color is the sky?
The sky is blue and the sun is bright. Please answer the question with a single word or a short phrase.
You are a helpful assistant. The system gives instructions, the user asks questions, and the assistant replies.
"""

DEFAULT_CHAT_TEMPLATE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                          "qwen3_vl_moe_chat_template.jinja")


def _write_atomic(path, text):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_tiny_tokenizer(out_dir, chat_template_path=DEFAULT_CHAT_TEMPLATE_PATH, vocab_size=512):
    """Writes tokenizer.json + tokenizer_config.json: a deterministic byte-level BPE trained on TINY_CORPUS
    (ids 0..~vocab_size) plus the real Qwen added tokens at their real ids 151643..151668.

    tokenizers renumbers added tokens that the model vocabulary lacks, so the added tokens are also entered into
    the BPE vocabulary at their real ids (no merge produces them, so ordinary text never maps to them).
    """
    if not os.path.isfile(chat_template_path):
        raise FileNotFoundError(f"chat template not found: {chat_template_path}")
    with open(chat_template_path, encoding="utf-8") as f:
        chat_template = f.read()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TINY_CORPUS], trainer)

    spec = json.loads(tok.to_str())
    added = []
    for i, (content, special) in enumerate(QWEN_ADDED_TOKENS):
        spec["model"]["vocab"][content] = QWEN_FIRST_ADDED_ID + i
        added.append({"id": QWEN_FIRST_ADDED_ID + i, "content": content, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": special})
    spec["added_tokens"] = added
    tok_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "tokenizer.json"), json.dumps(spec, ensure_ascii=False, indent=1))
    _write_atomic(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(tok_config, ensure_ascii=False, indent=2))
