#!/usr/bin/env bash
# What we check on a CUDA machine, in one go: the tests of the training code on the GPU, training
# throughput (eager and torch.compile, bf16 autocast, channels_last), and the real train stage on the
# CIFAR-10 subset with MLflow tracking. Logs and JSON lines go to $OUT (default: gpu-results/).
#
#     bash benchmarks/gpu_checks.sh [SUBSET_DIR] [IMAGES]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
subset=${1:-../shared/data/cifar10-subset}
images=${2:-20480}
mkdir -p "$out"
scratch=$(mktemp -d)
export MLFLOW_TRACKING_URI="sqlite:///$scratch/mlflow.db" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, mlflow; print('torch', torch.__version__, 'mlflow', mlflow.__version__)" \
  | tee -a "$out/device.txt"

echo "== tests of the training code, on the GPU"
python3 -m pytest -q -p no:cacheprovider tests/test_loader.py tests/test_models.py tests/test_train.py \
  2>&1 | tee "$out/pytest.txt" | tail -n 15

echo "== training throughput (images/s)"
for args in "--models cnn resnet18 vgg16_transfer vgg16_finetune --batch-size 512" \
  "--models resnet18 --batch-size 1024" \
  "--models resnet18 --batch-size 512 --compile" \
  "--models resnet18 --batch-size 1024 --compile"; do
  # shellcheck disable=SC2086
  python3 benchmarks/train_throughput.py --images "$images" $args 2>>"$out/throughput.log" \
    | sed "s|^{|{\"args\": \"$args\", |" | tee -a "$out/throughput.jsonl"
done

if [ -d "$subset" ]; then
  echo "== train stage on the real subset"
  for model_args in "--model resnet18 --epochs 40" "--model cnn --epochs 20" \
    "--model resnet18 --epochs 40 --compile true"; do
    started=$EPOCHREALTIME
    # shellcheck disable=SC2086
    python3 -m pipeline.cli train $model_args --data-dir "$subset" >>"$out/train.log" 2>&1
    rc=$?
    seconds=$(awk "BEGIN {print $EPOCHREALTIME - $started}")
    echo "{\"args\": \"$model_args\", \"rc\": $rc, \"seconds\": $seconds}" | tee -a "$out/train.jsonl"
  done
  python3 - <<'EOF' | tee -a "$out/train.jsonl"
import json, mlflow
for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
    print(json.dumps({"run": run.info.run_name, "status": run.info.status,
                      "compile": run.data.params.get("compile"),
                      "model": run.data.params.get("model"),
                      **{k: round(v, 4) for k, v in run.data.metrics.items()}}))
EOF
fi
rm -rf "$scratch"
