"""The time machine data set of "Dive into Deep Learning", as the book prepares it.

The book's character-level language model (sections "Text Preprocessing", "Language
Models and the Dataset", "Gated Recurrent Units") trains on H. G. Wells' The Time
Machine. Everything here follows the book's code (d2l.read_time_machine, tokenize, Vocab,
load_corpus_time_machine, seq_data_iter_random, seq_data_iter_sequential, SeqDataLoader,
load_data_time_machine) so that a run here is the book's run.

Where the text comes from, first match wins:

1. an explicit path: the ``path`` argument (``--data`` on the command lines);
2. the environment variable ``GRU_FUSED_DATA``;
3. the cache, ``$XDG_CACHE_HOME/gru_fused/timemachine.txt`` (``~/.cache/...`` by default);
4. a download from the book's address into the cache.

Whatever the source, the file must have the book's SHA-1; a wrong or truncated file
is refused with a message saying how to supply a good one.
"""
from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
FILENAME = "timemachine.txt"
ENV_VAR = "GRU_FUSED_DATA"

PathLike = Union[str, "os.PathLike[str]"]

_HOW_TO_SUPPLY = (
    f"Download {URL} yourself (SHA-1 {SHA1}) and pass its path with --data PATH, "
    f"or set the environment variable {ENV_VAR}=PATH."
)


class DataError(RuntimeError):
    """The time machine text could not be found, fetched or verified."""


# --- Locating and verifying the file ------------------------------------------------

def cache_dir() -> Path:
    """Where the downloaded text is kept: $XDG_CACHE_HOME/gru_fused or ~/.cache/gru_fused."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "gru_fused"


def sha1_of(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _check(data: bytes, origin: str) -> None:
    digest = sha1_of(data)
    if digest != SHA1:
        raise DataError(
            f"{origin} is not the book's timemachine.txt: SHA-1 {digest} "
            f"({len(data)} bytes), expected {SHA1}. The file is corrupted, truncated or a "
            f"different text. {_HOW_TO_SUPPLY}")


def _verified_file(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise DataError(f"{origin} {path} does not exist or is not a file. {_HOW_TO_SUPPLY}")
    _check(path.read_bytes(), f"{origin} {path}")
    return path


def _fetch(url: str, timeout: float = 30.0) -> bytes:
    """The raw bytes at url (the one network access; tests replace it)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download(dest: Optional[Path] = None, url: str = URL) -> Path:
    """Download the text to dest (the cache by default), verifying its SHA-1 first.

    The file is written under a temporary name and renamed only once verified, so a
    failed or truncated download never leaves a bad file in the cache.
    """
    dest = Path(dest) if dest is not None else cache_dir() / FILENAME
    try:
        data = _fetch(url)
    except (urllib.error.URLError, OSError) as e:  # no network, DNS, HTTP error, timeout
        raise DataError(f"Could not download {url}: {e}. {_HOW_TO_SUPPLY}") from e
    _check(data, f"The download from {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".{os.getpid()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def time_machine_path(path: Optional[PathLike] = None, allow_download: bool = True) -> Path:
    """The verified local path of the text: path, else $GRU_FUSED_DATA, else cache, else download."""
    if path is not None:
        return _verified_file(Path(path).expanduser(), "The data path")
    env = os.environ.get(ENV_VAR)
    if env:
        return _verified_file(Path(env).expanduser(), f"${ENV_VAR} =")
    cached = cache_dir() / FILENAME
    if cached.exists():
        try:
            return _verified_file(cached, "The cached file")
        except DataError as e:
            raise DataError(f"{e} Delete {cached} to download it again.") from None
    if not allow_download:
        raise DataError(f"The time machine text is not in the cache ({cached}) and "
                        f"downloading is off. {_HOW_TO_SUPPLY}")
    return download(cached)


# --- The book's preprocessing -------------------------------------------------------

def preprocess_lines(lines: Sequence[str]) -> List[str]:
    """d2l.read_time_machine's cleaning: each run of non-letters becomes one space,
    then strip and lower-case. Empty lines stay (as empty strings), as in the book."""
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def read_time_machine(path: Optional[PathLike] = None) -> List[str]:
    """The text's lines, cleaned as the book does (d2l.read_time_machine)."""
    with open(time_machine_path(path), "r") as f:
        lines = f.readlines()
    return preprocess_lines(lines)


def tokenize(lines: Sequence[str], token: str = "word") -> List[List[str]]:
    """Split lines into word or character tokens (d2l.tokenize)."""
    if token == "word":
        return [line.split() for line in lines]
    if token == "char":
        return [list(line) for line in lines]
    raise ValueError(f"unknown token type {token!r}: expected 'word' or 'char'")


def count_corpus(tokens) -> collections.Counter:
    """Token frequencies; tokens is a flat list or a list of lines of tokens."""
    if len(tokens) == 0 or isinstance(tokens[0], list):
        tokens = [token for line in tokens for token in line]
    return collections.Counter(tokens)


class Vocab:
    """The book's vocabulary: '<unk>' at index 0, then reserved tokens, then the tokens
    by descending frequency (a stable sort of the Counter's items, so ties keep their
    first-seen order), dropping those rarer than min_freq."""

    def __init__(self, tokens=None, min_freq: int = 0,
                 reserved_tokens: Optional[Sequence[str]] = None):
        tokens = [] if tokens is None else tokens
        reserved_tokens = [] if reserved_tokens is None else list(reserved_tokens)
        counter = count_corpus(tokens)
        self._token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
        self.idx_to_token = ["<unk>"] + reserved_tokens
        self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}
        for token, freq in self._token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.idx_to_token.append(token)
                self.token_to_idx[token] = len(self.idx_to_token) - 1

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        """Index of a token (unk for unknown ones), or a list of indices for a list/tuple."""
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self.unk)
        return [self.__getitem__(token) for token in tokens]

    def to_tokens(self, indices):
        if not isinstance(indices, (list, tuple)):
            return self.idx_to_token[indices]
        return [self.idx_to_token[index] for index in indices]

    @property
    def unk(self) -> int:
        return 0

    @property
    def token_freqs(self):
        return self._token_freqs


