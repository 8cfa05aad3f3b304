"""The book's training loop with each of the four GRUs: it learns, the fused versions
follow their references step by step, and the command line runs end to end."""
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gru_fused import data, train

ROOT = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CPU, large enough that a few epochs visibly learn.
HIDDEN = 32
EPOCHS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these steps are tiny, and on a small machine that is busy
    with other work, a 2-thread parallel region per time step waits on a descheduled
    thread and runs tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def book_data(text_path):
    return data.load_data_time_machine(32, 35, path=text_path)


def _train_losses(impl, book_data, epochs=2, seed=0):
    """Per-minibatch losses of a seeded run: same seed, same weights and same batches."""
    train_iter, vocab = book_data
    net = train.make_net(impl, len(vocab), HIDDEN, "cpu", seed)
    random.seed(seed)
    losses = []
    train.train(net, train_iter, vocab, lr=1.0, num_epochs=epochs, device="cpu",
                progress=False, step_losses=losses)
    return losses


@pytest.mark.parametrize("impl", train.IMPLS)
def test_short_run_lowers_perplexity(impl, text_path):
    record = train.run(impl, epochs=EPOCHS, num_hiddens=HIDDEN, device="cpu",
                       data_path=text_path, progress=False)
    ppl = record["history"]["perplexity"]
    assert len(ppl) == EPOCHS
    # Uniform guessing over 28 tokens is perplexity 28; the first epoch is near that.
    assert ppl[-1] < ppl[0] < 28.5
    assert ppl[-1] < 21
    assert record["tokens_per_sec"] > 0
    for prefix in train.PREFIXES:
        text = record["predictions"][prefix]
        assert text.startswith(prefix) and len(text) == len(prefix) + train.NUM_PREDS


@pytest.mark.parametrize("fused, ref", [("fused", "nn"), ("fused_scratch", "scratch")])
def test_same_weights_same_losses_step_by_step(fused, ref, book_data):
    vocab_size = len(book_data[1])
    a = train.make_net(fused, vocab_size, HIDDEN, "cpu", seed=3)
    b = train.make_net(ref, vocab_size, HIDDEN, "cpu", seed=3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)

    fused_losses = _train_losses(fused, book_data)
    ref_losses = _train_losses(ref, book_data)
    assert len(fused_losses) == len(ref_losses) == 16
    # float32 with different summation orders: observed differences are ~1e-7 relative
    # over these 16 SGD steps (lr 1, clipped); a formula or gradient error shows up as
    # 1e-3 or more from the first steps on.
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(ref_losses),
                               rtol=1e-5, atol=0)


def test_grad_clipping_scales_to_theta():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    params[0].grad = torch.full((3,), 2.0)
    params[1].grad = torch.full((4,), 2.0)

    class Net:
        pass

    net = Net()
    net.params = params
    train.grad_clipping(net, 1.0)  # norm was 2 * sqrt(7)
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    torch.testing.assert_close(norm, torch.tensor(1.0))
    train.grad_clipping(net, 5.0)  # already below theta: unchanged
    torch.testing.assert_close(norm, torch.sqrt(sum((p.grad ** 2).sum() for p in params)))


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="fused_scratch"):
        train.make_net("cudnn", 28, 8, "cpu")


def test_cli_bad_data_path_exits_with_advice(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--impl", "nn", "--epochs", "1", "--data", str(tmp_path / "missing.txt"),
                    "--out", str(tmp_path / "runs"), "--no-progress"])
    # A bad --data is an argument error: exit status 2, argparse's message, and data.py's
    # advice (which says how to pass --data).
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m gru_fused.train: error: argument --data: ")
    assert "missing.txt" in err and "--data PATH" in err
    assert not (tmp_path / "runs").exists()


