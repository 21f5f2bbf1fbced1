#!/usr/bin/env bash
# Every GPU benchmark in one call of about 8.5 minutes (GPU_BUDGET, default 500 s) on one H100/H200 with no network.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]          (default: docs/results/gpu)
#
# PACK_DIR (default RESULTS_DIR) receives the log and results.tgz only: on the lending tool, set
# PACK_DIR=$OUT, since it returns at most 8 files.
#
# Sections, most important first, each with its own time limit so that a slow one cannot starve
# the rest; results are written after every section (and packed into results.tgz, because the
# lending tool returns at most 8 files):
#   1. overhead        distillkit vs a hand-written loop, fm / cud-rk3, CIFAR-10 DDPM++ net, batch 128, TF32 (fm >= 0.97)
#   2. graphs-mnist    strict fp32 vs tf32, bf16 vs tf32 + graph capture (compile_mode reduce-overhead), then
#                      tf32 + compile (default mode, to tell graphs from compilation) if time is left, on the
#                      launch-bound MNIST net (songunet preset mnist, batch 256; target >= 2x fp32)
#   3. graphs-cifar10  the same on the CIFAR-10 DDPM++ net (target >= 2.2x fp32)
#   4. sampling        sample_ode / sample_seeded vs raw forward at NFE 1 (>= 0.97) and 4; 50k CIFAR-shaped samples end to end
#   5. method-cost     meanflow, shortcut, sct, scd, dmd2, sid relative to fm (JVP evaluations counted apart), peak memory
#   6. cuda-tests      the tests that run only on CUDA: sample_seeded's pinned copies, exact resume with CUDA graphs
# and, only when SECTIONS names them (they do not fit beside the rest):
#   mnist              equal-budget comparison fm, cud-euler, cud-rk3, cd, rf-distill (+ cud-rk2)
#   compile            torch.compile (tf32, default mode) on the CIFAR-10 net
# SECTIONS="overhead mnist" runs only those (default: sections 1-6); MNIST_VARIANTS replaces the
# MNIST variant list.
# Needs: the MNIST .gz files in .mnist/ (copy them from ../shared/data/mnist) for the mnist section and,
# where torchdata or tomli-w is missing, their wheels in .whl/ (see benchmarks/README.md).
set -u
RESULTS=${1:-docs/results/gpu}
PACK_DIR=${PACK_DIR:-$RESULTS}
BUDGET=${GPU_BUDGET:-500}          # seconds for all sections together
START=$(date +%s)
mkdir -p "$RESULTS" "$PACK_DIR"
LOG="$PACK_DIR/gpu-log.txt"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
pack() {  # the log is copied first: tar must not read a file that is still growing
    cp "$LOG" "$RESULTS/gpu-log.copy.txt" 2>/dev/null
    tar czf "$PACK_DIR/.results.tgz" -C "$RESULTS" --exclude results.tgz --exclude .results.tgz --exclude gpu-log.txt . \
        && mv "$PACK_DIR/.results.tgz" "$PACK_DIR/results.tgz"
}
section() {  # section NAME LIMIT_SECONDS COMMAND...: run with a hard limit of its own plus a margin
    local name=$1 limit=$2; shift 2
    if [[ " ${SECTIONS:-$ALL} " != *" $name "* ]]; then return; fi
    local now; now=$(left)
    if (( now < 30 )); then echo "== $name: skipped, ${now}s left"; return; fi
    (( limit > now )) && limit=$now
    echo "== $name (limit ${limit}s, ${now}s left) $(date -u +%H:%M:%S)"
    # A benchmark gets --time-limit (it skips what no longer fits); pytest takes none.
    local budget=(--time-limit "$limit"); [[ "$*" == "python3 -m pytest "* ]] && budget=()
    timeout --kill-after=10 $((limit + 20)) "$@" "${budget[@]}" || echo "== $name: exit code $?"
    pack
}
ALL="overhead graphs-mnist graphs-cifar10 sampling method-cost cuda-tests"

