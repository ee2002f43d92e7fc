"""The built-in checkpoints, in the exact Hugging Face layout, so everything runs without downloading anything.

- tiny-qwen, tiny-kimi, tiny-internvl, tiny-internvl-gpt-oss: tiny Qwen3-VL-MoE, Kimi-VL and InternVL-3.5 (Qwen3-MoE
  decoder; GPT-OSS decoder with its harmony-style chat template) with deterministic RANDOM weights (their text is noise), the real vocabulary size and special-token ids, and small
  real-format tokenizers. Written on first use into the cache folder ($MODES_CACHE, else ~/.cache/modes), safely
  when several processes start at once.
- tiny-vqa: a tiny Qwen3-VL-MoE trained on the easy-vqa data set (train_vqa.py), shipped in checkpoints/tiny-vqa.

Every script's --model takes these names (`resolve`), e.g. `python generate.py --model tiny-vqa ...`.
"""
import base64
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import model
import cli
from cli import write_atomic
from kimi_tokenizer import KIMI_PAT_STR, cache_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHIPPED = {name: os.path.join(ROOT, "checkpoints", name) for name in ("tiny-vqa", "scenes-12x64")}


# ---------------------------------------------------------------------------------------------------------------
# Configs


def qwen_config():
    """config.json of tiny-qwen, in the hub dialect, with the real special-token ids."""
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "text_config": {
            "model_type": "qwen3_vl_moe_text", "vocab_size": 151936, "hidden_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
            "moe_intermediate_size": 64, "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 5000000, "attention_bias": False, "max_position_embeddings": 32768,
            "rope_scaling": {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16"},
        "vision_config": {
            "model_type": "qwen3_vl_moe", "depth": 4, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128,
            "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "out_hidden_size": 128, "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1, 2, 3]},
    }


# the real Qwen3-VL preprocessor_config.json values
QWEN_PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                     "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                     "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                     "image_processor_type": "Qwen2VLImageProcessorFast"}


def kimi_config():
    """config.json of tiny-kimi, with the real special-token ids and vocabulary size."""
    return {
        "architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl",
        "media_placeholder_token_id": 163605, "pad_token_id": 163839, "tie_word_embeddings": False,
        "vision_config": {"model_type": "moonvit", "patch_size": 14, "num_attention_heads": 4,
                          "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                          "init_pos_emb_height": 16, "init_pos_emb_width": 16, "merge_kernel_size": [2, 2]},
        "text_config": {
            "model_type": "deepseek_v3", "vocab_size": 163840, "hidden_size": 128, "intermediate_size": 256,
            "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "n_shared_experts": 2,
            "n_routed_experts": 16, "routed_scaling_factor": 2.446, "kv_lora_rank": 32, "q_lora_rank": None,
            "qk_rope_head_dim": 16, "v_head_dim": 32, "qk_nope_head_dim": 32, "topk_method": "noaux_tc",
            "n_group": 1, "topk_group": 1, "num_experts_per_tok": 4, "moe_layer_freq": 1,
            "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid",
            "num_key_value_heads": 4, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 800000.0,
            "rope_scaling": None, "attention_bias": False, "bos_token_id": 163584, "eos_token_id": 163585,
            "pad_token_id": 163839, "tie_word_embeddings": False},
    }


# the real preprocessor_config.json values of Kimi-VL-A3B-Instruct
KIMI_PREPROCESSOR = {"in_token_limit": 4096, "patch_size": 14, "num_pooled_tokens": 1024,
                     "merge_kernel_size": [2, 2], "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                     "pad_input": True, "image_processor_type": "KimiVLImageProcessor"}


def internvl_config():
    """config.json of tiny-internvl (InternVL-3.5 with a Qwen3-MoE decoder), in the -HF dialect, with the real tile
    geometry (448 px, patch 14, 256 tokens per tile), vocabulary size and special-token ids."""
    return {
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "downsample_ratio": 0.5,
        "image_seq_length": 256, "image_token_id": 151671, "projector_hidden_act": "gelu",
        "tie_word_embeddings": False, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256,
            "moe_intermediate_size": 64, "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False, "max_position_embeddings": 40960,
            "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
            "tie_word_embeddings": False},
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "hidden_act": "gelu", "attention_bias": True, "layer_norm_eps": 1e-6,
            "image_size": [448, 448], "patch_size": [14, 14], "num_channels": 3, "norm_type": "layer_norm",
            "use_qk_norm": False, "use_mean_pooling": True, "use_absolute_position_embeddings": True,
            "use_mask_token": False},
    }


