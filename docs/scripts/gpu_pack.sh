#!/bin/bash
# Builds the carry folder .gpu for the GPU measurement, in a checkout of pixquery (default: this checkout),
# and ignores it there (.git/info/exclude), so it travels only when a run call names it in `carry`.
#
#     bash docs/scripts/gpu_pack.sh [REPO_ROOT] [BUDGET_BYTES]
#
# The device tool sends, per call, the tracked files (about 52 MB, mostly weights) plus what `carry`
# names, 64 MiB (67,108,864 bytes) in all. BUDGET_BYTES (default: what is left after the tracked and
# untracked-not-ignored files, less 1.5 MB of margin) bounds .gpu; photos fill what the rest leaves.
# Prints every file's size and the total that will travel.
set -euo pipefail
REPO=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$REPO/.venv/bin/python}
LIMIT=67108864
cd "$REPO"
TRACKED=$(git ls-files -z | xargs -0 stat -c %s | awk '{s+=$1} END {print s}')
UNTRACKED=$(git ls-files -z --others --exclude-standard | xargs -0 -r stat -c %s | awk '{s+=$1} END {print s+0}')
BUDGET=${2:-$(( LIMIT - TRACKED - UNTRACKED - 1500000 ))}
echo "tracked $TRACKED B, untracked-not-ignored $UNTRACKED B, limit $LIMIT B -> budget for .gpu $BUDGET B"

grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/assets/minilm .gpu/photos
cp "$HERE/gpu_run.sh" "$HERE/gpu_prepare.py" .gpu/

# SQLAlchemy: the pure-Python wheel (2 MB; its C speed-ups are optional), the version this project runs
VER=$("$PY" -c "import sqlalchemy; print(sqlalchemy.__version__)")
if [ -f "$HERE/dl/any/sqlalchemy-$VER-py3-none-any.whl" ]; then
    cp "$HERE/dl/any/sqlalchemy-$VER-py3-none-any.whl" .gpu/wheels/   # downloaded before: no network needed
else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .gpu/wheels "sqlalchemy==$VER"
fi

# EfficientNet-Lite0 (float16, without the ImageNet classifier) and MiniLM's config and tokenizer
PYTHONPATH="$REPO" "$PY" - <<'EOF'
import lzma, torch
from retrieval.native.towers import efficientnet_weights_path, minilm_path
state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
order = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()]
tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items() if not k.startswith("_fc.")}
torch.save({"order": order, "tensors": tensors}, ".gpu/assets/effl0-nofc-fp16.pt")
m = minilm_path()
open(".gpu/assets/minilm/config.json", "wb").write((m / "config.json").read_bytes())
open(".gpu/assets/minilm/tokenizer.json.xz", "wb").write(lzma.compress((m / "tokenizer.json").read_bytes(), preset=9))
EOF

# Flickr8k dev photos, in dev.txt order, while they fit
DATA=${PIXQUERY_FLICKR8K:-$REPO/../shared/data/flickr8k}
USED=$(du -sb .gpu | cut -f1)
N=0
while read -r name; do
    size=$(stat -c %s "$DATA/images/$name")
    [ $(( USED + size )) -gt "$BUDGET" ] && break
    cp "$DATA/images/$name" .gpu/photos/
    USED=$(( USED + size )); N=$(( N + 1 ))
done < "$DATA/dev.txt"

echo "--- .gpu contents"
find .gpu -type f -not -path '*/photos/*' -printf '%10s  %p\n' | sort -k2
echo "$(du -cb .gpu/photos/*.jpg | tail -1 | cut -f1)  .gpu/photos/ ($N Flickr8k dev photos, 224x224)"
TOTAL=$(du -sb .gpu | cut -f1)
echo "--- .gpu $TOTAL B; travels with the tracked files: $(( TRACKED + UNTRACKED + TOTAL )) of $LIMIT B"
[ $(( TRACKED + UNTRACKED + TOTAL )) -le $LIMIT ] || { echo "TOO BIG"; exit 1; }
