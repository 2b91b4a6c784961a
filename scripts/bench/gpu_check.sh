#!/usr/bin/env bash
# One-shot GPU check, for a machine with one CUDA GPU and torch, timm and triton installed (no network):
# installs the project, runs the Triton kernel tests on CUDA, times the attention core, then measures the
# four FLatten models beside their timm softmax peers (and the official code with --official-repo):
# 224 px batch 128 (bf16 eager inference and training step with peak memory, fp32 eager, bf16 compiled)
# and 896 px batch 8 (bf16 and fp32 eager), FLatten-DeiT-T/S beside DeiT-T/S at 224-1024 px batch 8 (bf16
# eager), and profiles bf16 inference per part of the models. Every
# section has its own time limit and the whole run stays under 8 minutes; what finished is always reported.
#
#   scripts/bench/gpu_check.sh OUT_DIR [--official-repo PATH_TO_FLatten-Transformer]
#
# Writes OUT_DIR/summary.md (all tables), OUT_DIR/models.json (every measurement), OUT_DIR/core.json,
# OUT_DIR/profile.json and OUT_DIR/log.txt.
set -uo pipefail
out=${1:?usage: scripts/bench/gpu_check.sh OUT_DIR [--official-repo PATH]}
shift
official=()
while [ $# -gt 0 ]; do
  case $1 in
    --official-repo) official=(--official-repo "$(cd "$2" && pwd)"); shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
start=$SECONDS
budget=470  # seconds for the whole script
log="$out/log.txt"
: > "$log"

left() { echo $(( budget - (SECONDS - start) )); }
section() {  # section NAME MAX_SECONDS COMMAND...: run with the smaller of its limit and the time left
  local name=$1 limit=$2; shift 2
  local t; t=$(left)
  (( t < limit )) && limit=$t
  if (( limit < 20 )); then echo "## $name: skipped, out of time" | tee -a "$log"; return; fi
  echo "## $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
  echo "## $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$log"
}

# the project, without touching the machine's torch / timm / triton (no network here)
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >> "$log" 2>&1; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, timm, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$log"

section "Triton kernel tests on CUDA" 120 $PY -m pytest -q -p no:cacheprovider tests/test_fla_kernels.py
section "attention core" 60 $PY scripts/bench/bench_attention_core.py --json "$out/core.json"

pairs=(flatten_pvt_v2_b0 flatten_pvt_tiny flatten_swin_tiny_patch4_224 flatten_cswin_tiny_224)
bench=($PY -m flatten_timm.cli bench --models "${pairs[@]}" --device cuda --warmup 3 --repeats 10)
section "224 bf16 eager inference" 90 \
  "${bench[@]}" --img-size 224 -b 128 --dtype bf16 --mode infer "${official[@]}" --json "$out/m1.json"
# where the time goes, per part and kernel, in the pairs that trail their peers (and FLatten-Swin-T, which does not)
section "224 bf16 inference profile" 60 $PY scripts/bench/profile_models.py flatten_pvt_v2_b0 pvt_v2_b0 flatten_pvt_tiny \
  pvt_v2_b1 flatten_cswin_tiny_224 flatten_swin_tiny_patch4_224 swin_tiny_patch4_window7_224 --img-size 224 -b 128 \
  --dtype bf16 --device cuda --json "$out/profile.json"
section "224 bf16 training step" 80 \
  "${bench[@]}" --img-size 224 -b 128 --dtype bf16 --mode train "${official[@]}" --json "$out/m2.json"
# FLatten-DeiT beside timm's DeiT (SDPA attention) as the image grows: where global linear attention pays
section "DeiT bf16 eager inference, 224-1024" 60 $PY -m flatten_timm.cli bench --models \
  flatten_deit_tiny_patch16_224 flatten_deit_small_patch16_224 --device cuda --warmup 2 --repeats 5 \
  --img-size 224 448 768 1024 -b 8 --dtype bf16 --json "$out/m7.json"
# compiling costs about a minute a model: the two families whose peers timm has in the same form
section "224 bf16 compiled inference" 200 $PY -m flatten_timm.cli bench --models flatten_pvt_v2_b0 \
  flatten_swin_tiny_patch4_224 --device cuda --warmup 3 --repeats 10 --img-size 224 -b 128 --dtype bf16 \
  --mode compile --json "$out/m3.json"
section "896 bf16 eager inference" 45 "${bench[@]}" --img-size 896 -b 8 --dtype bf16 --json "$out/m4.json"
section "224 fp32 eager inference" 60 \
  "${bench[@]}" --img-size 224 -b 128 --dtype fp32 --mode infer "${official[@]}" --json "$out/m5.json"
section "896 fp32 eager inference" 40 "${bench[@]}" --img-size 896 -b 8 --dtype fp32 --json "$out/m6.json"

$PY - "$out" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
merged = {'environment': None, 'results': []}
for path in sorted(glob.glob(os.path.join(out, 'm[0-9].json'))):
    report = json.load(open(path))
    merged['environment'] = merged['environment'] or report['environment']
    merged['results'] += report['results']
    os.remove(path)
json.dump(merged, open(os.path.join(out, 'models.json'), 'w'), indent=1)
EOF
{
  echo "# GPU check"
  echo
  echo '## Attention core (ms per call, median)'
  sed -n '/^copy bandwidth/,/^##/p' "$log" | grep -E '^(copy|\|)'
  echo
  echo '## Whole models (images/s; "vs" = FLatten / other, higher is better for FLatten)'
  $PY scripts/bench/gpu_report.py "$out/models.md" "$out/models.json" > /dev/null && cat "$out/models.md"
  echo
  echo '## Where the time goes (224, batch 128, bf16 inference)'
  sed -n '/^ms per step/,/^## 224 bf16 inference profile: exit/p' "$log" | grep -v '^## '
  echo
  echo '## Kernel tests'
  grep -E '(passed|failed|error)' "$log" | grep -v '^##' | tail -3
} > "$out/summary.md"
rm -f "$out/models.md"
cat "$out/summary.md"
echo "gpu_check: $((SECONDS - start))s"
