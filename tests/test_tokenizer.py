"""The bundled byte-level BPE: exact round trip, special tokens, the trainer's merges, the file format."""
import random

import pytest
import tiktoken
import tiktoken.load

from data import tokenizer as T


def test_round_trip_any_unicode():
    enc = T.get_tokenizer()
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x250)] + list("東京ß€🙂👍🏽\n\t\r  \u200b\u0301") + ["\x00", "\ufffd"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert enc.decode(enc.encode_ordinary(text)) == text
    surrogate_free = "".join(chr(rng.randint(0x20, 0x10FFFF)) for _ in range(2000) if True)
    surrogate_free = "".join(c for c in surrogate_free if not 0xD800 <= ord(c) <= 0xDFFF)
    assert enc.decode(enc.encode_ordinary(surrogate_free)) == surrogate_free


def test_special_tokens_are_single_distinct_ids_above_the_ranks():
    enc = T.get_tokenizer()
    ids = [enc.encode_single_token(tok) for tok in T.SPECIAL_TOKENS]
    assert len(set(ids)) == len(T.SPECIAL_TOKENS)
    assert min(ids) == enc.n_vocab - len(T.SPECIAL_TOKENS) and max(ids) == enc.n_vocab - 1
    text = "<|dsc|> a red circle <image> left of <box>[1, 2, 3, 4]</box><|endoftext|>"
    encoded = enc.encode(text, allowed_special="all")
    assert enc.encode_single_token("<image>") in encoded and enc.decode(encoded) == text
    # as plain text a special token's spelling is ordinary bytes, never the special id
    assert enc.encode_single_token("<image>") not in enc.encode_ordinary(text)
    with pytest.raises(ValueError):  # tiktoken refuses unannounced specials: no silent injection
        enc.encode("<image>")


def test_trainer_merges_most_frequent_pair_first():
    ranks = T.train_bpe(["ab ab ab ab abc bc bc"], vocab_size=256 + 3, n_special=0)
    merges = [tok for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]) if rank >= 256]
    # pieces: "ab", " ab" x3, " abc", " bc" x2 -> pair (a,b) occurs 5x, (" ", a) 4x, (b, c) 3x
    assert merges[0] == b"ab"
    assert merges[1] == b" ab"
    assert len(ranks) == 259
    enc = tiktoken.Encoding("t", pat_str=T.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert enc.encode_ordinary(" ab") == [ranks[b" ab"]]


def test_trainer_stops_when_no_pair_is_left():
    ranks = T.train_bpe(["aa"], vocab_size=1000, n_special=0)
    assert len(ranks) == 257 and b"aa" in ranks


def test_ranks_file_round_trip_and_malformed_line(tmp_path):
    ranks = T.train_bpe(["hello world, hello there"], vocab_size=270, n_special=0)
    path = tmp_path / "r.tiktoken"
    T.save_ranks(ranks, path)
    assert T.load_ranks(path) == ranks
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == ranks  # tiktoken reads our file as its own format
    path.write_text(path.read_text() + "not-a-rank-line\n")
    with pytest.raises(ValueError, match=rf"r\.tiktoken:{len(ranks) + 1}:"):
        T.load_ranks(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        T.load_ranks(tmp_path / "nope.tiktoken")


def test_gpt2_offline_gives_a_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    T.get_tokenizer.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="offline"):
            T.get_tokenizer("gpt2")
    finally:
        T.get_tokenizer.cache_clear()
    with pytest.raises(ValueError, match="unknown tokenizer"):
        T.get_tokenizer("bert")
