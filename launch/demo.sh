#!/usr/bin/env bash
# The main job on a laptop: synthetic VP9 videos -> WebDataset shards -> 2-rank DeepSpeed
# ZeRO-2 pretraining of the tiny model on CPU, tracked in MLflow (sqlite in ./mlflow.db).
# Run through `make demo`, which sets up the environment first. Re-running resumes/finishes.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "== 1/3 synthetic videos (motion classes, VP9) -> demo/videos"
if [ ! -d demo/videos ]; then
  python data_tools/make_synthetic.py demo/videos --videos 96 --codec vp9 --size 80 --frames 32
fi

echo "== 2/3 shards (transcoded, indexed, with manifest) -> demo/shards"
python data_tools/build_shards.py demo/videos demo/shards --codec vp9 --short-side 80 --shard-size 24

echo "== 3/3 pretraining: deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny.json"
deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny.json "$@"