def internvl_gpt_oss_config():
    """config.json of tiny-internvl-gpt-oss (InternVL-3.5 with a gpt-oss decoder): tiny-internvl's vision side and
    tile geometry, a gpt-oss text_config with both layer types, a 4-token sliding window, attention and expert
    biases, sinks and YaRN as in gpt-oss-20b, the real vocabulary size and token ids (image_token_id is
    configs/internvl3_5_gpt_oss_20b_a4b.json's placeholder 200021: the real id is not confirmed)."""
    raw = internvl_config()
    raw["image_token_id"] = GPT_OSS_INTERNVL_FIRST_ID + INTERNVL_ADDED_TOKENS.index("<IMG_CONTEXT>")
    raw["text_config"] = {
        "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 64,
        "num_local_experts": 32, "num_experts_per_tok": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
        "sliding_window": 4, "attention_bias": True, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                               "beta_slow": 1.0, "truncate": False,
                                               "original_max_position_embeddings": 4096},
        "max_position_embeddings": 131072, "swiglu_limit": 7.0, "tie_word_embeddings": False,
        "eos_token_id": 200002, "pad_token_id": 199999}
    return raw


# InternVL-3.5's GotOcr2ImageProcessor values: 448 px tiles, 1..12 of them, ImageNet statistics
INTERNVL_PREPROCESSOR = {"size": {"height": 448, "width": 448}, "min_patches": 1, "max_patches": 12,
                         "crop_to_patches": False, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                         "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                         "resample": 3, "image_processor_type": "GotOcr2ImageProcessor",
                         "processor_class": "InternVLProcessor"}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers: small vocabularies in the real formats, with the real special tokens at their real ids


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

DEFAULT_CHAT_TEMPLATE_PATH = os.path.join(ROOT, "configs",
                                          "qwen3_vl_moe_chat_template.jinja")