def corpus_from_lines(lines: Sequence[str], max_tokens: int = -1) -> Tuple[List[int], Vocab]:
    """Character corpus (token indices) and vocabulary of already-cleaned lines."""
    tokens = tokenize(lines, "char")
    vocab = Vocab(tokens)
    # The book concatenates all lines into one sequence, without separators.
    corpus = [vocab[token] for line in tokens for token in line]
    if max_tokens > 0:
        corpus = corpus[:max_tokens]
    return corpus, vocab


def load_corpus_time_machine(max_tokens: int = -1,
                             path: Optional[PathLike] = None) -> Tuple[List[int], Vocab]:
    """(corpus, vocab) of the time machine at character level (d2l.load_corpus_time_machine).

    The vocabulary is built from the whole text; only the corpus is cut to max_tokens
    (when > 0), as in the book.
    """
    return corpus_from_lines(read_time_machine(path), max_tokens)


# --- The book's minibatch iterators -------------------------------------------------
# Both yield (X, Y), int64 tensors [batch_size, num_steps], Y being X shifted by one
# token. They draw their random offset from Python's `random` module, as the book does,
# so random.seed(...) fixes the batches.

def seq_data_iter_random(corpus: Sequence[int], batch_size: int,
                         num_steps: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Random sampling: subsequences at a random offset, in shuffled order
    (adjacent minibatches are not adjacent in the text)."""
    # Random offset in [0, num_steps - 1], so every partition of the text is reachable.
    corpus = corpus[random.randint(0, num_steps - 1):]
    # Minus 1: the labels are the inputs shifted by one.
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    random.shuffle(initial_indices)

    def data(pos):
        return corpus[pos: pos + num_steps]

    num_batches = num_subseqs // batch_size
    for i in range(0, batch_size * num_batches, batch_size):
        initial_indices_per_batch = initial_indices[i: i + batch_size]
        X = [data(j) for j in initial_indices_per_batch]
        Y = [data(j + 1) for j in initial_indices_per_batch]
        yield torch.tensor(X), torch.tensor(Y)


def seq_data_iter_sequential(corpus: Sequence[int], batch_size: int,
                             num_steps: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Sequential partitioning: row b of consecutive minibatches continues the same
    stretch of text, so the state can be carried from one minibatch to the next."""
    # The book's offset is in [0, num_steps] here (randint is inclusive), one more than
    # seq_data_iter_random's; kept as is so that seeded runs draw the book's numbers.
    offset = random.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = torch.tensor(corpus[offset: offset + num_tokens])
    Ys = torch.tensor(corpus[offset + 1: offset + 1 + num_tokens])
    Xs, Ys = Xs.reshape(batch_size, -1), Ys.reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        X = Xs[:, i: i + num_steps]
        Y = Ys[:, i: i + num_steps]
        yield X, Y


class SeqDataLoader:
    """Iterable over the time machine's minibatches; a fresh random offset each epoch."""

    def __init__(self, batch_size: int, num_steps: int, use_random_iter: bool,
                 max_tokens: int, path: Optional[PathLike] = None):
        self.data_iter_fn = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
        self.corpus, self.vocab = load_corpus_time_machine(max_tokens, path)
        self.batch_size, self.num_steps = batch_size, num_steps

    def __iter__(self):
        return self.data_iter_fn(self.corpus, self.batch_size, self.num_steps)


def load_data_time_machine(batch_size: int, num_steps: int, use_random_iter: bool = False,
                           max_tokens: int = 10000,
                           path: Optional[PathLike] = None) -> Tuple[SeqDataLoader, Vocab]:
    """(iterator, vocab) for the time machine (d2l.load_data_time_machine)."""
    data_iter = SeqDataLoader(batch_size, num_steps, use_random_iter, max_tokens, path)
    return data_iter, data_iter.vocab
