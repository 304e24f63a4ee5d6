"""`pixquery index` with the real default models, killed (SIGKILL) N times at a random moment up to 3 s after a
checkpoint, then finished and compared with a clean build of the same photos (the first N_IMAGES Flickr8k
images). Prints each kill's doctor result, then one JSON line. Not a pytest test (minutes, real models,
the data set); the figures in docs/RELIABILITY.md come from::

    PYTHONPATH=. SEED=7 python tests/real_kills.py /tmp/realkill 200 5
"""
import json, os, random, shutil, signal, sqlite3, subprocess, sys, time
from pathlib import Path
import numpy as np

work, n_images, n_kills = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
repo = Path(__file__).resolve().parents[1]
src = Path(os.environ.get("PIXQUERY_FLICKR8K", repo.parent / "shared" / "data" / "flickr8k")) / "images"
photos = work / "photos"
if not photos.exists():
    photos.mkdir(parents=True)
    for p in sorted(src.glob("*.jpg"))[:n_images]:
        shutil.copy(p, photos / p.name)
env = {**os.environ, "PIXQUERY_CHECKPOINT_EVERY": "32", "PIXQUERY_CACHE_DIR": str(work / "cache")}
cmd = lambda db: [sys.executable, "-m", "indexer.cli", "index", str(photos), "--db", str(db), "-q"]

def committed(db):
    try:
        with sqlite3.connect(f"file:{db / 'pixquery.sqlite'}?mode=ro", uri=True, timeout=10) as c:
            g = c.execute("select value from meta where key='vector_generation'").fetchone()
            return int(g[0]) if g else 0, c.execute("select count(*) from images").fetchone()[0]
    except sqlite3.OperationalError:
        return 0, 0

rng = random.Random(int(os.environ.get("SEED", "1")))
db = work / "killed"
kills = []
t0 = time.time()
while len(kills) < n_kills:
    before = committed(db)
    p = subprocess.Popen(cmd(db), env=env, cwd=repo, stdout=subprocess.DEVNULL, stderr=open(work / "killed.log", "a"))
    while committed(db)[0] <= before[0] and p.poll() is None:   # wait for a new checkpoint
        time.sleep(0.05)
    if p.poll() is not None:
        break
    seen = committed(db)
    time.sleep(rng.uniform(0, 3.0))
    if p.poll() is not None:
        break
    p.send_signal(signal.SIGKILL); p.wait()
    after = committed(db)
    d = subprocess.run([sys.executable, "-m", "indexer.cli", "doctor", "--db", str(db), "--json"], env=env, cwd=repo,
                       capture_output=True, text=True)
    rep = json.loads(d.stdout)
    kills.append({"rows_seen": seen[1], "rows_after": after[1], "doctor_consistent": rep["consistent"],
                  "problems": [c for c in rep["checks"] if c["status"] == "problem"]})
    print(kills[-1], flush=True)
r = subprocess.run(cmd(db), env=env, cwd=repo, capture_output=True, text=True); assert r.returncode == 0, r.stderr
r = subprocess.run(cmd(work / "clean"), env=env, cwd=repo, capture_output=True, text=True); assert r.returncode == 0, r.stderr
sys.path.insert(0, str(repo))
from indexer.config import EngineConfig
from indexer.engine import Engine
def state(d):
    e = Engine(EngineConfig(index_dir=d, progress=False))
    idx = e.open(); rows = idx.store.all_images(); ids = np.array([r.id for r in rows])
    img = idx.vectors.images.reconstruct(ids); have, cap = idx.vectors.captions.reconstruct_present(ids)
    mh, mem = idx.vectors.memories.reconstruct_present(ids) if idx.vectors.memories is not None else (np.zeros(len(ids), bool), None)
    caps = dict(zip(ids[have].tolist(), cap))
    out = {r.path: (r.content_hash, r.caption, img[i], caps.get(r.id)) for i, r in enumerate(rows)}
    return out, int(mh.sum()), len(rows), len({r.path for r in rows})
a, am, an, au = state(db); b, bm, bn, bu = state(work / "clean")
same_caption = sum(a[p][1] == b[p][1] for p in b)
maxdiff = max(float(np.abs(a[p][2] - b[p][2]).max()) for p in b)
capdiff = max(float(np.abs(a[p][3] - b[p][3]).max()) for p in b if a[p][3] is not None and b[p][3] is not None and a[p][1] == b[p][1])
print(json.dumps({"kills": len(kills), "all_consistent": all(k["doctor_consistent"] for k in kills),
                  "rows": [an, bn], "unique_paths": [au, bu], "same_paths": set(a) == set(b),
                  "same_hashes": all(a[p][0] == b[p][0] for p in b), "same_captions": f"{same_caption}/{len(b)}",
                  "max_abs_image_vector_diff": maxdiff, "max_abs_caption_vector_diff": capdiff,
                  "memories": [am, bm], "seconds": round(time.time() - t0)}))
