#!/usr/bin/env bash
# The search that chose the fast preset's LeNet-5 recipe for MNIST: the fastest training
# whose final validation accuracy reaches 98.8%. The validation split (a tenth of each
# class's training images) is harder than the test split: over this search's first trials
# a model scored 0.3-0.5 points higher on test than on validation, so 98.8% there stands
# for about 99.2% on test - the preset's promise, 99.0% for every seed, and a margin for the
# seeds the search never saw.
#
#     bash benchmarks/tune_lenet5_fast.sh [DATA_DIR] [OUT]
#
# Each trial is an ordinary run on 54,000 training images (a tenth held out for
# validation), scored by its training seconds, so run it on a quiet machine; running the
# same command again continues the search. The study it found is kept beside this file
# (tune_lenet5_fast/: results.md, best.toml, history.png, importance.png, tune.json,
# study.db); benchmarks/RESULTS.md says what came of it.
set -euo pipefail
data=${1:-../shared/data}
out=${2:-tunes/lenet5-mnist-fast}
exec cnnlab tune lenet5 mnist --data-dir "$data" --out "$out" \
    --target 98.8 --val-split 0.1 --trials 48 --seed 0 --jobs 1 --telemetry 0 --quiet \
    --space batch-size=64,96,128,192,256 \
    --space lr=0.03:0.4:log \
    --space momentum=0.8:0.95 \
    --space label-smoothing=0:0.2 \
    --space epochs=0.7:1.8 \
    --space ema=0,0.99,0.995,0.998
