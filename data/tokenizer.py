"""The bundled tokenizer: a small byte-level BPE trained on the project's own text, served by tiktoken.

tiktoken's `gpt2` encoding downloads its files at first use; this project must run offline. So we
train a byte-level BPE (GPT-2's pre-tokenisation regex, 256 byte tokens + merges) on text from the
data generators, store the ranks in tiktoken's `.tiktoken` text format (one "base64(token) rank"
line per token) next to this file, and build a `tiktoken.Encoding` from them with our special tokens.
Byte-level means every Unicode string round-trips exactly, whatever it contains.

    from data.tokenizer import get_tokenizer
    enc = get_tokenizer()                          # bundled BPE (default)
    ids = enc.encode("a red circle <image>", allowed_special="all")
    enc.decode(ids)
    get_tokenizer("gpt2")                          # tiktoken's GPT-2 ranks + our specials (network once)

Retraining takes the corpus as text files, one text a line (the bundled ranks: 60000 ShapesWorld texts
and 20000 voice queries), and writes data/shapesworld_bpe.new.tiktoken unless --out or --overwrite says
otherwise; it never replaces an existing file without --overwrite:

    python -m data.shapes corpus --n=60000 --out=out/tokenizer/shapes.txt
    python -c "from data import voice; print(*voice.corpus(20000), sep=chr(10))" > out/tokenizer/voice.txt
    python -m data.tokenizer train --corpus=out/tokenizer/shapes.txt,out/tokenizer/voice.txt
        [--vocab_size=4096] [--out=PATH] [--overwrite]
    python -m data.shapes corpus --n=3000 --seed=12345 --out=out/tokenizer/held_out.txt  # unseen seed
    python -m data.tokenizer stats [--texts=out/tokenizer/held_out.txt] [--ranks=PATH]   # bytes per token
"""
from __future__ import annotations

import base64
import collections
import functools
import sys
import time
from pathlib import Path

import regex
import tiktoken

from . import InputError
from .jsonl import existing_file, text_lines

# GPT-2's pre-tokenisation: contractions, letters, numbers, other symbols, each with an optional
# leading space, and runs of whitespace. BPE merges never cross these pieces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|pad|>", "<image>",
    "<|ssc|>", "<|dsc|>", "<|dsc+|>", "<|afc|>", "<|alt|>",  # caption-format control tokens
    "<|user|>", "<|assistant|>", "<box>", "</box>",
] + [f"<|reserved_{i}|>" for i in range(16)]  # room for scripts to add tokens without retraining

RANKS_PATH = Path(__file__).with_name("shapesworld_bpe.tiktoken")
DEFAULT_VOCAB_SIZE = 4096  # total, special tokens included


# ----------------------------------------------------------------------------- training

def train_bpe(texts, vocab_size: int, n_special: int = len(SPECIAL_TOKENS)) -> dict[bytes, int]:
    """Byte-level BPE: start from the 256 bytes, repeatedly merge the most frequent adjacent pair.

    Words (regex pieces) are counted once with their frequency; a pair index maps each pair to the
    words holding it, so one merge only touches the words it changes (fast enough for ~10^5 words).
    Ties break on the smaller pair of token ids, so training is deterministic.
    Returns mergeable ranks {token bytes: rank}; stops early if no pair occurs any more.
    """
    n_merges = vocab_size - 256 - n_special
    if n_merges < 0:
        raise InputError(f"vocab_size={vocab_size} is smaller than 256 bytes + {n_special} special tokens")
    pattern = regex.compile(GPT2_PATTERN)
    word_counts = collections.Counter()
    for text in texts:
        word_counts.update(pattern.findall(text))
    words = [list(w.encode("utf-8")) for w in word_counts]  # each word as a list of token ids
    counts = list(word_counts.values())
    vocab = [bytes([b]) for b in range(256)]  # token id -> bytes

    pair_counts = collections.Counter()
    pair_words = collections.defaultdict(set)  # pair -> indices of the words that contain it
    for i, (w, c) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += c
            pair_words[pair].add(i)

    for _ in range(n_merges):
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        if pair_counts[best] <= 0:
            break
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for i in list(pair_words[best]):
            w, c = words[i], counts[i]
            for pair in zip(w, w[1:]):  # remove this word's old pairs ...
                pair_counts[pair] -= c
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
                pair_words[pair].discard(i)
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for pair in zip(merged, merged[1:]):  # ... and add its new ones
                pair_counts[pair] += c
                pair_words[pair].add(i)
        pair_words.pop(best, None)
    return {token: rank for rank, token in enumerate(vocab)}


def save_ranks(ranks: dict[bytes, int], path: Path) -> None:
    """Write ranks in tiktoken's `.tiktoken` format (what `tiktoken.load.load_tiktoken_bpe` reads)."""
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in by_rank]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)  # atomic: a killed run never leaves half a file


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    path = RANKS_PATH if path is None else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer ranks missing; run `python -m data.tokenizer train`")
    ranks = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise InputError(f"{path}:{lineno}: expected 'base64_token rank', got {line[:60]!r}")
        ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


