#!/bin/bash
# End-to-end training throughput suite for one model shape. Run from the repository root on the GPU machine:
#
#   bash benchmarks/run_gpu.sh --shape llama-3.1-8b [--modes bf16,qlora] [--configs hf_peft,unsloth,pronghorn,liger]
#
# It puts .gpu_site (built here by /work/shared/gpu/make_gpu_site.sh .gpu_site --with-unsloth --with-liger)
# and the repository on PYTHONPATH, works offline, builds the random-init checkpoint once under /dev/shm
# (reused while the machine stays warm), measures the bf16 matmul peak once, then runs every
# configuration x mode in its own Python process under `timeout`, and re-merges the results after each run,
# so $OUT/<shape>/results.{md,json} are current even if the whole command is cut off.
#
# Options (defaults in brackets):
#   --shape NAME            llama-3.1-8b | qwen3-8b | gemma-2-9b | tiny | tiny-qwen3 | tiny-gemma2 (required)
#   --modes LIST            comma-separated bf16,qlora [bf16,qlora]
#   --configs LIST          comma-separated hf_peft,hf_peft_kbit (QLoRA only),liger,unsloth,pronghorn
#                           [hf_peft,unsloth,pronghorn,liger];
#                           suffixes: +stashN the experimental MLP stash over the first N layers (pronghorn),
#                           +residual the experimental residual stash, recompute skips o_proj (pronghorn),
#                           +pageable unpinned input batches (any config), e.g. pronghorn+residual+pageable,
#                           +graphs / +eager CUDA graphs of checkpointed layers on / off (pronghorn),
#                           +embedhost / +embedgpu frozen input embeddings in host memory / on the GPU (pronghorn),
#                           +parkgates / +computegates graphed layers park their MLP gates / recompute them,
#                           +parkfloatgates only layers without 4-bit weights park theirs (pronghorn)
#   --gc LIST               use_gradient_checkpointing variants for unsloth/pronghorn: unsloth,true [unsloth]
#   --batch-size N --seq-len N --warmup N --steps N   workload [2, 2048, 5, 8]
#   --timeout S             per-configuration limit in seconds [150]
#   --budget S              whole-command limit; later runs get less time or are skipped so the report is
#                           written before the device tool's 600 s cut-off [570]
#   --commit SHA            git commit to record (the device copy has no .git)
#   --profile               after timing, profile each configuration (kernel table, host profile, device
#                           timeline) into <config>-<mode>.prof*.txt|json next to its results
#   --stall-trace           sample the host's stack during the timed steps; slow steps and where the host was go
#                           to <config>-<mode>.stall.json next to the results (benchmarks/stall_sampler.py)
#   --find-syncs            after timing, record where each configuration's step made the host wait for the GPU
#   --model-root DIR        where checkpoints live [/dev/shm/pronghorn-bench]
#   --out DIR               results folder [$OUT, else /tmp/pronghorn-bench-out]
set -uo pipefail

SHAPE=""; MODES="bf16,qlora"; CONFIGS="hf_peft,unsloth,pronghorn,liger"; GCS="unsloth"
TIMEOUT=150; BUDGET=570; COMMIT=""; MODEL_ROOT=/dev/shm/pronghorn-bench; OUTDIR="${OUT:-/tmp/pronghorn-bench-out}"
EXTRA=(); PROFILE=0; STALL=0
while [ $# -gt 0 ]; do
  case $1 in
    --shape) SHAPE=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --gc) GCS=$2; shift 2 ;;
    --batch-size|--seq-len|--warmup|--steps) EXTRA+=("$1" "$2"); shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --commit) COMMIT=$2; shift 2 ;;
    --profile) PROFILE=1; shift ;;
    --stall-trace) STALL=1; shift ;;
    --find-syncs) EXTRA+=("$1"); shift ;;
    --model-root) MODEL_ROOT=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$SHAPE" ] || { echo "run_gpu.sh: --shape is required (see --help)" >&2; exit 2; }
[ -f benchmarks/train_throughput.py ] || { echo "run_gpu.sh: run me from the repository root" >&2; exit 2; }