def write_qwen_tokenizer(out_dir, chat_template_path=DEFAULT_CHAT_TEMPLATE_PATH, vocab_size=512, texts=(TINY_CORPUS,),
                         first_added_id=QWEN_FIRST_ADDED_ID, model_max_length=262144):
    """Writes tokenizer.json + tokenizer_config.json: a deterministic byte-level BPE trained on `texts`
    (ids 0..~vocab_size) plus the Qwen added tokens from first_added_id on: their real ids 151643..151668, or with
    None right after the BPE vocabulary (train_vqa.py's compact vocabulary). Returns {added token: id}.

    tokenizers renumbers added tokens that the model vocabulary lacks, so the added tokens are also entered into
    the BPE vocabulary at their ids (no merge produces them, so ordinary text never maps to them).
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
    tok.train_from_iterator(texts, trainer)

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    first = len(vocab) if first_added_id is None else first_added_id
    added, ids = [], {}
    for i, (content, special) in enumerate(QWEN_ADDED_TOKENS):
        vocab[content] = ids[content] = first + i
        added.append({"id": first + i, "content": content, "single_word": False, "lstrip": False,
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
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "tokenizer.json"), json.dumps(spec, ensure_ascii=False, indent=1).encode())
    write_atomic(os.path.join(out_dir, "tokenizer_config.json"),
                 json.dumps(tok_config, ensure_ascii=False, indent=2).encode())
    return ids


# InternVL's added tokens after Qwen3's, from 151669 (<img>, </img>, <IMG_CONTEXT> as the spec infers them; the
# rest in InternVL3's order; <video> is transformers 5's video placeholder, its id unconfirmed)
INTERNVL_ADDED_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                         "</box>", "<video>")
INTERNVL_CHAT_TEMPLATE_PATH = os.path.join(ROOT, "configs", "internvl3_5_chat_template.jinja")


def write_internvl_tokenizer(out_dir):
    """tiny-qwen's tokenizer with InternVL's added tokens after Qwen3's (special, at their real ids), the named
    image tokens transformers 5's InternVLProcessor reads, and the -HF ChatML template."""
    ids = write_qwen_tokenizer(out_dir, INTERNVL_CHAT_TEMPLATE_PATH)
    first = max(ids.values()) + 1
    tok_path, cfg_path = os.path.join(out_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer_config.json")
    with open(tok_path, encoding="utf-8") as f:
        spec = json.load(f)
    with open(cfg_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    for i, content in enumerate(INTERNVL_ADDED_TOKENS):
        entry = {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True}
        spec["model"]["vocab"][content] = first + i  # in the vocabulary too, or tokenizers renumbers it
        spec["added_tokens"].append({"id": first + i, **entry})
        tok_config["added_tokens_decoder"][str(first + i)] = entry
    tok_config["extra_special_tokens"] = {"start_image_token": "<img>", "end_image_token": "</img>",
                                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    write_atomic(tok_path, json.dumps(spec, ensure_ascii=False, indent=1).encode())
    write_atomic(cfg_path, json.dumps(tok_config, ensure_ascii=False, indent=2).encode())


# gpt-oss's o200k_harmony specials at their real ids (openai/gpt-oss-20b tokenizer_config.json), every one "special"
# (the 1,075 <|reserved_200013..201087|> tokens after them are left out of the tiny tokenizer)
GPT_OSS_SPECIAL_TOKENS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200000: "<|reserved_200000|>", 200001: "<|reserved_200001|>",
    200002: "<|return|>", 200003: "<|constrain|>", 200004: "<|reserved_200004|>", 200005: "<|channel|>",
    200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200009: "<|reserved_200009|>",
    200010: "<|reserved_200010|>", 200011: "<|reserved_200011|>", 200012: "<|call|>", 200013: "<|reserved_200013|>",
    200014: "<|reserved_200014|>", 200015: "<|reserved_200015|>", 200016: "<|reserved_200016|>",
    200017: "<|reserved_200017|>", 200018: "<|endofprompt|>"}
# InternVL's added tokens in the GPT-OSS release: their ids are NOT confirmed; they follow the harmony specials so that
# <IMG_CONTEXT> lands on the config file's placeholder image_token_id 200021
GPT_OSS_INTERNVL_FIRST_ID = 200019
# o200k's pre-tokenizer split (tiktoken's o200k_base pat_str, which gpt-oss's tokenizer.json carries)
O200K_SPLIT_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"])
INTERNVL_GPT_OSS_CHAT_TEMPLATE_PATH = os.path.join(ROOT, "configs", "internvl3_5_gpt_oss_chat_template.jinja")


def write_internvl_gpt_oss_tokenizer(out_dir, vocab_size=512):
    """tokenizer.json + tokenizer_config.json in gpt-oss's format: a deterministic byte-level BPE on the o200k split
    (ids 0..~vocab_size), the harmony specials at their real ids, InternVL's added tokens after them (special), the
    named image tokens transformers 5's InternVLProcessor reads, and the harmony-style chat template."""
    with open(INTERNVL_GPT_OSS_CHAT_TEMPLATE_PATH, encoding="utf-8") as f:
        chat_template = f.read()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TINY_CORPUS], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = dict(GPT_OSS_SPECIAL_TOKENS)
    tokens.update({GPT_OSS_INTERNVL_FIRST_ID + i: t for i, t in enumerate(INTERNVL_ADDED_TOKENS)})
    entry = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    added = []
    for i, content in sorted(tokens.items()):
        vocab[content] = i  # in the vocabulary too, or tokenizers renumbers it
        added.append({"id": i, "content": content, **entry})
    spec["added_tokens"] = added
    tok_config = {
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        "bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
        "chat_template": chat_template, "clean_up_tokenization_spaces": False, "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    }
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "tokenizer.json"), json.dumps(spec, ensure_ascii=False, indent=1).encode())
    write_atomic(os.path.join(out_dir, "tokenizer_config.json"),
                 json.dumps(tok_config, ensure_ascii=False, indent=2).encode())
    write_atomic(os.path.join(out_dir, "chat_template.jinja"), chat_template.encode())


