#!/usr/bin/env bash
# The bench run for a CUDA GPU (the one script to run when a GPU is available): long documents,
# both fine-tuning stages (train/longdoc-stage1.yaml, train/longdoc.yaml) given more time and needle
# documents up to 16k pieces in stage 2, then the encode-cost table (bf16) and the retrieval tables
# of the result (python -m bench.longdoc, each also written as CSV). Every log, CSV and the final
# model go to OUT (default runs/gpu).
#   bash bench/gpu.sh runs/demo/model [OUT] [STAGE1_S] [STAGE2_S]
# A quick run through every step on a CPU:
#   DEVICE=cpu COST_LENGTHS=1024 LENGTHS=14,512 QUERIES=16 bash bench/gpu.sh runs/demo/model /tmp/x 20 20
set -uo pipefail
rm -rf /tmp/longdoc-stage1 /tmp/longdoc
cd "$(dirname "$0")/.."
DEMO=${1:?usage: bench/gpu.sh DEMO_MODEL [OUT] [STAGE1_S] [STAGE2_S]}
OUT=${2:-runs/gpu}
S1=${3:-130}
S2=${4:-160}
DEVICE=${DEVICE:-cuda}
COST_LENGTHS=${COST_LENGTHS:-4096,8192,16384,32768}
LENGTHS=${LENGTHS:-14,512,2048,4096,8192,16384}
QUERIES=${QUERIES:-512}
ACC=$([ "$DEVICE" = cpu ] && echo cpu || echo gpu)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
hms() { printf '00:00:%02d:%02d' $(($1 / 60)) $(($1 % 60)); }
[ "$DEVICE" = cpu ] || nvidia-smi -L
python -m mmformer.cli fit --config train/longdoc-stage1.yaml \
    --trainer.accelerator "$ACC" --trainer.precision bf16-mixed --trainer.enable_progress_bar false --trainer.max_time "$(hms "$S1")" \
    --trainer.default_root_dir /tmp/longdoc-stage1 --trainer.logger.init_args.save_dir /tmp/longdoc-stage1 \
    --model.pretrained "$DEMO" --model.export_dir /tmp/longdoc-stage1/model --model.time_budget_s "$S1" \
    --data.num_workers 6 2>&1 | tail -n 30 | tee "$OUT/stage1.txt"
tail -n 3 /tmp/longdoc-stage1/logs/version_0/metrics.csv >> "$OUT/stage1.txt"
python -m mmformer.cli fit --config train/longdoc.yaml \
    --trainer.accelerator "$ACC" --trainer.precision bf16-mixed --trainer.enable_progress_bar false --trainer.max_time "$(hms "$S2")" \
    --trainer.default_root_dir /tmp/longdoc --trainer.logger.init_args.save_dir /tmp/longdoc \
    --model.pretrained /tmp/longdoc-stage1/model --model.export_dir "$OUT/model" --model.time_budget_s "$S2" \
    --data.lengths "[64,128,256,512,1024,2048,4096,8192,16384]" --data.num_workers 6 2>&1 | tail -n 30 | tee "$OUT/stage2.txt"
cp /tmp/longdoc/logs/version_0/metrics.csv "$OUT/stage2-metrics.csv"
MODEL=$([ -f "$OUT/model/config.json" ] && echo "$OUT/model" || echo "$DEMO")
python -m bench.longdoc --model "$MODEL" --only cost --device "$DEVICE" --precision bf16 --repeats 5 \
    --cost-lengths "$COST_LENGTHS" --csv "$OUT/longdoc-cost.csv" 2>&1 | tee "$OUT/cost.txt"
python -m bench.longdoc --model "$OUT/model" --only retrieval --device "$DEVICE" \
    --lengths "$LENGTHS" --queries "$QUERIES" --long-queries "$QUERIES" --split-length 2048 \
    --csv "$OUT/longdoc-retrieval.csv" 2>&1 | tee "$OUT/retrieval.txt"
