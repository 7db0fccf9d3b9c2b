#!/usr/bin/env bash
# Stage and trainer-input benchmarks at the papers' model sizes on ONE GPU, in one call of at most ~8 minutes.
#
#   bench/gpu.sh --fetch-wheels   on the build machine: download the wheels the GPU image lacks into .whl/
#                                 (ignored by git; name it in the device tool's `carry`)
#   bench/gpu.sh                  on the GPU machine: install .whl/ offline into /tmp/site, then run the
#                                 benchmarks and write $OUT/gpu-<name>.json (+ gpu-log.txt, gpu-nvidia-smi.txt)
#   bench/gpu.sh --dry-run        anywhere (CPU): the same steps with the tiny models and small sizes, to prove
#                                 the script runs end to end; results go to $OUT or a temporary folder
#
# Models (random init, real sizes): CLIP ViT-L/14-336, CaR's ViT-B/16 + ViT-L/14, DINOv2-L, Grounding DINO-B,
# SAM ViT-H (bench/stages.py), plus the older per-benchmark figures with SAM ViT-H (sam_boxes,
# sam_embedding_share, fmbseg_stages) and the trainer DataLoader against raw tar reads (trainer_loader).
# Each benchmark runs in its own process under its own time limit, most important first, so one overrun costs
# only itself. PYTHON overrides the interpreter (default python3, the GPU image's torch Python).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(segment-anything==1.0 webdataset==1.0.2 braceexpand==0.1.7 pycocotools==2.0.11 transformers==5.23.0)
mode=run
case "${1:-}" in
  --fetch-wheels) mode=fetch ;;
  --dry-run) mode=dry ;;
  "") ;;
  *) echo "usage: bench/gpu.sh [--fetch-wheels | --dry-run]" >&2; exit 2 ;;
esac

if [[ $mode == fetch ]]; then
  mkdir -p .whl
  exec "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
if [[ $mode == dry ]]; then
  OUT=${OUT:-$(mktemp -d)}
else
  OUT=${OUT:?set OUT to the folder for the results (the device tool sets it)}
fi
mkdir -p "$OUT"
LOG="$OUT/gpu-log.txt"
start=$(date +%s)
say() { echo "[gpu.sh +$(( $(date +%s) - start ))s] $*" | tee -a "$LOG"; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ $mode == run ]]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing $(ls .whl | wc -l) wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1 || { say "wheel install failed (see log)"; exit 1; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
    if ! "$PY" -c "import transformers" >>"$LOG" 2>&1; then  # its needs unmet there: use the image's own
      say "carried transformers does not import; using the image's"
      rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info
    fi
  else
    say "no .whl/ folder: using the image's packages only"
  fi
  nvidia-smi >"$OUT/gpu-nvidia-smi.txt" 2>&1 || true
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "transformers", transformers.__version__)
EOF
  # name | time limit (s) | arguments to bench.run
  # stage_overhead: whole shard tasks of 16 images (load, read, decode, write included) vs model time, issue 12's
  # ratio goal; fmbseg_stages is left out (its stages are in `stages`) to stay within 8 minutes.
  PLAN=("stages|170|--kw size=real --kw repeats=5"
        "stage_overhead|110|--kw n_images=16 --kw repeats=2"
        "trainer_loader|70|--kw device=auto --kw workers=8 --kw n_use=128 --kw n_align=256"
        "sam_boxes|45|--kw arch=vit_h --kw repeats=5"
        "sam_embedding_share|40|--kw arch=vit_h --kw repeats=5")
else
  PLAN=("stages|300|--kw size=tiny --kw repeats=1 --kw warmup=1"
        "trainer_loader|200|--kw workers=2 --kw n_use=8 --kw n_align=16 --kw shards=2 --kw repeats=1"
        "sam_boxes|200|--kw arch=tiny --kw repeats=1 --kw n_boxes=4"
        "sam_embedding_share|100|--kw arch=tiny --kw repeats=1")
fi

failed=0
for row in "${PLAN[@]}"; do
  IFS='|' read -r name limit args <<<"$row"
  say "$name (limit ${limit}s)"
  # shellcheck disable=SC2086
  if ! timeout --kill-after=10 "$limit" "$PY" -m bench.run --out "$OUT" --prefix gpu- $args "$name" >>"$LOG" 2>&1; then
    say "$name FAILED or timed out (exit $?): see $LOG"
    failed=$((failed + 1))
  fi
done

"$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("gpu-*.json")):
    d = json.loads(path.read_text()); r = d["results"]
    print(f"== {path.name}: {d['seconds']} s, {d['machine'].get('cuda') or 'cpu'}, load {d['load_before']['1m']}")
    if "stages" in r and isinstance(r["stages"], dict):
        for k, v in r["stages"].items():
            if "ratio" in v:  # stage_overhead
                print(f"  {k:28s} wall {v['wall_s']:>8} s  model {v['model_s']:>8} s  ratio {v['ratio']}")
            else:
                print(f"  {k:28s} {v.get('median_s', v.get('seconds')):>10} s   outside model {v.get('outside_model_share')}")
    for k in ("use", "alignment"):
        if k in r:
            print(f"  {k}: " + ", ".join(f"{v} {r[k][v]['images_per_s_median']}/s" for v in ("raw_cold", "raw_warm", "loader", "loader_legacy") if v in r[k]))
    for k in ("embed_s", "batched_decoder_s", "per_box_decoder_s", "encode_s", "read_stored_s", "per_image_total_s"):
        if k in r:
            print(f"  {k} {r[k]}")
EOF
say "done: $failed failed; results in $OUT"
exit $(( failed > 0 ))