KIMI_SPECIAL_TOKENS = {
    163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163587: "<|im_user|>", 163588: "<|im_assistant|>",
    163590: "<|start_header_id|>", 163591: "<|end_header_id|>", 163593: "[EOT]", 163594: "<|im_system|>",
    163601: "<|im_middle|>", 163602: "<|media_start|>", 163603: "<|media_content|>", 163604: "<|media_end|>",
    163605: "<|media_pad|>", 163838: "[UNK]", 163839: "[PAD]",
}

KIMI_CHAT_TEMPLATE = """\
{%- for message in messages -%}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
    {{'<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>'}}
  {%- endif -%}
  {%- if message['role'] == 'system' -%}
    {{'<|im_system|>'}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{'<|im_user|>'}}
  {%- endif -%}
  {%- if message['role'] == 'assistant' -%}
    {{'<|im_assistant|>'}}
  {%- endif -%}
  {{- message['role'] -}}
  {{'<|im_middle|>'}}
  {%- if message['content'] is string -%}
    {{- message['content'] + '<|im_end|>' -}}
  {%- else -%}
    {%- for content in message['content'] -%}
      {%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
        {{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}
      {%- else -%}
        {{content['text']}}
      {%- endif -%}
    {%- endfor -%}
    {{'<|im_end|>'}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{'<|im_assistant|>assistant<|im_middle|>'}}
{%- endif -%}"""



KIMI_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into the forest.
A picture of a cat sitting on a red chair next to a window. What is in the image? Describe the picture.
There are two people standing in front of the building, and one of them is holding an umbrella.
The answer is yes. The answer is no. How many apples are on the table? There are three apples on the table.
Please answer the question using a single word or phrase. What color is the car? The car is blue.
This is a test of the tokenizer. It should split the text into words, numbers like 2024 and 3.14159,
and punctuation! Can't, won't, it's, they're, we've, I'm, you'll, he'd. Hello, world: hello again.
def forward(self, x):\n    return self.linear(x) + x\n
for i in range(10):\n    print(i * i)\n
The model sees an image, reads the question, and then writes the answer one token at a time.
The experts in each layer are chosen by the router, and some of them can be skipped for vision tokens.
图像中有一只猫。这是一个测试。 Это тест токенизатора. Ceci est un test. これはテストです。
"""


def bpe_pieces(piece: bytes, ranks: dict) -> list:
    """tiktoken's merge loop: repeatedly join the adjacent pair whose concatenation has the lowest rank."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
        if parts[best] + parts[best + 1] not in ranks:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def train_tiny_ranks(text: str = KIMI_TINY_CORPUS, n_merges: int = 300) -> dict:
    """Byte-level BPE training, deterministic (ties go to the smallest byte string).

    A candidate token that tiktoken's merge loop would not rebuild from its own bytes is rejected, so every
    rank is reachable.
    """
    splitter = pre_tokenizers.Split(Regex(KIMI_PAT_STR), behavior="isolated")
    counts = Counter(p.encode() for p, _ in splitter.pre_tokenize_str(text))
    ranks = {bytes([b]): b for b in range(256)}
    words = {w: bpe_pieces(w, ranks) for w in counts}
    rejected = set()
    while len(ranks) < 256 + n_merges:
        pairs = Counter()
        for w, parts in words.items():
            for a, b in zip(parts, parts[1:]):
                if a + b not in ranks and a + b not in rejected:
                    pairs[a + b] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda t: (-pairs[t], t))
        ranks[best] = len(ranks)
        if bpe_pieces(best, ranks) != [best]:
            del ranks[best]
            rejected.add(best)
            continue
        words = {w: bpe_pieces(w, ranks) if best in w else parts for w, parts in words.items()}
    return ranks


