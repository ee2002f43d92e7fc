"""
Kimi-VL's tokenizer: the shipped tiktoken vocabulary (`tiktoken.model`, "base64 rank" lines) and the special tokens of
tokenizer_config.json converted once into an equivalent byte-level BPE of the `tokenizers` library, cached beside the
checkpoint (or in $MODES_CACHE), so no tiktoken and no trust_remote_code are needed at run time. processor.py's
KimiProcessor builds its prompts on it.
"""
import base64
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from cli import write_atomic

# Kimi's pre-tokenizer split (Moonshot TikTokenTokenizer.pat_str). `&&` is a character-class intersection:
# Oniguruma (tokenizers) and tiktoken's engine both support it; Python's `re` does not.
KIMI_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_SPECIAL_IDS = 256  # the special block right after the BPE ranks: 163584..163839 in the real vocabulary
CACHE_FORMAT = "kimi-tiktoken-bpe-v1"  # bump when the conversion changes, so stale caches are not reused



def read_tiktoken_model(path) -> dict:
    """Parse a tiktoken vocabulary: one "<base64 bytes> <rank>" per line -> {token bytes: rank}."""
    path = Path(path)
    ranks, seen = {}, set()
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected '<base64 token> <rank>'")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            if not token or rank < 0:
                raise ValueError("empty token or negative rank")
        except ValueError as e:  # binascii.Error is a ValueError too
            raise ValueError(f"{path}:{lineno}: malformed tiktoken line {line[:60]!r} ({e})") from None
        if token in ranks or rank in seen:
            raise ValueError(f"{path}:{lineno}: duplicate token or rank {rank}")
        ranks[token] = rank
        seen.add(rank)
    if not ranks:
        raise ValueError(f"{path}: no tokens")
    return ranks


