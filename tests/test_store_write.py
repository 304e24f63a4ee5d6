"""Store.write inserts and updates rows in bulk with merge's meaning: by id, the last of one id wins, and a
moved row frees its old path for a new row in the same checkpoint."""

from indexer.storage.schema import ImageRow, utcnow
from indexer.storage.store import Store, WriteBatch


def row(i, path, caption=None):
    return ImageRow(id=i, path=path, content_hash=f"{i:064x}", byte_size=10 * i, mtime=1.5 * i, width=4,
                    height=3, file_type="jpg", taken_at=None, indexed_at=utcnow(), encoder="enc",
                    run_id=None, caption=caption, captioner="cap" if caption else None,
                    captioned_at=utcnow() if caption else None)


def test_bulk_rows_mean_what_merge_meant(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.write(WriteBatch(rows=[row(1, "/a/1.jpg", "a dog"), row(2, "/a/2.jpg"), row(3, "/a/3.jpg", "a cat")]))
    moved = store.images_by_ids([1])[1]
    moved.path = "/b/1.jpg"  # a move: the old path is taken by a new file in the same checkpoint
    store.write(WriteBatch(rows=[moved, row(4, "/a/1.jpg", "a bird"), row(2, "/a/2.jpg", "first"),
                                 row(2, "/a/2.jpg", "a red car")]))
    rows = store.images_by_ids([1, 2, 3, 4])
    assert {i: (r.path, r.caption) for i, r in rows.items()} == {
        1: ("/b/1.jpg", "a dog"), 2: ("/a/2.jpg", "a red car"), 3: ("/a/3.jpg", "a cat"), 4: ("/a/1.jpg", "a bird")}
    assert rows[2].byte_size == 20 and rows[4].mtime == 6.0 and store.count_images() == 4
    assert store.captions_by_ids([2, 4]) == {2: "a red car", 4: "a bird"}
    if store.keywords is not None:  # the keyword index follows bulk inserts and updates (triggers)
        with store.engine.connect() as conn:
            hits = conn.exec_driver_sql("SELECT rowid FROM captions_fts WHERE captions_fts MATCH 'car OR bird'")
            assert sorted(r[0] for r in hits) == [2, 4]