def write_kimi_tokenizer(out_dir):
    """Write tiktoken.model (256 bytes + ~300 learned merges) and tokenizer_config.json carrying the real Kimi
    special tokens at their real ids (163584..163839) and the chat template. Deterministic byte for byte."""
    out_dir = Path(out_dir)
    ranks = train_tiny_ranks()
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    write_atomic(out_dir / "tiktoken.model", ("\n".join(lines) + "\n").encode())
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    config = {
        "added_tokens_decoder": {str(i): {"content": s, **entry} for i, s in sorted(KIMI_SPECIAL_TOKENS.items())},
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"],
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "chat_template": KIMI_CHAT_TEMPLATE,
        "tokenizer_class": "TikTokenTokenizer",
    }
    write_atomic(out_dir / "tokenizer_config.json", (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------------
# Random weights and the checkpoint folders


def random_weights(net, seed=0):
    """Variance-preserving random weights, drawn on the parameters' device, each from a generator seeded by its
    name (so the model's parameter order does not matter). Routers are scaled up and share a low-rank preference so
    that routing is peaked and uneven across experts, as in real Qwen3 routers (uniform routing makes skipping
    degenerate)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            g = torch.Generator(device=p.device).manual_seed(seed * 100003 + zlib.crc32(name.encode()))
            if p.ndim == 1:
                p.normal_(generator=g).mul_(0.05).add_(1.0 if "norm" in name else 0.0)
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                E, H = p.shape
                popular = torch.randn(E, 1, generator=g, device=p.device) @ torch.randn(1, H, generator=g,
                                                                                      device=p.device)
                p.copy_((2.0 * torch.randn(E, H, generator=g, device=p.device) + popular) / H ** 0.5)
            else:
                fan_in = p.shape[-1] if p.ndim != 5 else p[0].numel()
                p.normal_(generator=g).mul_(fan_in ** -0.5)
    return net


def vocabulary(folder):
    """Ids the tokenizer written in `folder` can produce: its regular tokens and its special tokens."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        with open(os.path.join(folder, "tokenizer.json")) as f:
            return list(json.load(f)["model"]["vocab"].values())
    with open(os.path.join(folder, "tiktoken.model")) as f:
        ranks = sum(1 for line in f if line.strip())
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        return list(range(ranks)) + [int(i) for i in json.load(f)["added_tokens_decoder"]]


RANDOM = {"tiny-qwen": ("tiny-qwen3-vl-moe-v3", qwen_config, QWEN_PREPROCESSOR, write_qwen_tokenizer),
          "tiny-kimi": ("tiny-kimi-vl-v3", kimi_config, KIMI_PREPROCESSOR, write_kimi_tokenizer),
          "tiny-internvl": ("tiny-internvl-v1", internvl_config, INTERNVL_PREPROCESSOR, write_internvl_tokenizer),
          "tiny-internvl-gpt-oss": ("tiny-internvl-gpt-oss-v1", internvl_gpt_oss_config, INTERNVL_PREPROCESSOR,
                                    write_internvl_gpt_oss_tokenizer)}
CHECKPOINTS = tuple(RANDOM) + tuple(SHIPPED)


def random_weights_note(name):
    """The line the scripts print beside generated text when `name` is a built-in random-weight model."""
    name = name or "tiny-qwen"
    if name in RANDOM:
        return (f"note: {name} has random weights, so its text is noise; --model tiny-vqa is a tiny model trained "
                f"on easy-vqa shape questions")
    return None


DEFAULT = "tiny-qwen"  # --model when none is given
FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "preprocessor_config.json")
TOKENIZERS = ("tokenizer.json", "tiktoken.model")  # Qwen's and InternVL's (both decoders), Kimi's: one of them


def resolve(name):
    """A checkpoint folder, or the name of a built-in checkpoint (default tiny-qwen) -> its folder."""
    name = DEFAULT if name is None else name
    model.check(name.strip(), f"--model: empty; give a checkpoint folder or a built-in name ({', '.join(CHECKPOINTS)})")
    if name in CHECKPOINTS:
        return checkpoint(name)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise NotADirectoryError(f"--model {name}: is a file; expected a checkpoint folder (config.json, "
                                 f"model.safetensors, ...)")
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):  # a hub id such as Qwen/Qwen3-VL-...
        raise FileNotFoundError(f"--model {name}: no such folder. This looks like a Hugging Face hub id, and this "
                                f"project does not download: run `hf download {name} --local-dir {parts[1]}` (pip "
                                f"install huggingface_hub), then pass --model {parts[1]}")
    raise FileNotFoundError(f"--model {name}: no such folder (or a built-in name: {', '.join(CHECKPOINTS)})")


