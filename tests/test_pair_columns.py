"""Pair files at scale: the column reader (member offsets), the user index, block-wise validation, the streaming
writer and generator, and nodes that read only their sampled users' rows."""

import numpy as np
import pytest

from lore_core.pair_columns import (PairColumns, PairIndex, check_pair_file, pair_file_writer, rows_of_users,
                                    user_blocks)
from lore_core.pairs import PairFileError, PairSet, load_pairs, save_pairs
from simulations import synthetic_pairs
from simulations.synthetic_pairs import SyntheticPairsConfig, make_synthetic_pairs, write_synthetic_pairs

SMALL = SyntheticPairsConfig(dim=6, true_rank=2, seen_users=9, unseen_users=4, train_pairs=(2, 5), test_pairs=3)


@pytest.fixture()
def pairs():
    return make_synthetic_pairs(SMALL)[0]


def _arrays(p: PairSet) -> dict:
    return {"diff": p.diff, "user": p.user, "split": p.split, "seen": p.seen, "logit_true": p.logit_true}


def test_columns_are_read_at_their_offsets_in_savez_and_savez_compressed_files(tmp_path, pairs):
    np.savez(tmp_path / "plain.npz", **_arrays(pairs))
    np.savez_compressed(tmp_path / "packed.npz", **_arrays(pairs))
    rows = np.array([0, 3, 4, 20, pairs.n - 1])
    for name in ("plain.npz", "packed.npz"):
        columns = PairColumns.open(tmp_path / name)
        assert (columns.n, columns.dim) == (pairs.n, SMALL.dim)
        for key, value in _arrays(pairs).items():
            np.testing.assert_array_equal(columns.read(key, 5, 17), value[5:17])
            np.testing.assert_array_equal(columns.take(key, rows), value[rows])


def test_header_problems_name_the_file(tmp_path, pairs):
    arrays = _arrays(pairs)
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in arrays.items() if k != "seen"})
    np.savez(tmp_path / "short.npz", **{**arrays, "user": arrays["user"][:-1]})
    np.savez(tmp_path / "objects.npz", **{**arrays, "user": arrays["user"].astype(object)}, allow_pickle=True)
    (tmp_path / "garbage.npz").write_bytes(b"PK not really a zip")
    for name, message in (("missing", "missing required arrays"), ("short", "user must have shape"),
                          ("objects", "pickled"), ("garbage", "unreadable .npz")):
        with pytest.raises(PairFileError, match=f"{name}.npz.*{message}"):
            PairColumns.open(tmp_path / f"{name}.npz")


@pytest.mark.parametrize("group_of", [lambda g: g[:-3], lambda g: np.concatenate([g, g[:3]]), lambda g: g[0]],
                         ids=["shorter", "longer", "0-d"])
def test_a_group_array_not_one_per_pair_is_refused_by_every_reader(tmp_path, pairs, group_of):
    """Found by a tester: the streamed reader (`simulate`) took a short group to an IndexError and a long one
    silently, while `load_pairs` (`train`) refused both."""
    group = np.array([f"g{i // 3}" for i in range(pairs.n)])
    np.savez(tmp_path / "bad.npz", **_arrays(pairs), group=group_of(group))
    for read in (load_pairs, check_pair_file):
        with pytest.raises(PairFileError, match=rf"bad.npz: group must have shape \({pairs.n},\) like diff"):
            read(tmp_path / "bad.npz")


def test_index_cuts_each_users_rows_in_sorted_and_shuffled_files(tmp_path, pairs):
    order = np.random.default_rng(1).permutation(pairs.n)
    np.savez(tmp_path / "shuffled.npz", **{k: v[order] for k, v in _arrays(pairs).items()})
    sorted_index = PairIndex.build(PairColumns.open(save_pairs(pairs, tmp_path / "sorted.npz")), chunk_rows=7)
    shuffled = PairColumns.open(tmp_path / "shuffled.npz")
    shuffled_index = PairIndex.build(shuffled, chunk_rows=7)
    assert sorted_index.order is None and shuffled_index.order is not None
    np.testing.assert_array_equal(sorted_index.user_ids, np.unique(pairs.user))
    np.testing.assert_array_equal(shuffled_index.user_ids, sorted_index.user_ids)
    for first, stop in ((0, 1), (3, 8), (12, 13)):
        mine = np.isin(pairs.user, sorted_index.user_ids[first:stop])
        np.testing.assert_array_equal(sorted_index.rows(first, stop), np.flatnonzero(mine))
        got = shuffled.take("diff", np.sort(shuffled_index.rows(first, stop)))
        np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(pairs.diff[mine], axis=0))


