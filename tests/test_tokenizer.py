"""The bundled byte-level BPE: exact round trip, special tokens, the trainer's merges, the file format."""
import random

import pytest
import tiktoken
import tiktoken.load

from data import tokenizer as T


def test_round_trip_any_unicode():
    enc = T.get_tokenizer()
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x250)] + list("東京ß€🙂👍🏽\n\t\r  \u200b\u0301")
    alphabet += ["\x00", "\ufffd"]
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


def test_cli_rejects_unknown_options_and_never_overwrites_silently(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle left of a blue star\nthe Varnok emblem\n\n" * 20, encoding="utf-8")
    bundled = tmp_path / "bundled.tiktoken"
    bundled.write_text("tracked ranks\n")
    monkeypatch.setattr(T, "RANKS_PATH", bundled)
    try:
        with pytest.raises(SystemExit, match=r"unknown option '--vocab_sise=8000' for train; known: "):
            T.main(["train", f"--corpus={corpus}", "--vocab_sise=8000"])
        with pytest.raises(SystemExit, match=r"--vocab_size must be a positive integer, got '8k'"):
            T.main(["train", f"--corpus={corpus}", "--vocab_size=8k"])
        with pytest.raises(SystemExit, match=r"unknown command 'trian'"):
            T.main(["trian"])
        with pytest.raises(SystemExit, match=r"train needs --corpus"):
            T.main(["train"])
        T.main(["train", f"--corpus={corpus}", "--vocab_size=300"])  # a new file beside the bundled one
        new = tmp_path / "bundled.new.tiktoken"
        assert bundled.read_text() == "tracked ranks\n"
        assert len(T.load_ranks(new)) == 300 - len(T.SPECIAL_TOKENS)
        with pytest.raises(SystemExit, match=r"bundled\.new\.tiktoken exists; pass --overwrite"):
            T.main(["train", f"--corpus={corpus}", "--vocab_size=300"])
        T.main(["train", f"--corpus={corpus}", "--vocab_size=300", "--overwrite"])
        assert T.load_ranks(bundled) == T.load_ranks(new)
        corpus.write_bytes(b"fine\ncaf\xe9\n")
        with pytest.raises(SystemExit, match=r"corpus\.txt:2: not UTF-8"):
            T.main(["train", f"--corpus={corpus}", f"--out={tmp_path / 'x.tiktoken'}"])
        T.main(["stats", f"--ranks={new}", f"--texts={tmp_path / 'bundled.tiktoken'}"])
        assert "vocab size (n_vocab): 272" in capsys.readouterr().out
        with pytest.raises(SystemExit, match=r"nope\.tiktoken: file not found"):
            T.main(["stats", f"--ranks={tmp_path / 'nope.tiktoken'}"])
        with pytest.raises(SystemExit, match=r"vocab_size=100 is smaller than 256 bytes \+ 28 special"):
            T.main(["train", f"--corpus={tmp_path / 'bundled.tiktoken'}", "--vocab_size=100", "--overwrite"])
    finally:
        T.get_tokenizer.cache_clear()
