#!/usr/bin/env bash
# The GPU check: run on a machine with one CUDA GPU, from the repository root, after
# `pip install -e .`. About 5-10 minutes. Results (JSON) land under ${OUT:-outputs/gpu_check}:
#   default.json        benchmark of the default model (tiny FCN-8s, 128 px), bf16 autocast, with the
#                       bare-loop comparison (bare_ratio, eval_bare_ratio)
#   vgg16_fcn8s.json    benchmark of VGG16 FCN-8s at 512x512, bf16, channels-last, torch.compile
#   (both with trainer.channels_last=auto, NHWC on GPUs, and the fused AdamW: "optimizer" in the JSON)
#   deterministic/      two short deterministic-mode runs that must give identical metrics
set -euo pipefail
if [ $# -gt 0 ]; then  # it takes no arguments: --help (or anything else) prints this header and runs nothing
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  [ "$1" = "-h" ] || [ "$1" = "--help" ]; exit $?
fi
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

python scripts/benchmark.py trainer.device=cuda trainer.num_workers=6 trainer.batch_size=32 \
  trainer.channels_last=auto bench.bare=true hydra.run.dir="$out/run_default"
cp "$out/run_default/benchmark.json" "$out/default.json"

# 512 px images for the 512 px benchmark: a small generated set, kept apart from data/shapes.
python scripts/benchmark.py model=vgg16_fcn8s model.pretrained=false \
  data.root=data/shapes512 data.generate.size=512 data.generate.num_train=320 data.generate.num_val=32 \
  data.crop_size=512 trainer.batch_size=16 trainer.precision=bf16 trainer.channels_last=auto \
  trainer.compile=true trainer.num_workers=8 bench.steps=20 \
  hydra.run.dir="$out/run_vgg16_fcn8s"
cp "$out/run_vgg16_fcn8s/benchmark.json" "$out/vgg16_fcn8s.json"

python - "$out" <<'PY'
import json, sys
for name in ("default", "vgg16_fcn8s"):
    r = json.load(open(f"{sys.argv[1]}/{name}.json"))
    print(name, "channels_last:", r["channels_last"], "optimizer:", r["optimizer"], "compile:", r["compile"],
          "mfu:", r["mfu"], "mfu_matmul:", r["mfu_matmul"], "bare_ratio:", r.get("bare_ratio"),
          "eval_bare_ratio:", r.get("eval_bare_ratio"))
    assert r["channels_last"] is True and r["optimizer"].endswith("/fused"), "auto/fused not taken on the GPU"
    assert name != "vgg16_fcn8s" or r["compile"], "torch.compile fell back to eager: see the run's log"
PY

for i in 1 2; do
  python scripts/train.py trainer.device=cuda trainer.deterministic=true trainer.epochs=1 \
    trainer.limit_train_batches=40 trainer.num_workers=4 logger=none hydra.run.dir="$out/deterministic/$i"
done
python - "$out" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/deterministic/{i}/metrics.json")) for i in (1, 2))
print("deterministic runs identical:", a == b)
sys.exit(0 if a == b else 1)
PY