def test_rows_of_users_follow_the_offsets():
    starts = np.array([0, 2, 2, 5, 9])
    rows, owner = rows_of_users(starts, np.array([3, 0, 1]))
    assert rows.tolist() == [5, 6, 7, 8, 0, 1] and owner.tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("damage, message", [
    (lambda a: a["diff"].__setitem__((-3, 1), np.inf), "NaN or Inf"),
    (lambda a: a["seen"].__setitem__(-2, ~a["seen"][-2]), "both seen and unseen"),
    (lambda a: a.__setitem__("split", np.where(np.arange(a["split"].size) == 40, "val", a["split"])), "'train' or"),
])
def test_block_wise_validation_finds_a_fault_in_any_block(tmp_path, pairs, damage, message):
    arrays = {k: v.copy() for k, v in _arrays(pairs).items()}
    damage(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(PairFileError, match=f"bad.npz: .*{message}"):
        check_pair_file(tmp_path / "bad.npz", rows_per_block=10)


def test_block_wise_validation_counts_the_population(tmp_path, pairs):
    _, _, counts = check_pair_file(save_pairs(pairs, tmp_path / "p.npz"), rows_per_block=10)
    assert (counts.users, counts.seen_users, counts.train_users, counts.pairs) == (13, 9, 9, pairs.n)
    assert counts.largest_client_pairs == max(np.unique(pairs.user[pairs.seen & (pairs.split == "train")],
                                                        return_counts=True)[1])


def test_user_blocks_never_cut_a_user(tmp_path, pairs):
    columns = PairColumns.open(save_pairs(pairs, tmp_path / "p.npz"))
    blocks = list(user_blocks(columns, PairIndex.build(columns), rows_per_block=10))
    assert len(blocks) > 3
    users = [set(b.user.tolist()) for _, _, b in blocks]
    assert sum(len(u) for u in users) == len(set().union(*users)) == 13


def test_writer_streams_columns_and_leaves_nothing_on_failure(tmp_path, pairs):
    target = tmp_path / "out.npz"
    with pair_file_writer(target) as out:
        with out.column("diff", np.float32, pairs.diff.shape) as diff:
            for start in range(0, pairs.n, 7):
                diff.write(pairs.diff[start:start + 7])
        for name in ("user", "split", "seen", "logit_true"):
            out.array(name, getattr(pairs, name))
    loaded = load_pairs(target)
    np.testing.assert_array_equal(loaded.diff, pairs.diff)
    np.testing.assert_array_equal(loaded.user, pairs.user)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="rows written"):
        with pair_file_writer(target) as out:
            with out.column("diff", np.float32, pairs.diff.shape) as diff:
                diff.write(pairs.diff[:5])
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_writer_writes_a_0d_embedder_that_both_readers_read(tmp_path, pairs):
    target = tmp_path / "e.npz"
    with pair_file_writer(target) as out:
        for name in ("diff", "user", "split", "seen"):
            out.array(name, getattr(pairs, name))
        out.array("embedder", np.str_("gt_minilm@1"))
    with np.load(target) as data:
        assert data["embedder"].shape == ()
    assert load_pairs(target).embedder == "gt_minilm@1" and check_pair_file(target)[0].embedder == "gt_minilm@1"
    columns, index, _ = check_pair_file(target)
    assert {block.embedder for _, _, block in user_blocks(columns, index, rows_per_block=10)} == {"gt_minilm@1"}


def test_streamed_generator_writes_the_in_memory_population(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_pairs, "CHUNK_VALUES", 40)  # many chunks of a few rows
    in_memory, truth = make_synthetic_pairs(SMALL)
    path, streamed_truth = write_synthetic_pairs(SMALL, tmp_path / "s.npz")
    written = load_pairs(path)
    for name in ("diff", "user", "split", "seen", "logit_true"):
        np.testing.assert_array_equal(getattr(written, name), getattr(in_memory, name))
    np.testing.assert_array_equal(streamed_truth.basis, truth.basis)


def test_user_ids_sort_in_index_order_beyond_100000_users():
    ids = synthetic_pairs._draw_population(SyntheticPairsConfig(dim=2, true_rank=1, seen_users=100001,
                                                                unseen_users=0, train_pairs=(1, 1),
                                                                test_pairs=1))[0].user_ids
    assert ids[-1] == "user100000" and np.all(ids[1:] > ids[:-1])


def test_generator_command_writes_a_file(tmp_path):
    assert synthetic_pairs.main(["--seen-users", "5", "--dim", "4", "--true-rank", "2", "--train-pairs", "2-3",
                                 "--test-pairs", "2", "--out", str(tmp_path / "g.npz")]) == 0
    summary = load_pairs(tmp_path / "g.npz").summary()
    assert (summary["seen_users"], summary["unseen_users"], summary["dim"]) == (5, 0, 4)


def test_a_damaged_byte_that_still_reads_as_a_number_is_caught_by_the_checksum(tmp_path, pairs):
    path = save_pairs(pairs, tmp_path / "p.npz")
    columns = PairColumns.open(path)
    offset = columns._members["diff"].offset + 4 * 7 + 1  # inside one float32 of diff: still a finite number
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    assert np.isfinite(PairColumns.open(path).read("diff")).all()
    with pytest.raises(PairFileError, match="p.npz: unreadable .npz, damaged .*CRC-32 of array 'diff'.*expected"):
        check_pair_file(path)


