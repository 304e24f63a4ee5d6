"""Segment logs against a dict oracle: puts, deletes, checkpoints, merges, reloads, and the reads a
query makes (positional reads that map nothing into the process)."""

from pathlib import Path

import numpy as np

from indexer.storage.segments import SegmentLog, plan_merge


def check(log: SegmentLog, oracle: dict) -> None:
    ids, rows = log.all_rows()
    assert ids.tolist() == sorted(oracle)
    if len(ids):
        np.testing.assert_array_equal(rows, np.stack([oracle[i] for i in ids.tolist()]))
    probe = np.array(sorted(oracle)[:7] + [10**9], np.int64)
    mask, got = log.get(probe[::-1])
    assert mask.tolist() == [i in oracle for i in probe[::-1].tolist()]
    np.testing.assert_array_equal(got, np.stack([oracle[i] for i in probe[::-1].tolist() if i in oracle]))


def test_random_changes_checkpoints_and_merges_match_a_dict(tmp_path):
    rng = np.random.default_rng(0)
    log, oracle, number = SegmentLog(tmp_path, "images", 6), {}, 1
    for step in range(40):
        put = rng.choice(400, size=rng.integers(12, 30), replace=False)
        rows = rng.standard_normal((len(put), 6)).astype(np.float32)
        log.put(put, rows)
        oracle.update({int(i): r for i, r in zip(put, rows)})
        gone = rng.choice(400, size=rng.integers(0, 4), replace=False)
        log.delete(gone)
        for i in gone.tolist():
            oracle.pop(i, None)
        check(log, oracle)  # pending changes included
        log.write_pending(number)
        number += 1
        while (run := plan_merge(log.live_sizes())) is not None:
            log.merge(*run, number)
            number += 1
        check(log, oracle)
    assert len(log.segments) < 40  # merged
    again = SegmentLog.load(tmp_path, "images", 6, np.float32, log.segments)
    check(again, oracle)


def test_tail_helpers_see_only_the_later_segments(tmp_path):
    log = SegmentLog(tmp_path, "images", 2)
    log.put(np.arange(1, 11), np.ones((10, 2), np.float32))
    log.write_pending(1)
    log.put(np.array([3, 20]), np.zeros((2, 2), np.float32))
    log.delete(np.array([4]))
    log.write_pending(2)
    assert log.live_in(1).tolist() == [3, 20]
    assert log.mentioned_in(1).tolist() == [3, 4, 20]
    got = {int(i): r.tolist() for ids, rows in log.chunks(start=1) for i, r in zip(ids, rows)}
    assert got == {3: [0.0, 0.0], 20: [0.0, 0.0]}
    head = [int(i) for ids, _ in log.chunks(size=3) for i in ids if i in (1, 2, 5)]
    assert sorted(head) == [1, 2, 5]
    assert log.present(np.array([3, 4, 20, 99])).tolist() == [True, False, True, False]


def test_reading_rows_maps_nothing_into_the_process(tmp_path):
    log = SegmentLog(tmp_path, "memories", 4096, np.uint8)
    log.put(np.arange(1, 201), np.random.default_rng(0).integers(0, 255, (200, 4096), dtype=np.uint8))
    log.write_pending(1)
    log = SegmentLog.load(tmp_path, "memories", 4096, np.uint8, log.segments)
    mask, rows = log.get(np.array([5, 150, 77]))
    assert mask.all() and rows.shape == (3, 4096)
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert "memories-00000001.rows.npy" not in maps.read_text()


def test_a_truncated_segment_is_a_clear_error(tmp_path):
    import pytest

    from indexer.errors import IndexCorruptError

    log = SegmentLog(tmp_path, "images", 8)
    log.put(np.arange(1, 101), np.ones((100, 8), np.float32))
    info = log.write_pending(1)
    rows = tmp_path / "images-00000001.rows.npy"
    with open(rows, "r+b") as fh:
        fh.truncate(rows.stat().st_size - 64)
    with pytest.raises(IndexCorruptError, match="images-00000001.rows.npy"):
        again = SegmentLog.load(tmp_path, "images", 8, np.float32, [info])
        again.get(np.array([100]))


def test_a_loaded_reader_keeps_reading_after_a_writer_deletes_old_segments(tmp_path):
    """A search that loaded generation N reads its rows even after the writer has committed twice more
    and collected N's files (the race the concurrent-search test once hit: files opened on first read)."""
    rows = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    writer = SegmentLog(tmp_path, "images", 8)
    writer.put(np.arange(1, 51), rows)
    writer.write_pending(1)
    reader = SegmentLog.load(tmp_path, "images", 8, np.float32, writer.segments)  # nothing read yet
    for path in tmp_path.glob("images-00000001.*"):
        path.unlink()  # what garbage collection does once two newer generations are committed
    mask, got = reader.get(np.array([3, 40, 7]))
    assert mask.all()
    np.testing.assert_array_equal(got, rows[[2, 39, 6]])
