#!/usr/bin/env bash
# The GPU run of issue 18, in one script: install the carried wheels, run the `gpu` tests, run the
# benchmark (CLIP ViT-B/32 and ViT-L/14, BLIP-base captioning) with the GPU sampled, and write
# every figure as JSON into OUT_DIR. docs/gpu.md gives the device calls that run it.
#
#   benchmarks/gpu/run.sh --stash              call 1: keep the wheel parts this call carried in $STASH
#   benchmarks/gpu/run.sh OUT_DIR              call 2: everything, on the GPU machine's python3
#   benchmarks/gpu/run.sh --dry-run OUT_DIR    here: tiny models on the CPU, the same steps
#
# Environment: PYTHON (default python3), STASH (default /tmp/vlpipe-whl), NUM_CPUS (default 16).
set -uo pipefail
cd "$(dirname "$0")/../.."

MODE=gpu
case "${1:-}" in
  --stash) MODE=stash; shift ;;
  --dry-run) MODE=dry; shift ;;
esac
PY=${PYTHON:-python3}
STASH=${STASH:-/tmp/vlpipe-whl}
NUM_CPUS=${NUM_CPUS:-16}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

stash_parts() {
  mkdir -p "$STASH"
  cp .whl/call*/* "$STASH"/ && ls -l "$STASH"
}

if [[ $MODE == stash ]]; then
  stash_parts
  nvidia-smi -L 2>/dev/null || true
  exit 0
fi

OUT=${1:?usage: benchmarks/gpu/run.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-/tmp/vlpipe-gpu-work}
mkdir -p "$WORK"
: >"$WORK/steps.tsv"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD (a program under a time limit, or a function of this
# script), records its outcome and duration, and goes on either way.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  start=$(date +%s)
  if declare -F "$1" >/dev/null; then "$@"; else timeout --kill-after=10 "$limit" "$@"; fi
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$WORK/steps.tsv"
  [[ $rc == 0 ]] || { echo "=== $name failed: rc=$rc"; FAILED=1; }
  return $rc
}

# The bundle: call 1 left its part(s) in $STASH, this call carried the rest under .whl/.
assemble() {
  local count parts
  count=$(sed -n 's/^\([0-9]*\) parts$/\1/p' .whl/call*/bundle.sha256 | head -1)
  cp -n .whl/call*/bundle.tar.part* "$STASH"/ 2>/dev/null
  parts=$(ls "$STASH"/bundle.tar.part* 2>/dev/null | wc -l)
  if [[ -z $count || $parts != "$count" ]]; then
    echo "have $parts of ${count:-?} wheel parts in $STASH: run call 1 (run.sh --stash) again first, on the same warm machine"
    return 1
  fi
  (cd "$STASH" && for i in $(seq 1 "$count"); do cat "bundle.tar.part$i"; done >bundle.tar &&
    sha256sum -c bundle.sha256 2>/dev/null | head -1 | grep -q ': OK$' || { echo "bundle.tar: checksum mismatch"; exit 1; }
    rm -rf unpacked && mkdir unpacked && tar -xf bundle.tar -C unpacked && ls unpacked/wheels)
}

install_wheels() {
  if [[ $MODE == dry ]]; then
    # Python 3.12 wheels do not run here: install them for 3.12 into a scratch folder instead,
    # which proves the set installs (one version each, LZMA wheels unpack), then use this venv.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site312" \
      --python-version 3.12 --implementation cp --only-binary=:all: "${PLATFORMS[@]}" "$STASH"/unpacked/wheels/*.whl &&
      ls "$WORK/site312" | head -50
    return
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$STASH"/unpacked/wheels/*.whl
}

if [[ $MODE == dry ]]; then
  STASH=$(mktemp -d)
  stash_parts >/dev/null
  DEVICE=cpu
  export VLPIPE_GPU_TESTS_ON_CPU=1
  # The CPU stand-ins: tiny models, a handful of rows, one logical GPU so Ray's GPU scheduling runs.
  B32=(--tiny --clip-images 16 --caption-images 0 --scale-images 16)
  L14=(--tiny --clip-images 16 --caption-images 0 --scale-images)
  BLIP=(--tiny --clip-images 0 --caption-images 4 --max-new-tokens 4 --scale-images)
  RAY=(--num-cpus 4 --num-gpus 1)
  PREP=(--tiny --rows 16 4)
  LIMITS=(180 60 90 90 90)
else
  DEVICE=cuda
  B32=(--clip-arch vit-b32 --clip-images 8192 --caption-images 0 --scale-images 8192 32768)
  L14=(--clip-arch vit-l14 --clip-images 4096 --caption-images 0 --scale-images)
  BLIP=(--clip-images 0 --caption-images 512 --max-new-tokens 20 --scale-images)
  RAY=(--num-cpus "$NUM_CPUS")
  PREP=(--archs vit-b32 vit-l14 --rows 8192 32768 4096 512)
  # pytest, prepare, B/32, L/14, BLIP: the benchmark's three runs stay within 6 minutes together.
  LIMITS=(100 90 140 80 80)
fi

step wheels 120 assemble || exit 1
step install 120 install_wheels || exit 1
[[ $MODE == dry ]] || export PYTHONPATH="/tmp/site:$PWD"
step verify 30 "$PY" -m benchmarks.gpu.wheels verify --manifest "$STASH/unpacked/manifest.json"
step env 60 "$PY" -m benchmarks.gpu.driver env --out "$OUT/run.json"
# Only the files holding `gpu` tests: collecting the whole suite imports test-only packages
# (duckdb, polars, kubernetes, seaweedfs) that the GPU image does not have.
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' 'mark.gpu' tests | sort)
step pytest "${LIMITS[0]}" "$PY" -m pytest -m gpu -p no:cacheprovider -q -rA -o timeout=120 \
  --junitxml "$OUT/pytest.xml" "${GPU_TESTS[@]}"
step prepare "${LIMITS[1]}" "$PY" -m benchmarks.gpu.driver prepare --work-dir "$WORK/bench" "${PREP[@]}"
# Not measured here: the heads/tags cost (--signals-images) and the whole-process timings
# (--whole-repeats), which the benchmark runs by default and which would take the limits above.
COMMON=(--device "$DEVICE" "${RAY[@]}" --work-dir "$WORK/bench" --signals-images 0 --whole-repeats 0)
step clip-vit-b32 "${LIMITS[2]}" "$PY" -m benchmarks.gpu.driver bench --out "$OUT/clip-vit-b32.json" \
  --label clip-vit-b32 -- "${COMMON[@]}" "${B32[@]}"
step clip-vit-l14 "${LIMITS[3]}" "$PY" -m benchmarks.gpu.driver bench --out "$OUT/clip-vit-l14.json" \
  --label clip-vit-l14 -- "${COMMON[@]}" "${L14[@]}"
step caption-blip-base "${LIMITS[4]}" "$PY" -m benchmarks.gpu.driver bench --out "$OUT/caption-blip-base.json" \
  --label caption-blip-base -- "${COMMON[@]}" "${BLIP[@]}"
"$PY" -m benchmarks.gpu.driver summary --dir "$OUT" --steps "$WORK/steps.tsv"
exit $FAILED
