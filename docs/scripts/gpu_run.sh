#!/bin/bash
# pixquery GPU measurement (issue 18): runs ON THE GPU MACHINE from the repo root, as
#     bash .gpu/gpu_run.sh
# with the folder .gpu carried (built here by gpu_pack.sh). About 3 minutes on an H200. Everything it
# prints also lands in $OUT/log.txt; the figures in $OUT/*.json.
#
# 1. installs SQLAlchemy from the carried wheel (the machine has no sqlalchemy; FAISS is not needed:
#    indexing never imports it),
# 2. rebuilds the tower packages and the photo variants (gpu_prepare.py; see its docstring for what is
#    real and what is not),
# 3. runs `pixquery bench index` on the photos with --device cuda --batch-size 256, captions, caption
#    vectors and scorer memories on (the defaults), GPU utilisation sampled: the figure,
# 4. runs the CUDA tests (tests marked gpu: CUDA against the CPU reference),
# 5. runs the bench again (repeatability), and with batch 512 if time is left.
set -u -o pipefail
OUT=${OUT:-/tmp/pixq-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
G=$(pwd)/.gpu
VARIANTS=${VARIANTS:-128}
DEVICE=${DEVICE:-cuda}    # DEVICE=cpu LIMIT=40 NAIVE=5 VARIANTS=2 [READERS=processes]: the dry run of this script on a CPU machine
LIMIT=${LIMIT:-100000}
NAIVE=${NAIVE:-100}
W=${WORK:-/tmp}            # where the wheels, towers and photos go on the machine
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 ))s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || echo "no nvidia-smi"
echo "cpus $(nproc)"; python3 -V
df -h /dev/shm /tmp | tail -2

stamp "install carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $W/site "$G"/wheels/*.whl || exit 1
export PYTHONPATH=$W/site:$W/towers:$(pwd)
export PYTHONUNBUFFERED=1 PIXQUERY_CACHE_DIR=$W/pixq-cache

stamp "rebuild towers and photos"
python3 "$G/gpu_prepare.py" "$G" $W/towers $W/pixq/photos "$VARIANTS" || exit 1
cp $W/pixq/assets.json "$OUT/assets.json"
python3 -c "import torch, sqlalchemy, PIL, numpy, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0), 'sqlalchemy', sqlalchemy.__version__, 'pillow', PIL.__version__, 'numpy', numpy.__version__, 'timm', timm.__version__)"

run_bench() {  # $1: name, then extra flags
    local name=$1; shift
    stamp "bench $name"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/util_$name.csv" 2>/dev/null &
    local smi=$!
    timeout 180 python3 -m indexer.cli bench index $W/pixq/photos --limit "$LIMIT" --device "$DEVICE" -q ${READERS:+--readers "$READERS"} "$@" \
        > "$OUT/bench_$name.json"
    echo "exit $?"
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    cat "$OUT/bench_$name.json"; echo
    python3 - "$OUT/util_$name.csv" <<'EOF'
import sys
rows = [l.split(",") for l in open(sys.argv[1]) if l.strip()]
util = [float(r[0]) for r in rows if r[0].strip().replace(".", "").isdigit()]
busy = [u for u in util if u > 0]
print(f"GPU utilisation while the process ran: {len(util)} samples, mean {sum(util)/max(len(util),1):.0f}%, "
      f"mean when busy {sum(busy)/max(len(busy),1):.0f}%, peak memory used {max((float(r[1]) for r in rows), default=0):.0f} MiB")
EOF
}

run_bench b256 --batch-size 256 --naive "$NAIVE"   # the figure first, then the checks

stamp "gpu tests (CUDA against the CPU reference)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs 2>&1 | tail -25

run_bench b256_again --batch-size 256 --naive 0
if [ $(( $(date +%s) - T0 )) -lt 300 ]; then
    run_bench b512 --batch-size 512 --naive 0
fi

stamp "summary"
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench_*.json"))):
    try:
        r = json.load(open(path))
    except ValueError:
        print(os.path.basename(path), "no JSON (see log.txt)")
        continue
    st = {k: v["seconds"] for k, v in r["stages"].items()}
    print(f"{os.path.basename(path)}: {r['images']} images ({r['captioned']} captioned) on {r['device']} {r['dtype']}, "
          f"batch {r['batch_size']}, {r['workers']} {r['readers']}: END TO END {r['end_to_end_images_per_s']} img/s "
          f"(load {r['model_load_s']} s), indexing alone {r['index_images_per_s']} img/s, "
          f"naive {r.get('naive_loop', {}).get('images_per_s')} img/s, peak RSS {r['peak_rss_mb']} MB "
          f"(worker {r['peak_rss_worker_mb']} MB); stages {st}")
EOF
stamp "done"