START=$(date +%s)
ROOT=$PWD
if [ -d "$ROOT/.gpu_site" ]; then
  export PYTHONPATH="$ROOT/.gpu_site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "run_gpu.sh: warning: no .gpu_site folder here; trl/bitsandbytes/unsloth/liger must already be importable" >&2
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}
RES="$OUTDIR/$SHAPE"; LOGS="$RES/logs"; mkdir -p "$LOGS"
MODEL_DIR="$MODEL_ROOT/$SHAPE"
if [ -z "$COMMIT" ]; then COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown); fi

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[run_gpu $(elapsed)s] $*" | tee -a "$LOGS/run_gpu.log"; }

log "shape=$SHAPE modes=$MODES configs=$CONFIGS gc=$GCS timeout=${TIMEOUT}s budget=${BUDGET}s out=$RES commit=$COMMIT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$LOGS/nvidia-smi.txt"

log "building checkpoint (reused if current) at $MODEL_DIR"
$PY benchmarks/common.py build --shape "$SHAPE" --dir "$MODEL_DIR" --clean-siblings 2>&1 | tee "$LOGS/build.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "checkpoint build failed; see $LOGS/build.log"; exit 1; }
log "measuring bf16 matmul peak"
$PY benchmarks/common.py peak --out "$RES/peak.json" 2>&1 | tee "$LOGS/peak.log"

IFS=, read -ra MODE_LIST <<< "$MODES"
IFS=, read -ra CONFIG_LIST <<< "$CONFIGS"
IFS=, read -ra GC_LIST <<< "$GCS"
for mode in "${MODE_LIST[@]}"; do
  for config in "${CONFIG_LIST[@]}"; do
    variants=("${GC_LIST[@]}")
    case $config in unsloth|pronghorn*) ;; *) variants=(unsloth) ;; esac  # gc choice applies to these two only
    for gc in "${variants[@]}"; do
      name="$config-$mode"
      case $config in unsloth|pronghorn*) [ "$gc" = unsloth ] || name="$name-gc$gc" ;; esac
      per_run=()  # per-run options from the config's +suffixes (see --configs)
      IFS=+ read -ra suffixes <<< "${config#*+}"
      [[ $config == *+* ]] || suffixes=()
      for suffix in ${suffixes[@]+"${suffixes[@]}"}; do
        case $suffix in
          stash*) per_run+=(--stash-mlp-layers "${suffix#stash}") ;;
          residual) per_run+=(--stash-residual 1) ;;
          pageable) per_run+=(--batches pageable) ;;
          graphs) per_run+=(--cuda-graphs on) ;;
          eager) per_run+=(--cuda-graphs off) ;;
          embedhost) per_run+=(--offload-embedding on) ;;
          embedgpu) per_run+=(--offload-embedding off) ;;
          parkgates) per_run+=(--graph-gates park) ;;
          computegates) per_run+=(--graph-gates compute) ;;
          parkfloatgates) per_run+=(--graph-gates park-float) ;;
          *) log "unknown config suffix +$suffix in $config"; exit 2 ;;
        esac
      done
      if [ "$PROFILE" = 1 ]; then per_run+=(--profile "$RES/$name.prof.txt"); fi
      if [ "$STALL" = 1 ]; then per_run+=(--stall-trace "$RES/$name.stall.json"); fi
      left=$(( BUDGET - $(elapsed) - 15 ))
      limit=$(( TIMEOUT < left ? TIMEOUT : left ))
      if [ "$limit" -lt 30 ]; then log "skipping $name: only ${left}s of the budget left"; continue; fi
      log "running $name (limit ${limit}s)"
      timeout --kill-after=10 "$limit" $PY benchmarks/train_throughput.py --shape "$SHAPE" --config "${config%%+*}" \
        --mode "$mode" --gc "$gc" --model-dir "$MODEL_DIR" --peak-json "$RES/peak.json" --commit "$COMMIT" \
        --out "$RES/$name.json" ${per_run[@]+"${per_run[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$LOGS/$name.log"
      rc=${PIPESTATUS[0]}
      echo "$rc" > "$RES/$name.rc"
      log "$name finished with exit code $rc"
      $PY benchmarks/report.py --dir "$RES" > /dev/null 2>> "$LOGS/report.log"
    done
  done
done
$PY benchmarks/report.py --dir "$RES" | tee "$LOGS/report.log"
log "done; results in $RES/results.md and $RES/results.json"