def byte_to_char() -> dict:
    """GPT-2's reversible byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def convert_tiktoken(ranks: dict, special_tokens: dict, pat_str: str = KIMI_PAT_STR) -> Tokenizer:
    """Build the `tokenizers` equivalent of tiktoken.Encoding(pat_str, ranks, special_tokens).

    tiktoken merges, inside each pre-token, the adjacent pair whose concatenation has the lowest rank. A BPE
    with one merge (left, right) for *every* split of every token into two tokens, ordered by the rank of the
    merged token, makes exactly the same choices. One merge per token is not enough: tiktoken can reach a
    token through any split. `ignore_merges` looks a whole pre-token up first, as tiktoken does.
    """
    first_special = min(special_tokens)
    if max(ranks.values()) >= first_special:
        raise ValueError(f"BPE rank {max(ranks.values())} collides with the special-token block at {first_special}")
    to_char = byte_to_char()

    def as_str(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    # Ids with no rank below the special block (the tiny test vocabulary) get placeholders that no input can
    # produce: a literal space never survives the ByteLevel mapping (space becomes 'Ġ').
    used = set(ranks.values())
    vocab.update({f"<unused id {i}>": i for i in range(first_special) if i not in used})
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], as_str(left), as_str(right)))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab, [(l, r) for *_, l, r in merges], ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # tokenizers numbers added tokens from the end of the vocabulary, so adding them in id order lands them
    # on their ids; check it, a special string that is already a BPE token would silently reuse that id.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s in sorted(special_tokens.items())])
    for i, s in special_tokens.items():
        if tok.token_to_id(s) != i:
            raise ValueError(f"special token {s!r} landed on id {tok.token_to_id(s)}, expected {i}")
    return tok


def read_special_tokens(config_path) -> dict:
    """{id: string} for the whole special block, named from tokenizer_config.json's added_tokens_decoder.

    The block starts at the lowest named id ([BOS]) and spans 256 ids, or more if the config names a higher
    one (some Kimi tokenizers reserve 258); unnamed ids are `<|reserved_token_{id}|>` as in Kimi's
    TikTokenTokenizer.
    """
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"missing tokenizer config: {config_path}")
    try:
        decoder = json.loads(config_path.read_text())["added_tokens_decoder"]
        named = {int(i): entry["content"] for i, entry in decoder.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{config_path}: cannot read added_tokens_decoder ({e!r})") from None
    if not named:
        raise ValueError(f"{config_path}: added_tokens_decoder is empty")
    start = min(named)
    end = max(start + NUM_SPECIAL_IDS, max(named) + 1)
    return {i: named.get(i, f"<|reserved_token_{i}|>") for i in range(start, end)}


def split_long_runs(text: str, max_run: int = 25_000) -> list:
    """Cut text so that no piece holds more than max_run consecutive whitespace or non-whitespace characters.

    Kimi's tokenizer does this before tiktoken (tiktoken issue #195: BPE on a huge pre-token is quadratic), so
    it changes the ids of such texts and is part of the tokenizer's definition.
    """
    if len(text) <= max_run:
        return [text]
    pieces, start, run, run_is_space = [], 0, 0, text[0].isspace()
    for i, ch in enumerate(text):
        if ch.isspace() != run_is_space:
            run, run_is_space = 1, ch.isspace()
            continue
        run += 1
        if run > max_run:
            pieces.append(text[start:i])
            start, run = i, 1
    pieces.append(text[start:])
    return pieces


class KimiTokenizer:
    """The converted tokenizer plus Kimi's encode rules: special-token strings in the text become their ids
    (allowed_special="all"), no BOS is added, long runs are pre-split."""

    def __init__(self, tok: Tokenizer, special_tokens: dict):
        self.tok = tok
        self.special_tokens = special_tokens  # {id: string}, the whole special block
        self.special_ids = set(special_tokens)
        self.vocab_size = max(special_tokens) + 1

    def token_to_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list:
        # the 400k-character windows come from the reference too (tiktoken panics on longer inputs)
        chunks = [piece for i in range(0, len(text), 400_000) for piece in split_long_runs(text[i:i + 400_000])]
        return [i for enc in self.tok.encode_batch(chunks, add_special_tokens=False) for i in enc.ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def cache_dir() -> Path:
    """Where converted tokenizers and the tiny built-in checkpoints live: $MODES_CACHE, else ~/.cache/modes."""
    return Path(os.environ.get("MODES_CACHE") or Path.home() / ".cache" / "modes")


def load_kimi_tokenizer(model_dir) -> KimiTokenizer:
    """Load tiktoken.model + tokenizer_config.json from model_dir, converting once and caching the result.

    The cache file `tokenizer.modes-<hash>.json` goes next to the checkpoint when that folder is writable,
    else into $MODES_CACHE (default ~/.cache/modes). The hash covers the vocabulary, the special tokens and
    the conversion format, so an edited vocabulary never meets a stale cache.
    """
    model_dir = Path(model_dir)
    vocab_path = model_dir / "tiktoken.model"
    if not vocab_path.is_file():
        raise FileNotFoundError(f"no tiktoken.model in {model_dir}")
    special_tokens = read_special_tokens(model_dir / "tokenizer_config.json")
    key = hashlib.sha256(vocab_path.read_bytes())
    key.update(json.dumps([CACHE_FORMAT, KIMI_PAT_STR, sorted(special_tokens.items())]).encode())
    name = f"tokenizer.modes-{key.hexdigest()[:16]}.json"
    for path in (model_dir / name, cache_dir() / name):
        if path.is_file():
            try:
                return KimiTokenizer(Tokenizer.from_file(str(path)), special_tokens)
            except Exception:  # a damaged cache entry (cut short by a full disk): converted again below
                warnings.warn(f"{path}: damaged converted tokenizer; converting {vocab_path} again", stacklevel=2)
    tok = convert_tiktoken(read_tiktoken_model(vocab_path), special_tokens)
    data = tok.to_str().encode()
    try:
        write_atomic(model_dir / name, data)
    except OSError:
        write_atomic(cache_dir() / name, data)
    return KimiTokenizer(tok, special_tokens)
