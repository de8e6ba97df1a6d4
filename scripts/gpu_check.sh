#!/usr/bin/env bash
# GPU check: one command, under 5 minutes on one CUDA GPU.
#  1. the population equivalence tests and the fused optimizers' bit-for-bit tests on CUDA (tests/test_population.py
#     and tests/test_optimizers.py -k cuda: stacked MLP and CNN, ResCNN
#     on both the stacked and the vmap engine, a user's module on vmap; SGD and Adam; shared and distinct seeds);
#  2. trials per minute of the cifar_cnn proxy (the preset's half-width VGG, 300 steps, batch 128, one seed
#     per trial, no baselines, no pruner, tracking off) on synthetic CIFAR-shaped data (3x32x32, 10 classes:
#     a GPU machine may have no network), with scripts/bench.py: the bare train_run loop (b), the study one
#     trial at a time (c, K=1) and with batch_trials=K (d, K=8 and 32);
#  3. one markdown table of those figures (also in results/gpu_check/cifar_cnn.json; results/ is git-ignored);
#  4. the residual_digits proxy's engines on the device (bench.py --engine-check 8: one at a time, stacked, vmap;
#     ms per member-step), which decides the residual proxy's default engine there.
# Record the table with its date in docs/performance.md ("GPU check").
#
#   scripts/gpu_check.sh            # on a CUDA machine
#   scripts/gpu_check.sh --cpu      # the same script on the CPU with a tiny budget: checks that it runs
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--cpu" ]]; then
  DEVICE=cpu; TRIALS=4; STEPS=10; KS=1,2; THREADS=1; N_TRAIN=512; N_VAL=128; TESTS=(-k "cnns_with_batchnorm"); RSTEPS=10
  SMALL=(model.width_multiplier=0.125 lsuv_batch=32 train.eval_every=5)  # seconds on a CPU
else
  DEVICE=cuda; TRIALS=32; STEPS=300; KS=1,8,32; THREADS=0; N_TRAIN=10000; N_VAL=2000; TESTS=(-k cuda); SMALL=(); RSTEPS=100
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: CUDA is not available here (torch $("$PY" -c 'import torch; print(torch.__version__)')); use --cpu to check the script" >&2
    exit 2
  fi
  "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
fi

mkdir -p results/gpu_check
date -u +"gpu_check started %Y-%m-%d %H:%M:%S UTC"
start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider tests/test_population.py tests/test_optimizers.py "${TESTS[@]}" 2>&1 | tail -n 3
"$PY" scripts/bench.py --study cifar_cnn --device "$DEVICE" --threads "$THREADS" --parts bcd --k "$KS" \
  --trials "$TRIALS" --steps "$STEPS" --batch-size 128 --no-mlflow --out results/gpu_check/cifar_cnn.json \
  data=synthetic "data.synthetic.input_shape=[3,32,32]" data.synthetic.num_classes=10 \
  data.synthetic.n_train=$N_TRAIN data.synthetic.n_val=$N_VAL "${SMALL[@]}"

"$PY" - "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
r = json.load(open("results/gpu_check/cifar_cnn.json"))
parts, cfg = r["parts"], r["config"]
bare = parts["b_bare"]["trials_per_min"]
rows = [("bare train_run loop", bare), ("initsearch, one at a time (K=1)", parts["c_initsearch"]["trials_per_min"])]
rows += [(f"initsearch, batch_trials={key[len('d_population_k'):]}", value["trials_per_min"])
         for key, value in parts.items() if key.startswith("d_population_k")]
print(f"\ncifar_cnn-shaped proxy on {cfg['device']}: {cfg['trials']} trials x {cfg['steps']} steps, batch "
      f"{cfg['batch_size']}, {cfg['model_parameters']:,} parameters; {sys.argv[1]} s in all, {cfg['date']}\n")
print("| run | trials/min | / bare loop |")
print("| --- | ---: | ---: |")
for label, rate in rows:
    print(f"| {label} | {rate:.1f} | {rate / bare:.2f}x |")
EOF
"$PY" scripts/bench.py --study residual_digits --device "$DEVICE" --threads "$THREADS" --parts b --trials 2 \
  --steps "$RSTEPS" --engine-check 8 --repeats 1 --no-mlflow --out results/gpu_check/residual_engines.json 2>&1 \
  | grep "engine check"
date -u +"gpu_check finished %Y-%m-%d %H:%M:%S UTC"
