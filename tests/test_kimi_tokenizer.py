"""Kimi-VL tokenizer: tiktoken vocabulary converted to `tokenizers`, checked against the tiktoken package."""
import base64
import json
import random
import re
from pathlib import Path

import pytest
import tiktoken

import kimi_tokenizer
from support import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "kimi_vl"
SPECIAL_JSON = json.loads((FIXTURES / "special_tokens.json").read_text())
PAT_STR = SPECIAL_JSON["pat_str_join"].join(SPECIAL_JSON["pat_str_alternatives"])
FIRST_SPECIAL, LAST_SPECIAL = SPECIAL_JSON["special_id_range"]


def reference_specials():
    """{string: id} for the whole special block, named from the reference fixture."""
    named = {int(i): s for i, s in SPECIAL_JSON["named_special_tokens"].items()}
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)}


def read_ranks(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        token, rank = line.split()
        out[base64.b64decode(token)] = int(rank)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_kimi_tok")
    tiny.write_kimi_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return kimi_tokenizer.load_kimi_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return tiktoken.Encoding("kimi-tiny", pat_str=PAT_STR, mergeable_ranks=read_ranks(tiny_dir / "tiktoken.model"),
                             special_tokens=reference_specials())


CORPUS = [
    "",
    "The quick brown fox jumps over the lazy dog.",
    "What is in the image? Describe the picture in one sentence.",
    "图像中有一只猫。这是一个测试，中文和English混合。",
    "これはテストです。カタカナとひらがな、漢字。",
    "Это тест токенизатора. Ceci est un test, très bien; naïve café.",
    "Emoji: 🎉🎉 👍🏽 👨‍👩‍👧 ❤️ and flags 🇫🇷",
    "digits 1 12 123 1234 12345678901234567890 3.14159 -42 1e-5",
    "whitespace   runs\t\t\tand\n\n\nnewlines \r\n  \n   end   ",
    "trailing spaces before a special   <|im_end|>   and after",
    "def forward(self, x):\n    return self.linear(x) + x  # comment\n\tif a != b: pass\n",
    "I'M here, DON'T stop, they're HERE, we've I'll you'd It'S",
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>",
    "<|media_start|>image<|media_content|><|media_pad|><|media_pad|><|media_end|>",
    "[BOS]text[EOS][PAD][UNK]<|reserved_token_163600|><|reserved_token_163700|>",
    "mixed العربية हिन्दी ελληνικά עברית 한국어 ภาษาไทย",
    "combining e\u0301 a\u0308 \u00a0nbsp \u3000ideographic space\u200bzwsp",
    "<|im_end",  # an incomplete special token is ordinary text
    "punctuation!!! ??? ... --- *** ((( ))) \"quotes\" 'single' `back`",
]

ALPHABET = [*"abcXYZ019 \t\n\r.,!?'-_()", *"猫中文こカЖжéü", "🎉", "\u0301", "\u00a0", "\u3000", "'s", "'LL",
            "<|im_end|>", "<|media_pad|>", "[BOS]", "<|reserved_token_163595|>"]


def test_encode_matches_tiktoken_on_corpus(ours, ref):
    for text in CORPUS:
        assert ours.encode(text) == ref.encode(text, allowed_special="all"), text


def test_encode_matches_tiktoken_on_random_strings(ours, ref):
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        assert ours.encode(text) == ref.encode(text, allowed_special="all"), repr(text)


def test_decode_matches_tiktoken(tiny_dir, ours, ref):
    for text in CORPUS:
        ids = ref.encode(text, allowed_special="all")
        assert ours.decode(ids) == ref.decode(ids) == text
    # arbitrary id runs may cut UTF-8 sequences: both replace the broken bytes the same way
    rng = random.Random(1)
    n_ranks = len(read_ranks(tiny_dir / "tiktoken.model"))
    for _ in range(200):
        ids = [rng.randrange(n_ranks) for _ in range(rng.randint(1, 8))]
        assert ours.decode(ids) == ref.decode(ids), ids


def test_tiny_vocabulary_layout(tiny_dir, ours):
    assert kimi_tokenizer.KIMI_PAT_STR == PAT_STR
    ranks = read_ranks(tiny_dir / "tiktoken.model")
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert {bytes([b]) for b in range(256)} <= set(ranks)
    assert 256 + 200 <= len(ranks) <= 256 + 300
    assert ours.vocab_size == 163840
    for name, i in reference_specials().items():
        assert ours.token_to_id(name) == i
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (FIXTURES / "chat_template.jinja").read_text().rstrip("\n")
    assert {int(i): e["content"] for i, e in config["added_tokens_decoder"].items()} == \
        {int(i): s for i, s in SPECIAL_JSON["named_special_tokens"].items()}


def test_tiny_vocabulary_is_deterministic(tiny_dir, tmp_path):
    tiny.write_kimi_tokenizer(tmp_path)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_every_merged_token_is_reachable(tiny_dir):
    """Running tiktoken's merge loop on a token's own bytes must rebuild the token."""
    ranks = read_ranks(tiny_dir / "tiktoken.model")
    for token in ranks:
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 1:
            joined = [ranks.get(a + b) for a, b in zip(parts, parts[1:])]
            candidates = [(r, i) for i, r in enumerate(joined) if r is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert parts == [token], token


def test_merges_cover_every_split():
    """'abc' was learned as ab+c, but tiktoken also reaches it as a+bc when 'bc' ranks first."""
    ranks = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    specials = {300: "<|x|>"}
    tok = kimi_tokenizer.convert_tiktoken(ranks, specials, PAT_STR)
    ref = tiktoken.Encoding("abc", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={"<|x|>": 300})
    for text in ["abcd", "abc", "xabcx abcabc<|x|>", "zabcd"]:
        assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text, allowed_special="all"), text


def test_split_long_runs_hand_worked():
    assert kimi_tokenizer.split_long_runs("aaaaa  bb", 3) == ["aaa", "aa  bb"]
    assert kimi_tokenizer.split_long_runs("     x", 2) == ["  ", "  ", " x"]
    assert kimi_tokenizer.split_long_runs("ab cd", 2) == ["ab cd"]


def test_long_runs_are_encoded_in_pieces(ours):
    long = "a" * 25_001
    assert ours.encode(long) == ours.encode("a" * 25_000) + ours.encode("a")


def test_cache_is_reused_and_keyed_by_vocabulary(tmp_path):
    tiny.write_kimi_tokenizer(tmp_path)
    kimi_tokenizer.load_kimi_tokenizer(tmp_path)
    (cached,) = tmp_path.glob("tokenizer.modes-*.json")
    # plant a different tokenizer under the same key: a reload must read it, not reconvert
    ranks = {bytes([b]): b for b in range(256)}
    planted = kimi_tokenizer.convert_tiktoken(ranks, kimi_tokenizer.read_special_tokens(tmp_path / "tokenizer_config.json"))
    cached.write_text(planted.to_str())
    assert kimi_tokenizer.load_kimi_tokenizer(tmp_path).encode("the") == [ord("t"), ord("h"), ord("e")]
    # a changed vocabulary gets its own cache file
    with open(tmp_path / "tiktoken.model", "a") as f:
        f.write(f"{base64.b64encode(b'zzq').decode()} 9999\n")
    tok = kimi_tokenizer.load_kimi_tokenizer(tmp_path)
    assert len(list(tmp_path.glob("tokenizer.modes-*.json"))) == 2
    assert tok.encode("zzq") == [9999]
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_falls_back_when_checkpoint_folder_is_not_writable(tmp_path, monkeypatch):
    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    tiny.write_kimi_tokenizer(model_dir)
    monkeypatch.setenv("MODES_CACHE", str(cache))
    kimi_tokenizer.load_kimi_tokenizer(model_dir)
    (name,) = [p.name for p in model_dir.glob("tokenizer.modes-*.json")]
    (model_dir / name).unlink()
    # tests run as root, which ignores chmod; a folder squatting on the cache name makes the write fail
    (model_dir / name).mkdir()
    tok = kimi_tokenizer.load_kimi_tokenizer(model_dir)
    assert (cache / name).is_file()
    assert tok.encode("<|im_end|>") == [163586]
    assert not list(model_dir.glob("*.tmp")) and not list(cache.glob("*.tmp"))


def test_missing_tiktoken_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no tiktoken.model in {tmp_path}")):
        kimi_tokenizer.load_kimi_tokenizer(tmp_path)


def test_missing_tokenizer_config(tmp_path):
    tiny.write_kimi_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        kimi_tokenizer.load_kimi_tokenizer(tmp_path)


@pytest.mark.parametrize("bad_line", ["YWJj", "YWJj 12 extra", "not*base64 12", "YWJj twelve", "YWJj -3", "YQ== 0"])
def test_malformed_tiktoken_line_names_file_and_line(tmp_path, bad_line):
    tiny.write_kimi_tokenizer(tmp_path)
    path = tmp_path / "tiktoken.model"
    lines = path.read_text().splitlines()
    lines.insert(2, bad_line)  # becomes line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tiktoken\.model:3: "):
        kimi_tokenizer.load_kimi_tokenizer(tmp_path)


def test_rank_inside_special_block_is_rejected():
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="collides with the special-token block at 200"):
        kimi_tokenizer.convert_tiktoken(ranks, {200: "<|x|>"})


def test_bad_tokenizer_config(tmp_path):
    tiny.write_kimi_tokenizer(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: cannot read added_tokens_decoder"):
        kimi_tokenizer.load_kimi_tokenizer(tmp_path)
    config.write_text(json.dumps({"added_tokens_decoder": {}}))
    with pytest.raises(ValueError, match="tokenizer_config.json: added_tokens_decoder is empty"):
        kimi_tokenizer.load_kimi_tokenizer(tmp_path)


def test_special_block_grows_to_cover_named_ids(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    named = {"1000": {"content": "[BOS]"}, "1257": {"content": "<|x|>"}}
    config.write_text(json.dumps({"added_tokens_decoder": named}))
    special = kimi_tokenizer.read_special_tokens(config)
    assert min(special) == 1000 and max(special) == 1257 and len(special) == 258
    assert special[1001] == "<|reserved_token_1001|>" and special[1257] == "<|x|>"


def test_special_token_that_is_already_a_bpe_token_is_rejected():
    ranks = {bytes([b]): b for b in range(256)} | {b"[BOS]": 256}
    with pytest.raises(ValueError, match=r"special token '\[BOS\]' landed on id 256, expected 300"):
        kimi_tokenizer.convert_tiktoken(ranks, {300: "[BOS]"})