def test_a_big_endian_pair_file_is_read_in_native_byte_order_by_every_reader(tmp_path, pairs):
    """numpy writes big-endian arrays (`.astype('>f4')`) and torch refuses them: `train` failed after validation with
    a message naming no file. Every reader converts them (exactly), so train learns the same basis as from the file
    in native order."""
    from lore_cli.main import main
    from lore_core.basis_file import load_basis

    arrays = _arrays(pairs)
    np.savez(tmp_path / "native.npz", **arrays)
    np.savez(tmp_path / "big.npz", **{key: a.astype(a.dtype.newbyteorder(">")) for key, a in arrays.items()})
    loaded = load_pairs(tmp_path / "big.npz")
    columns = check_pair_file(tmp_path / "big.npz")[0]
    rows = np.array([0, 3, pairs.n - 1])
    for key, value in arrays.items():
        for array, expected in ((getattr(loaded, key), value), (columns.read(key, 2, 9), value[2:9]),
                                (columns.mapped(key, 2, 9), value[2:9]), (columns.take(key, rows), value[rows])):
            assert array.dtype.isnative
            np.testing.assert_array_equal(array, expected)
    bases = []
    for name in ("native", "big"):
        assert main(["train", str(tmp_path / f"{name}.npz"), "--rank", "1", "--objective", "joint",
                     "--out", str(tmp_path / f"run-{name}")]) == 0
        bases.append(load_basis(tmp_path / f"run-{name}" / "basis.npz").basis)
    np.testing.assert_array_equal(*bases)


def test_a_column_major_diff_is_read_row_by_row_by_every_reader(tmp_path, pairs):
    """`np.asfortranarray(diff)` saved with np.savez is a valid file (evaluate read it); train and simulate called it
    "damaged or truncated" and advised np.savez, which writes the same layout. Every reader now reads its rows."""
    from lore_cli.main import main

    arrays = _arrays(pairs)
    np.savez(tmp_path / "fortran.npz", **{**arrays, "diff": np.asfortranarray(arrays["diff"])})
    columns = check_pair_file(tmp_path / "fortran.npz")[0]  # what simulate validates with
    rows = np.array([0, 3, pairs.n - 1])
    for array, expected in ((load_pairs(tmp_path / "fortran.npz").diff, arrays["diff"]),
                            (columns.read("diff", 2, 9), arrays["diff"][2:9]),
                            (columns.mapped("diff", 2, 9), arrays["diff"][2:9]),
                            (columns.take("diff", rows), arrays["diff"][rows])):
        assert array.flags.c_contiguous
        np.testing.assert_array_equal(array, expected)
    assert main(["train", str(tmp_path / "fortran.npz"), "--rank", "1", "--objective", "joint",
                 "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("variant", ["stored", "deflated", "npy 2.0", "npy 3.0", "no .npy suffix"])
def test_a_header_claiming_more_rows_than_the_file_holds_is_refused_by_every_reader(tmp_path, pairs, variant):
    """A tester: an uncompressed file whose `diff.npy` header says (1e9, 384) made `evaluate` fail with a MemoryError
    traceback for 1.4 TiB (numpy allocates the header's size first); `train` and `simulate` refused it by name. A
    reviewer: so did a deflated member in train and simulate's reader, and a member without the .npy suffix or with
    a 3.0 header in evaluate's."""
    import io
    import zipfile

    from lore_core.basis_file import BasisFileError, load_basis, save_basis

    arrays = _arrays(pairs)
    np.savez(tmp_path / "ok.npz", **arrays)
    header = io.BytesIO()
    fields = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 384)}
    if variant in ("npy 2.0", "npy 3.0"):
        np.lib.format.write_array_header_2_0(header, fields)
        if variant == "npy 3.0":
            header = io.BytesIO(b"\x93NUMPY\x03\x00" + header.getvalue()[8:])
    else:
        np.lib.format.write_array_header_1_0(header, fields)
    compression = zipfile.ZIP_DEFLATED if variant == "deflated" else zipfile.ZIP_STORED
    with zipfile.ZipFile(tmp_path / "ok.npz") as source, \
            zipfile.ZipFile(tmp_path / "huge.npz", "w", compression) as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "diff.npy":
                data = header.getvalue() + data[128:]
                name = "diff" if variant == "no .npy suffix" else name
            target.writestr(name, data)
    for read in (load_pairs, check_pair_file):  # the columns reader reads .npy members only: `diff` is missing
        with pytest.raises(PairFileError, match=r"huge.npz.*('diff' is truncated|missing required arrays \['diff'\])"):
            read(tmp_path / "huge.npz")
    save_basis(tmp_path / "basis.npz", np.ones((2, 384)), version=1, embedder="toy")  # another reader
    with zipfile.ZipFile(tmp_path / "basis.npz") as source, zipfile.ZipFile(tmp_path / "b.npz", "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, header.getvalue() + data[128:] if name == "basis.npy" else data)
    with pytest.raises(BasisFileError, match="b.npz.*'basis' is truncated"):
        load_basis(tmp_path / "b.npz")
