"""The time machine data: the book's preprocessing, vocabulary, iterators, and the loader's
sources and SHA-1 check. No network: the download is replaced by a stub."""
import random
import urllib.error

import pytest
import torch

from gru_fused import data


# Properties of the fixed text (SHA-1 090b5e7e...), computed once with the book's code.
NUM_LINES = 3221
FIRST_LINE = "the time machine by h g wells"
NUM_CHAR_TOKENS = 170580
IDX_TO_TOKEN = ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h", "r", "d", "l", "m",
                "u", "c", "f", "w", "g", "y", "p", "b", "v", "k", "x", "z", "j", "q"]
FIRST_INDICES = [3, 9, 2, 1, 3, 5, 13, 2, 1, 13]  # "the time m"
SUM_FULL, SUM_10000 = 1222010, 72424


@pytest.fixture
def no_env_no_cache(monkeypatch, tmp_path):
    """No $GRU_FUSED_DATA and an empty cache; the download fails unless a test stubs it."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, timeout=30.0):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(data, "_fetch", offline)
    return tmp_path / "cache" / "gru_fused" / data.FILENAME


# --- Preprocessing and vocabulary -------------------------------------------------------

def test_preprocess_replaces_runs_of_non_letters_strips_and_lowercases():
    lines = ["The Time-Machine, 1895!\n", "  It's   --ok--  \n", "\n", "42\n"]
    assert data.preprocess_lines(lines) == ["the time machine", "it s ok", "", ""]


def test_vocab_orders_by_frequency_with_stable_ties_and_unk_first():
    vocab = data.Vocab(data.tokenize(["baab", "c d"], "char"))
    # b and a both occur twice: first seen first; then ' ', c, d once each.
    assert vocab.idx_to_token == ["<unk>", "b", "a", "c", " ", "d"]
    assert vocab["a"] == 2 and vocab["zzz"] == vocab.unk == 0
    assert vocab[["c", "?"]] == [3, 0]
    assert vocab.to_tokens([1, 2]) == ["b", "a"]


def test_vocab_min_freq_and_reserved_tokens():
    vocab = data.Vocab(list("aaabbc"), min_freq=2, reserved_tokens=["<pad>"])
    assert vocab.idx_to_token == ["<unk>", "<pad>", "a", "b"]


def test_read_time_machine_lines(text_path):
    lines = data.read_time_machine(text_path)
    assert len(lines) == NUM_LINES
    assert lines[0] == FIRST_LINE
    assert all(line == line.strip().lower() for line in lines)
    assert set("".join(lines)) <= set(" abcdefghijklmnopqrstuvwxyz")


def test_corpus_and_vocabulary_of_the_book(text_path):
    corpus, vocab = data.load_corpus_time_machine(path=text_path)
    assert len(vocab) == 28
    assert vocab.idx_to_token == IDX_TO_TOKEN
    assert len(corpus) == NUM_CHAR_TOKENS
    assert corpus[:10] == FIRST_INDICES
    assert sum(corpus) == SUM_FULL
    cut, cut_vocab = data.load_corpus_time_machine(10000, path=text_path)
    # Only the corpus is cut; the vocabulary comes from the whole text.
    assert len(cut) == 10000 and cut == corpus[:10000] and sum(cut) == SUM_10000
    assert cut_vocab.idx_to_token == IDX_TO_TOKEN


def test_load_data_time_machine_defaults(text_path):
    train_iter, vocab = data.load_data_time_machine(32, 35, path=text_path)
    assert len(vocab) == 28 and len(train_iter.corpus) == 10000
    assert train_iter.data_iter_fn is data.seq_data_iter_sequential
    random.seed(0)
    batches = list(train_iter)
    # (10000 - offset - 1) // 32 * 32 tokens per row block; offset <= 35 -> 311 or 312
    # columns -> 8 minibatches of 35 steps.
    assert len(batches) == 8
    assert all(X.shape == Y.shape == (32, 35) and X.dtype == torch.int64 for X, Y in batches)
    random_iter, _ = data.load_data_time_machine(32, 35, use_random_iter=True, path=text_path)
    assert random_iter.data_iter_fn is data.seq_data_iter_random


# --- The two iterators (the book's toy sequence: 0..34, batch 2, 5 steps) ---------------

def test_seq_data_iter_random_shapes_offsets_and_targets():
    corpus = list(range(35))
    offsets = set()
    for seed in range(200):
        random.seed(seed)
        batches = list(data.seq_data_iter_random(corpus, batch_size=2, num_steps=5))
        starts = [int(x) for X, _ in batches for x in X[:, 0]]
        offset = starts[0] % 5
        offsets.add(offset)
        # Every subsequence starts on the partition of the offset, none twice.
        assert all(s % 5 == offset for s in starts) and len(set(starts)) == len(starts)
        num_subseqs = (35 - offset - 1) // 5
        assert len(batches) == num_subseqs // 2
        for X, Y in batches:
            assert X.shape == Y.shape == (2, 5)
            assert torch.equal(Y, X + 1)
            assert torch.equal(X[:, 1:] - X[:, :-1], torch.ones(2, 4, dtype=torch.int64))
    assert offsets == set(range(5))  # random.randint(0, num_steps - 1)


def test_seq_data_iter_sequential_shapes_offsets_and_continuity():
    corpus = list(range(35))
    offsets = set()
    for seed in range(200):
        random.seed(seed)
        batches = list(data.seq_data_iter_sequential(corpus, batch_size=2, num_steps=5))
        offset = int(batches[0][0][0, 0])
        offsets.add(offset)
        row_len = (35 - offset - 1) // 2
        assert len(batches) == row_len // 5
        for i, (X, Y) in enumerate(batches):
            assert X.shape == Y.shape == (2, 5)
            assert torch.equal(Y, X + 1)
            # Row b is one stretch of text cut into consecutive minibatches.
            assert torch.equal(X[:, 0], torch.tensor([offset, offset + row_len]) + 5 * i)
    assert offsets == set(range(6))  # the book's random.randint(0, num_steps)


# --- Where the text comes from, and the SHA-1 check --------------------------------------

def test_explicit_path_is_verified_and_returned(text_path, no_env_no_cache):
    assert data.time_machine_path(text_path) == text_path


def test_env_var_is_used(text_path, no_env_no_cache, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(text_path))
    assert data.time_machine_path() == text_path
    assert len(data.read_time_machine()) == NUM_LINES


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_copy_is_rejected(text_path, no_env_no_cache, tmp_path, damage):
    good = text_path.read_bytes()
    bad = tmp_path / "timemachine.txt"
    if damage == "flip":
        bad.write_bytes(good[:1000] + bytes([good[1000] ^ 1]) + good[1001:])
    else:
        bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(data.DataError, match="SHA-1") as e:
        data.time_machine_path(bad)
    assert "--data" in str(e.value) and data.ENV_VAR in str(e.value)


def test_missing_path_says_how_to_supply(no_env_no_cache, tmp_path):
    with pytest.raises(data.DataError, match="does not exist") as e:
        data.load_corpus_time_machine(path=tmp_path / "nope.txt")
    assert "--data" in str(e.value) and data.ENV_VAR in str(e.value)


def test_download_goes_to_cache_after_sha1_check(text_path, no_env_no_cache, monkeypatch):
    cached = no_env_no_cache
    calls = []

    def fake_fetch(url, timeout=30.0):
        calls.append(url)
        return text_path.read_bytes()

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    assert data.time_machine_path() == cached
    assert calls == [data.URL]
    assert cached.read_bytes() == text_path.read_bytes()
    # A second call uses the cache, not the network.
    assert data.time_machine_path() == cached and len(calls) == 1


def test_bad_download_leaves_no_file(text_path, no_env_no_cache, monkeypatch):
    monkeypatch.setattr(data, "_fetch", lambda url, timeout=30.0: text_path.read_bytes()[:5000])
    with pytest.raises(data.DataError, match="SHA-1"):
        data.time_machine_path()
    assert not no_env_no_cache.parent.exists() or not any(no_env_no_cache.parent.iterdir())


def test_no_network_says_how_to_supply(no_env_no_cache):
    with pytest.raises(data.DataError, match="Could not download") as e:
        data.time_machine_path()
    assert "--data" in str(e.value) and data.ENV_VAR in str(e.value)
    with pytest.raises(data.DataError, match="downloading is off"):
        data.time_machine_path(allow_download=False)


def test_corrupted_cache_is_rejected(no_env_no_cache):
    no_env_no_cache.parent.mkdir(parents=True)
    no_env_no_cache.write_text("not the time machine")
    with pytest.raises(data.DataError, match="Delete"):
        data.time_machine_path()