# ----------------------------------------------------------------------------- loading

@functools.cache
def get_tokenizer(name: str = "shapesworld") -> tiktoken.Encoding:
    """The tokenizer every script uses. name: "shapesworld" (bundled, offline) or "gpt2" (network)."""
    if name == "shapesworld":
        ranks, pattern = load_ranks(), GPT2_PATTERN
    elif name == "gpt2":
        try:
            base = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches the gpt2 files over the network at first use
            raise RuntimeError(f"--tokenizer=gpt2 needs tiktoken's gpt2 files, which could not be loaded "
                               f"(offline?): {type(e).__name__}: {e}. Use the bundled tokenizer "
                               f"(--tokenizer=shapesworld) instead.") from None
        ranks, pattern = base._mergeable_ranks, base._pat_str
    else:
        raise ValueError(f"unknown tokenizer {name!r}: expected 'shapesworld' or 'gpt2'")
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=f"{name}_mm", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=specials)


# ----------------------------------------------------------------------------- CLI
# The training corpus is passed in as text files (one text a line), so this file imports nothing from
# data/: data/shapes/text.py counts tokens with it, and data/shapes stands above the tokenizer.
OPTIONS = {
    "train": {"corpus": "", "vocab_size": DEFAULT_VOCAB_SIZE, "out": "", "overwrite": False},
    "stats": {"texts": "", "ranks": ""},
}
SNIPS_TEST = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "snips" / "test" / "seq.in"


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """`command --key=value ... [--overwrite]`; an unknown command or option, or a bad value, is an error
    (a typo such as --vocab_sise=8000 must never retrain with the defaults)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    if argv[0] not in OPTIONS:
        raise SystemExit(f"error: unknown command {argv[0]!r}: expected 'train' or 'stats'")
    command, opts = argv[0], dict(OPTIONS[argv[0]])
    for arg in argv[1:]:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in opts or (not eq and not isinstance(opts[key], bool)):
            known = ", ".join(f"--{k}" if isinstance(v, bool) else f"--{k}=" for k, v in opts.items())
            raise SystemExit(f"error: unknown option {arg!r} for {command}; known: {known}")
        if isinstance(opts[key], bool):
            if eq:
                raise SystemExit(f"error: --{key} is a flag and takes no value, got {arg!r}")
            opts[key] = True
        elif isinstance(opts[key], int):
            if not value.isdigit():
                raise SystemExit(f"error: --{key} must be a positive integer, got {value!r}")
            opts[key] = int(value)
        else:
            opts[key] = value
    return command, opts


def read_texts(paths: str) -> list[str]:
    """The non-blank lines of comma-separated UTF-8 text files."""
    return [line.rstrip("\r\n") for path in paths.split(",") for _, line in text_lines(path) if line.strip()]


def bytes_per_token(enc: tiktoken.Encoding, texts) -> float:
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(enc.encode_ordinary(t)) for t in texts)
    return n_bytes / max(n_tokens, 1)


def train_command(corpus: str, vocab_size: int, out: str, overwrite: bool) -> Path:
    """Train on the corpus files and write the ranks: to `out`, else next to the bundled file as
    *.new.tiktoken; the bundled file itself (or any existing file) only with --overwrite."""
    if not corpus:
        raise SystemExit("error: train needs --corpus=FILE[,FILE...] (one text a line); see --help")
    path = Path(out) if out else RANKS_PATH.with_name(RANKS_PATH.stem + ".new.tiktoken")
    if overwrite and not out:
        path = RANKS_PATH
    if path.exists() and not overwrite:
        raise SystemExit(f"error: {path} exists; pass --overwrite to replace it")
    texts = read_texts(corpus)
    t0 = time.time()
    ranks = train_bpe(texts, vocab_size)
    save_ranks(ranks, path)
    get_tokenizer.cache_clear()
    print(f"trained {len(ranks)} ranks (+{len(SPECIAL_TOKENS)} specials) on {len(texts)} texts in "
          f"{time.time() - t0:.1f}s -> {path}")
    return path


def stats_command(texts: str, ranks: str) -> None:
    if ranks:
        enc = tiktoken.Encoding(name="stats", pat_str=GPT2_PATTERN, special_tokens={},
                                mergeable_ranks=load_ranks(existing_file(ranks)))
    else:
        enc = get_tokenizer()
    print(f"vocab size (n_vocab): {enc.n_vocab}")
    for path in texts.split(",") if texts else []:
        print(f"bytes/token, {path}: {bytes_per_token(enc, read_texts(path)):.2f}")
    if SNIPS_TEST.exists():
        snips = bytes_per_token(enc, read_texts(str(SNIPS_TEST)))
        print(f"bytes/token, SNIPS test utterances (real text): {snips:.2f}")


def main(argv: list[str]) -> None:
    command, opts = parse_args(argv)
    try:
        if command == "train":
            train_command(**opts)
        else:
            stats_command(**opts)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