def damaged(path):
    """Why the checkpoint folder at path is not whole (a missing file, a truncated model.safetensors), or None."""
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    tokenizer = next((f for f in TOKENIZERS if os.path.isfile(os.path.join(path, f))), None)
    if missing or tokenizer is None:
        return f"missing {', '.join(missing + ([] if tokenizer else [' or '.join(TOKENIZERS)]))}"
    try:
        model.safetensors_header(os.path.join(path, "model.safetensors"))
        for f in ("config.json", "tokenizer_config.json", "preprocessor_config.json") + TOKENIZERS[:1]:
            if os.path.isfile(os.path.join(path, f)):
                model.read_json(os.path.join(path, f), f)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def checkpoint(name):
    """The folder of built-in checkpoint `name`. A random one is written on first use, and again when the cached
    copy is damaged. It is made in a temporary folder and renamed into place, so concurrent first users (torchrun
    ranks) never see half of it: whoever renames first wins, the others discard their copy."""
    if name in SHIPPED:
        problem = damaged(SHIPPED[name])
        if problem:
            raise FileNotFoundError(f"{SHIPPED[name]}: the shipped {name} checkpoint is damaged in this copy "
                                    f"({problem}); restore it with `git checkout -- checkpoints/{name}`")
        return SHIPPED[name]
    folder_name, make_config, preprocessor, write_tokenizer = RANDOM[name]
    cache = cache_dir()
    path = os.path.join(cache, folder_name)
    if os.path.exists(path):
        problem = damaged(path)
        if problem is None:
            return path
        print(f"note: the cached {name} in {path} is damaged ({problem}); writing it again", file=sys.stderr)
        aside = tempfile.mkdtemp(dir=cache, prefix=".damaged-")
        try:
            os.rename(path, os.path.join(aside, folder_name))
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(aside, ignore_errors=True)
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache, prefix=".tmp-")
    try:
        raw = make_config()
        net = random_weights(model.build(model.config_from_dict(raw, name), "cpu", torch.float32))
        write_tokenizer(tmp)
        unused = torch.ones(net.cfg.vocab_size, dtype=torch.bool)
        unused[vocabulary(tmp)] = False
        with torch.no_grad():
            net.lm_head.weight[unused] = 0.0  # like the real padding rows: ids the tokenizer lacks are unlikely
            net.lm_head.weight[~unused] *= 6.0  # peaked next-token distributions, as in a trained model
        model.save_checkpoint(net, raw, tmp)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor, f, indent=2)
        cli.follow_umask(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if damaged(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
