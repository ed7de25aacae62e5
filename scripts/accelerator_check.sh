#!/usr/bin/env bash
# The whole GPU/TPU path in one call of a lent accelerator machine, each part under its own time limit, every log
# under OUT so that a part cut short still reports what it did:
#   tests  the tests that exercise accelerator code (the cuDNN attention test runs only there; the Pallas scan
#          compiles for the device instead of interpreting);
#   train  the default experiment, and a GPT run resumed from its checkpoint, through `python -m train`;
#   bench  scripts/accelerator_bench.py (BENCH_ARGS picks sections and rows).
#
#   bash scripts/accelerator_check.sh OUT [tests] [train] [bench]        # the parts named, in that order; all if none
#
# Packages the machine lacks travel as wheels in .whl/ (installed into $SITE, /tmp/site by default: give two calls
# that run side by side their own). Limits in seconds: TESTS_S, TRAIN_S, BENCH_S; TESTS picks the test files.
set -u
out=${1:?usage: accelerator_check.sh OUT [tests] [train] [bench]}
shift
parts=${*:-tests train bench}
site=${SITE:-/tmp/site}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$site:$PWD" JAX_TRACEBACK_FILTERING=off
py=${PYTHON:-python3}
rm -rf "$site"  # a warm machine keeps the last call's
if [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  $py -c "import jax, jaxlib, flax, optax, orbax.checkpoint as o, hydra, torch; print('jax', jax.__version__,
'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__,
'hydra', hydra.__version__, 'torch', torch.__version__); print(jax.devices())" 2>&1
} | tee "$out/env.log"

for part in $parts; do
  start=$(date +%s)
  case $part in
    tests)
      # Several pytest workers share the device: no process takes XLA's default 75% of its memory up front.
      # SIGINT at the limit: pytest stops as on Ctrl-C and still prints the failures it has seen.
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s INT -k 20 "${TESTS_S:-150}" $py -m pytest -o addopts="" -q \
        -rfEs --tb=short -p no:cacheprovider -n "${TEST_WORKERS:-4}" \
        ${TESTS:-tests/test_layers.py tests/test_pallas_scan.py tests/test_gpt.py tests/test_mamba.py} \
        >"$out/tests.log" 2>&1
      status=$?
      pkill -f 'exec\(eval\(sys.stdin' # xdist's workers outlive a main process that the time limit ended
      (exit $status)
      ;;
    train)
      run=/tmp/archlab-runs
      rm -rf $run
      timeout -k 5 "${TRAIN_S:-90}" bash -c "
        $py -m train hydra.run.dir=$run/default &&
        $py -m train model=gpt data=bytes trainer.steps=100 checkpoint.every=50 hydra.run.dir=$run/gpt &&
        $py -m train model=gpt data=bytes trainer.steps=150 checkpoint.every=50 hydra.run.dir=$run/gpt &&
        tail -n 2 $run/default/metrics.jsonl $run/gpt/metrics.jsonl" >"$out/train.log" 2>&1
      ;;
    bench)
      # The PyTorch twins share the device with JAX in one process: JAX takes 60% of its memory, not 75%.
      XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.6} timeout -k 5 "${BENCH_S:-300}" \
        $py scripts/accelerator_bench.py --out "$out/accelerator.json" ${BENCH_ARGS:-} >"$out/bench.log" 2>&1
      ;;
    *) echo "unknown part $part (valid: tests, train, bench)"; exit 2 ;;
  esac
  echo "== $part: exit $? after $(($(date +%s) - start)) s"
  tail -n 40 "$out/$part.log"
done
