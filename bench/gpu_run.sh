#!/usr/bin/env bash
# The GPU benchmark of issue 10, as one prepared run on a lent device machine (no internet there).
# Carried in .gpu/ (made here by bench/gpu_prepare.sh): wheels the machine lacks (duckdb,
# open_clip_torch, ftfy, wcwidth for Python 3.12), the english-20k vocabulary as a file (wordfreq
# is not there), and MiniLM's config and tokenizer (bench/gpu_minilm_shim.py gives it random
# weights: the 90 MB of trained weights exceed the carry limit; timing is the same).
# Usage: bash bench/gpu_run.sh [SMOKE_N] [N]; with COLD_ONLY=1 the N run is the cold dissect and
# the target's forward only; with FULL_FIRST=1 the N run goes first (the headline figure before the
# smoke run's ratios, when device time is short). Each phase's figures are printed as it ends
# (bench/real_scale.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 bench/gpu_minilm_shim.py /tmp/site .gpu/minilm || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, duckdb, open_clip, neurostore; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/device.txt"
run() {  # N LABEL [MORE ARGS]
  python3 bench/real_scale.py --images "$1" --vocab file:.gpu/english-20k.txt --device cuda \
    --workers 14 --batch-size 256 --no-rss --json "${@:3}" > "$OUT/$2.json" 2> "$OUT/$2.err"
  local rc=$?
  echo "== $2 (N=$1) rc=$rc"; grep -a '^\[real_scale\]\|Error\|Traceback' "$OUT/$2.err" | tail -20
  [ $rc -eq 0 ] && cat "$OUT/$2.json"
  return $rc
}
# SMOKE_N 0 skips the smoke run; COLD_ONLY=1: only the cold dissect and the target's forward at N
smoke() { [ "${1:-256}" = 0 ] || run "${1:-256}" smoke || { tail -c 4000 "$OUT/smoke.err"; return 1; }; }
full() { run "${2:-50000}" full ${COLD_ONLY:+--cold-only} || tail -c 4000 "$OUT/full.err"; }
if [ -n "${FULL_FIRST:-}" ]; then full "$@"; smoke "$@"; else smoke "$@" || exit 1; full "$@"; fi
# the vocabulary's texts, run up to their end vs all 77 positions (seconds, on the same GPU)
timeout 180 python3 bench/text_encoding.py --vocab file:.gpu/english-20k.txt --texts 20000 --device cuda \
  2> "$OUT/text.err" | tee "$OUT/text.json" || tail -c 2000 "$OUT/text.err"
