"""A searching process for tests/test_kills.py: searches an index over and over while another process
indexes it, and prints what it saw as JSON when ``STOP_FILE`` appears::

    PYTHONPATH=.:tests python tests/search_loop.py INDEX_DIR PHOTOS STOP_FILE (shared|fresh)

``shared``: one Engine for the whole loop (as the app keeps one), reloading vectors when a checkpoint
commits; ``fresh``: a new Engine for every search (as each ``pixquery search`` is). Every search must
succeed, and when no checkpoint committed while it ran, it must show exactly the committed state: as
many image-mode results (k above the collection) as committed rows, no id twice, every path a file
under PHOTOS.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import TinyEncoder  # noqa: E402
from indexer.config import EngineConfig  # noqa: E402
from indexer.engine import Engine  # noqa: E402
from indexer.errors import IndexNotFoundError  # noqa: E402

QUERIES = ["red", "green picture", "blue things", "a yellow picture", "black -white", "purple orange^2"]
MODES = ["image", "fused", "keyword", "caption"]


def main() -> None:
    index_dir, photos, stop, kind = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    rng = random.Random(os.getpid())
    build = lambda: Engine(EngineConfig(index_dir=index_dir, progress=False, captioner=None),  # noqa: E731
                           encoder=TinyEncoder())
    shared = build() if kind == "shared" else None
    seen = {"searches": 0, "errors": [], "inconsistent": [], "counts": [], "generations": set()}
    print("ready", flush=True)
    while not stop.exists():
        engine = shared or build()
        try:
            g1 = engine.generation
            hits = engine.search(rng.choice(QUERIES[:4]), k=10_000, mode="image")  # (no excluded words)
            other = engine.search(rng.choice(QUERIES), k=20, mode=rng.choice(MODES))
            rows = engine.open().store.count_images()
            g2 = engine.generation
            seen["searches"] += 2
            seen["generations"].add(g2)
            ids = [h.id for h in hits]
            bad = [h.path for h in hits + other if not h.path.startswith(str(photos)) or not os.path.isfile(h.path)]
            if len(set(ids)) != len(ids) or bad:
                seen["inconsistent"].append(f"generation {g1}: {len(ids) - len(set(ids))} repeated ids, bad paths {bad[:3]}")
            elif g1 == g2 and len(hits) != rows:
                seen["inconsistent"].append(f"generation {g1}: {len(hits)} results but {rows} committed rows")
            seen["counts"].append(len(hits))
        except IndexNotFoundError:
            time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
            seen["errors"].append("".join(traceback.format_exception_only(exc)).strip()[-500:])
        finally:
            if shared is None:
                engine.close()
        time.sleep(0.1)  # leave the cores some room for the run being watched
    seen["generations"] = len(seen["generations"])
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
