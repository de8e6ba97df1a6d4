#!/usr/bin/env bash
# GPU check (issue 6, item 5): one command, under 5 minutes on one CUDA GPU, that runs scripts/bench.py for
# cifar_cnn and digits_mlp and prints initsearch's trials per minute for each population size K
# (K=1: one trial at a time; K>1: batch_trials=K), next to the bare one-at-a-time train_run loop.
#
#   scripts/gpu_check.sh                 # on a CUDA machine
#   scripts/gpu_check.sh --cpu           # the same script on the CPU, tiny budget: checks that it runs
#
# cifar_cnn reads CIFAR-10 from data/cifar-10-batches-py when it is there (never downloads: a GPU machine
# may have no network); otherwise it trains on a synthetic CIFAR-shaped set (3x32x32, 10 classes, 10,000
# train / 2,000 val), which costs the same per step. The figures go to results/gpu_check/*.json; record them with
# the date in docs/performance.md.
# results/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [[ "${1:-}" == "--cpu" ]]; then
  DEVICE=cpu; TRIALS=4; STEPS=10; KS=1,2; THREADS=1; N_TRAIN=512; N_VAL=128
  CPU_SMALL=(model.width_multiplier=0.125 lsuv_batch=32)  # a CNN this size runs in seconds on a CPU
else
  DEVICE=cuda; TRIALS=32; STEPS=200; KS=1,4,16,32; THREADS=0; N_TRAIN=10000; N_VAL=2000; CPU_SMALL=()
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: CUDA is not available here (torch $("$PY" -c 'import torch; print(torch.__version__)')); use --cpu to check the script" >&2
    exit 2
  fi
  "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
fi

if [[ -f data/cifar-10-batches-py/data_batch_1 ]]; then
  CIFAR_DATA=(data.root=data data.download=false)
  echo "cifar_cnn: real CIFAR-10 from data/cifar-10-batches-py (subset as in the preset)"
else
  CIFAR_DATA=(data=synthetic "data.synthetic.input_shape=[3,32,32]" data.synthetic.num_classes=10
              data.synthetic.n_train=$N_TRAIN data.synthetic.n_val=$N_VAL)
  echo "cifar_cnn: no data/cifar-10-batches-py: synthetic CIFAR-shaped data ($N_TRAIN train, 3x32x32, 10 classes)"
fi

mkdir -p results/gpu_check
date -u +"gpu_check started %Y-%m-%d %H:%M:%S UTC"
start=$(date +%s)
"$PY" scripts/bench.py --study cifar_cnn --device "$DEVICE" --threads "$THREADS" --parts bcd --k "$KS" \
  --trials "$TRIALS" --steps "$STEPS" --out results/gpu_check/cifar_cnn.json "${CIFAR_DATA[@]}" "${CPU_SMALL[@]}"
"$PY" scripts/bench.py --study digits_mlp --device "$DEVICE" --threads "$THREADS" --parts bcd --k "$KS" \
  --trials "$TRIALS" --steps "$STEPS" --out results/gpu_check/digits_mlp.json

"$PY" - "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
print(f"\ntrials per minute ({sys.argv[1]} s for both):")
print(f"{'study':<12} {'device':<8} {'bare loop':>10} " + " ".join(f"{'K=' + k:>9}" for k in ("1", "4", "16", "32", "2")))
for name in ("cifar_cnn", "digits_mlp"):
    r = json.load(open(f"results/gpu_check/{name}.json"))
    parts = r["parts"]
    row = {"1": parts.get("c_initsearch", {}).get("trials_per_min")}
    for key, value in parts.items():
        if key.startswith("d_population_k"):
            row[key[len("d_population_k"):]] = value["trials_per_min"]
    cells = " ".join(f"{row[k]:9.1f}" if row.get(k) else f"{'-':>9}" for k in ("1", "4", "16", "32", "2"))
    bare = parts.get("b_bare", {}).get("trials_per_min") or float("nan")
    print(f"{name:<12} {r['config']['device']:<8} {bare:10.1f} {cells}")
EOF