def test_cli_end_to_end(tmp_path, text_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "gru_fused.train", "--impl", "fused", "--epochs", "2",
           "--hidden", "16", "--sample-every", "1", "--data", str(text_path),
           "--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "tokens/sec" in proc.stdout
    assert "time traveller" in proc.stdout
    records = list(out.glob("train-fused-*.json"))
    assert len(records) == 1 and len(list(out.glob("train-fused-*.png"))) == 1
    record = json.loads(records[0].read_text())
    assert record["impl"] == "fused" and record["config"]["num_hiddens"] == 16
    assert len(record["history"]["perplexity"]) == 2 and len(record["samples"]) == 2
    assert record["environment"]["threads"] == 1


# --- The command line refuses bad arguments before any work (exit status 2) -----------

def _no_training(*args, **kwargs):
    raise AssertionError("training started despite a bad argument")


# (extra arguments, the argument the message must name, other text it must contain):
# the arguments train.py and benchmarks/bench.py share (test_bench.py uses these too).
COMMON_BAD_ARGS = [
    (["--epochs", "-1"], "--epochs", ">= 1"),
    (["--epochs", "0"], "--epochs", ">= 1"),
    (["--batch-size", "0"], "--batch-size", ">= 1"),
    (["--batch-size", "-3"], "--batch-size", ">= 1"),
    # 10000 tokens, 35 steps: (B + 1) * 35 + 1 <= 10000 holds up to B = 284.
    (["--batch-size", "20000"], "--batch-size", "<= 284"),
    (["--num-steps", "0"], "--num-steps", ">= 1"),
    # 10000 tokens, batch 32: 33 * T + 1 <= 10000 holds up to T = 303.
    (["--num-steps", "20000"], "--num-steps", "<= 303"),
    (["--max-tokens", "5"], "--max-tokens", "at least 1156 tokens"),
    (["--hidden", "0"], "--hidden", ">= 1"),
    (["--lr", "0"], "--lr", "> 0"),
    (["--lr", "nan"], "--lr", "> 0"),
    (["--threads", "0"], "--threads", ">= 1"),
    (["--device", "nonsense"], "--device", "nonsense"),
]

BAD_TRAIN_ARGS = COMMON_BAD_ARGS + [
    # Random minibatches need (B + 1) * T tokens: 100 // 20 - 1 = 4.
    (["--random-iter", "--max-tokens", "100", "--num-steps", "20", "--batch-size", "5"],
     "--batch-size", "<= 4"),
    (["--lr", "-0.5"], "--lr", "> 0"),
    (["--lr", "inf"], "--lr", "> 0"),
    (["--sample-every", "-1"], "--sample-every", ">= 0"),
    (["--mode", "fast"], "--mode", "invalid choice: 'fast'"),
    (["--compile", "--cuda-graphs"], "--cuda-graphs", "not allowed with argument --compile"),
    (["--mode", "book", "--compile"], "--compile", "not allowed with argument --mode"),
]


@pytest.mark.parametrize("use_random_iter", [False, True], ids=["sequential", "random"])
def test_minibatch_problem_matches_the_iterators(use_random_iter, monkeypatch):
    """minibatch_problem says None exactly when data.py's iterator yields a minibatch
    whatever its random offset, and the bounds it names are the largest that work."""
    iterator = data.seq_data_iter_random if use_random_iter else data.seq_data_iter_sequential
    for n in range(0, 40):
        corpus = list(range(n))
        for batch_size in range(1, 8):
            for num_steps in range(1, 8):
                offsets = range(num_steps) if use_random_iter else range(num_steps + 1)
                yields = []
                for offset in offsets:
                    monkeypatch.setattr(random, "randint", lambda a, b, offset=offset: offset)
                    try:
                        yields.append(any(True for _ in iterator(corpus, batch_size, num_steps)))
                    except RuntimeError:  # a reshape of too few tokens
                        yields.append(False)
                problem = train.minibatch_problem(n, batch_size, num_steps, use_random_iter)
                assert (problem is None) == all(yields), (n, batch_size, num_steps, problem)
                for arg, bound in re.findall(r"(--batch-size|--num-steps)(?: must be)? <= (\d+)",
                                             problem or ""):
                    b, t = ((int(bound), num_steps) if arg == "--batch-size"
                            else (batch_size, int(bound)))
                    assert train.minibatch_problem(n, b, t, use_random_iter) is None
                    assert train.minibatch_problem(n, b + (arg == "--batch-size"),
                                                   t + (arg == "--num-steps"),
                                                   use_random_iter) is not None


def _assert_refused(main, argv, arg, text, capsys, prog):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert time.perf_counter() - start < 5
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # argparse's usage lines, then one line with the error.
    assert err[-1].startswith(f"{prog}: error: argument {arg}: "), err[-1]
    assert text in err[-1], err[-1]


@pytest.mark.parametrize("extra, arg, text", BAD_TRAIN_ARGS,
                         ids=[" ".join(a[0]) for a in BAD_TRAIN_ARGS])
def test_cli_bad_argument_exits_2_before_any_work(extra, arg, text, tmp_path, text_path,
                                                  capsys, monkeypatch):
    monkeypatch.setattr(train, "run", _no_training)
    monkeypatch.setattr(train, "train", _no_training)
    out = tmp_path / "runs"
    argv = ["--impl", "nn", "--data", str(text_path), "--out", str(out), "--no-progress",
            *extra]
    _assert_refused(train.main, argv, arg, text, capsys, "python -m gru_fused.train")
    assert not out.exists()  # nothing written, not even the directory


def _unusable_out_dirs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    return {"existing file": a_file, "parent is a file": a_file / "runs"}


@pytest.mark.parametrize("case", ["existing file", "parent is a file"])
def test_cli_unusable_out_exits_2_before_the_run(case, tmp_path, text_path, capsys,
                                                 monkeypatch):
    monkeypatch.setattr(train, "run", _no_training)
    out = _unusable_out_dirs(tmp_path)[case]
    argv = ["--impl", "nn", "--epochs", "1", "--data", str(text_path), "--out", str(out),
            "--no-progress"]
    _assert_refused(train.main, argv, "--out", str(out), capsys, "python -m gru_fused.train")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_cli_read_only_out_exits_2_before_the_run(tmp_path, text_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "run", _no_training)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = ["--impl", "nn", "--data", str(text_path), "--out", str(locked / "runs"),
                "--no-progress"]
        _assert_refused(train.main, argv, "--out", "runs", capsys, "python -m gru_fused.train")
    finally:
        locked.chmod(0o755)


def test_cli_creates_out_before_the_run(tmp_path, text_path, monkeypatch):
    out = tmp_path / "new" / "runs"
    seen = []

    def fake_run(*args, **kwargs):
        seen.append(out.is_dir())
        raise KeyboardInterrupt  # stop here: only the order matters

    monkeypatch.setattr(train, "run", fake_run)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--impl", "nn", "--data", str(text_path), "--out", str(out),
                    "--no-progress"])
    assert seen == [True]


def test_cli_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 500)", "(default: 32)", "(default: 35)", "(default: 1.0)",
                    "(default: runs)", "(default: fused)", "(default: eager)"):
        assert default in help_text


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_record_never_holds_nan(tmp_path):
    path = tmp_path / "record.json"
    train.write_json(path, {"perplexity": float("nan"), "speed": [1.5, float("inf")],
                            "nested": {"x": -float("inf")}, "n": 3})
    assert _strict_json(path.read_text()) == {"perplexity": None, "speed": [1.5, None],
                                              "nested": {"x": None}, "n": 3}


def test_cli_tiny_run_writes_strict_json(tmp_path, text_path, capsys):
    out = tmp_path / "runs"
    train.main(["--impl", "nn", "--epochs", "1", "--max-tokens", "2000", "--hidden", "16",
                "--sample-every", "0", "--device", "cpu", "--data", str(text_path),
                "--out", str(out), "--no-progress"])
    [record_path] = out.glob("train-nn-*.json")
    record = _strict_json(record_path.read_text())
    assert record["config"]["epochs"] == 1 and record["config"]["max_tokens"] == 2000
    assert len(record["history"]["perplexity"]) == 1
    assert record["perplexity"] > 0