if ! python3 -c "import distillkit, torchdata, tomli_w" 2>/dev/null; then
    # No network here: the missing pure-Python packages travel as wheels, distillkit as source.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .; then
        # No build backend there: use the sources in place, with the entry points in a hand-made dist-info.
        export PYTHONPATH=/tmp/site:$PWD:$PWD/plugins
        python3 -c "import tomllib, pathlib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']
d = pathlib.Path('/tmp/site/distillkit-' + p['version'] + '.dist-info'); d.mkdir(parents=True, exist_ok=True)
(d / 'METADATA').write_text(f\"Metadata-Version: 2.1\nName: distillkit\nVersion: {p['version']}\n\")
(d / 'entry_points.txt').write_text('[distillkit]\n' + ''.join(f'{k} = {v}\n' for k, v in p['entry-points']['distillkit'].items()))" || exit 1
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$RESULTS/card.txt"
python3 -c "import torch, distillkit; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'distillkit', distillkit.__version__)"
export DISTILLKIT_CACHE=${DISTILLKIT_CACHE:-/tmp/distillkit-cache}

B=benchmarks
# SMOKE=1: the same flow on a CPU with a tiny network and budgets (to test this script before
# spending device time on it; the CUDA tests are then collected and skipped).
if [[ ${SMOKE:-0} == 1 ]]; then
    DEV=cpu; NET=tiny; SMALL=tiny; STEPS=4; IMAGES=1024; N=100; SAMPLES=1000; PAIRS=256
else
    DEV=cuda; NET=cifar10; SMALL=mnist; STEPS=15; IMAGES=256000; N=1000; SAMPLES=50000; PAIRS=10000
fi
section overhead 70 python3 $B/overhead.py --device $DEV --preset $NET --precision tf32 --variants fm,cud-rk3 \
    --warmup 5 --steps $STEPS --rounds 2 --out "$RESULTS/overhead-gpu.md"
section graphs-mnist 130 python3 $B/speed_options.py --device $DEV --preset $SMALL --settings fp32,tf32,bf16 \
    --compile "tf32 + graphs,tf32 + compile" --compile-budget 45 --warmup 5 --steps $((STEPS * 2)) --rounds 2 --out "$RESULTS/graphs-mnist-gpu.md"
section graphs-cifar10 115 python3 $B/speed_options.py --device $DEV --preset $NET --settings fp32,tf32,bf16 \
    --compile "tf32 + graphs" --compile-budget 60 --warmup 5 --steps $((STEPS * 2 / 3)) --rounds 2 --out "$RESULTS/graphs-cifar10-gpu.md"
section sampling 50 python3 $B/sampling.py --device $DEV --preset $NET --precision tf32 --nfe 1,4 \
    --count 3000 --batch 500 --rounds 2 --full-count $SAMPLES --out "$RESULTS/sampling-gpu.md"
section method-cost 80 python3 $B/method_cost.py --device $DEV --preset $NET --precision tf32 \
    --variants fm,meanflow,shortcut,sct,scd,dmd2,sid --warmup 3 --steps $((STEPS * 2 / 3)) --rounds 2 --no-memory \
    --out "$RESULTS/method-cost-gpu.md"
section cuda-tests 60 python3 -m pytest -q -p no:cacheprovider -k cuda -rs --junitxml "$RESULTS/cuda-tests.xml" \
    tests/test_samplers.py tests/test_engine.py
section mnist 170 python3 $B/equal_budget.py --device $DEV --dataset mnist --data-root .mnist --backbone unet \
    --variants ${MNIST_VARIANTS:-fm,cud-euler,cud-rk3,cd,rf-distill,cud-rk2} --budget-images $IMAGES --teacher-images $IMAGES \
    --set rf-distill:method_options.num_pairs=$PAIRS \
    --nfe 1,2,4,8,16 --metrics classifier_fd,fd_pixels --n $N --work /tmp/equal-budget --out "$RESULTS/mnist-gpu.md"
section compile 150 python3 $B/speed_options.py --device $DEV --preset $NET --settings fp32 \
    --compile "tf32 + compile" --compile-budget 100 --warmup 5 --steps $STEPS --rounds 1 --out "$RESULTS/compile-gpu.md"
echo "== done in $(( $(date +%s) - START ))s"
pack
