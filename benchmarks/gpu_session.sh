#!/usr/bin/env bash
# One prepared GPU session (issue 5): everything a single H100/H200 call should measure, in one command of at most
# ~9 minutes, every part bounded by its own timeout so a hang costs only its share. Outputs go to $OUT (at most 8
# files: one log per part, the calibrated profile, summary.txt); a short table is printed last.
#
#   benchmarks/gpu_session.sh --fetch-wheels   # HERE (CPU machine, before the call): pydantic & co. into .whl/,
#                                              # which the device image lacks (it has torch, triton, networkx,
#                                              # numpy, tabulate, pytest, hypothesis)
#   benchmarks/gpu_session.sh                  # THERE: run tool, command "bash benchmarks/gpu_session.sh",
#                                              # carry [".whl"], timeout_s 600
#   benchmarks/gpu_session.sh --cpu-smoke      # here: every part at toy size on CPU (tests/test_executor_bench.py)
#
# Parts: pytest -m gpu; benchmarks/kernels.py --quick; benchmarks/train_gpu.py (1.5B Loom with recompute none, op and
# full, vs plain PyTorch); loom calibrate (bounded); loom verify examples/llama-1.5b-h200.toml with that
# profile. Nothing is pip-installed from an index there: the repo is put on PYTHONPATH through a small package
# shim (pyproject maps spec/ -> loom.spec etc.) and, where pydantic is missing, the carried wheels go to a scratch
# --target directory with --no-index --no-deps.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-gpu}"
PY="${PY:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")";; esac   # absolute: parts run elsewhere
WHEELS="pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0"

if [ "$MODE" = "--fetch-wheels" ]; then
    mkdir -p .whl
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
fi

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
T0=$(date +%s)

# ---- the environment: carried wheels, then the package shim ---------------------------------------------------
if ! "$PY" -c "import pydantic" 2>/dev/null; then      # the device image lacks it; a dev machine has it
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_session: pydantic is missing and no .whl/ was carried: run" \
        "'bash benchmarks/gpu_session.sh --fetch-wheels' here first and carry .whl"; exit 1; }
    SITE="$(mktemp -d)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_session: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
SHIM="$(mktemp -d)"
mkdir -p "$SHIM/loom"
for f in loom/*.py; do ln -s "$ROOT/$f" "$SHIM/loom/"; done
for sub in spec simulator executor kernels; do ln -s "$ROOT/$sub" "$SHIM/loom/$sub"; done
# The shim comes before the repo (whose loom/ lacks spec/, executor/, ...), and every part runs from a scratch
# directory: `python -m` puts the working directory first on sys.path, and the repo root there would shadow it.
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
cd "$WORK"
"$PY" -c "
import sys, loom.executor.trainer, torch
where = loom.executor.trainer.__file__
print('loom.executor from', where, '| torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '| python', sys.version.split()[0])
sys.exit(0 if where.startswith('$SHIM') else 'gpu_session: loom was not imported through the shim')
" | tee "$OUT/summary.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_session: loom does not import through the shim"; exit 1; }

if [ "$MODE" = "--cpu-smoke" ]; then
    SPEC="$ROOT/examples/tiny-cpu.toml"
    TRAIN_ARGS="--cpu-smoke --steps 2 --loom-recompute none,op,full"
    CAL_S=4; VERIFY_STEPS=2
    T_PYTEST=240; T_KERN=60; T_TRAIN=120; T_CAL=90; T_VERIFY=240
else
    SPEC="$ROOT/examples/llama-1.5b-h200.toml"
    # none: the MFU ceiling (verify predicts 37.8 GB: 18 B/param of states in Megatron's bf16 layout + 9.3 GiB of
    # activations); op (torchtitan's per-op SAC: keeps half the matmul outputs and attention's, reruns K, O, up;
    # 32.4 GB) and full (28.7 GB): the runs that should fit 33 GB, at their recompute cost (docs/executor.md)
    TRAIN_ARGS="--loom-recompute none,op,full"
    CAL_S=30; VERIFY_STEPS=3
    # 90 + 80 + 210 + 55 + 110 = 545 s at most, plus ~15 s of set-up: within the run tool's 600 s. train_gpu:
    # four 1.5B inits on the host (~20 s each), Triton's first compiles, 13 steps per run.
    T_PYTEST=90; T_KERN=80; T_TRAIN=210; T_CAL=55; T_VERIFY=110
fi

declare -a NAMES RCS SECS LAST
part() {   # part NAME TIMEOUT_S LOG CMD...: run bounded, log to $OUT/LOG, remember rc, seconds, last line
    local name="$1" limit="$2" log="$OUT/$3"; shift 3
    local t=$(date +%s)
    echo "=== $name: $* (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    NAMES+=("$name"); RCS+=("$rc"); SECS+=("$(( $(date +%s) - t ))")
    LAST+=("$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-110)")
    # appended as each part ends: if the whole call is cut short, summary.txt still says how far it got
    echo "    rc $rc, $(( $(date +%s) - t )) s: ${LAST[-1]}" | tee -a "$OUT/summary.txt"
}

part "pytest -m gpu" "$T_PYTEST" pytest_gpu.log "$PY" -m pytest -m gpu -q -p no:cacheprovider "$ROOT/tests"
part "kernels.py --quick" "$T_KERN" kernels.log "$PY" "$ROOT/benchmarks/kernels.py" --quick
part "train_gpu.py" "$T_TRAIN" train_gpu.log "$PY" "$ROOT/benchmarks/train_gpu.py" $TRAIN_ARGS --json "$OUT/train_gpu.json"
part "loom calibrate" "$T_CAL" calibrate.log "$PY" -m loom.cli calibrate --seconds "$CAL_S" --out "$OUT/profile.json"
PROFILE_ARGS=()
[ -s "$OUT/profile.json" ] && PROFILE_ARGS=(--profile "$OUT/profile.json")
part "loom verify" "$T_VERIFY" verify.log "$PY" -m loom.cli verify "$SPEC" ${PROFILE_ARGS[@]+"${PROFILE_ARGS[@]}"} \
    --steps "$VERIFY_STEPS"

{
    echo
    echo "gpu_session ($MODE), $(( $(date +%s) - T0 )) s in all; logs in $OUT"
    printf '%-20s %4s %5s  %s\n' part rc s "last line"
    for i in "${!NAMES[@]}"; do
        printf '%-20s %4s %5s  %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${LAST[$i]}"
    done
    echo
    echo "train_gpu (target: Loom >= 60 % MFU within 33 GB):"
    grep -E '^(loom executor|plain PyTorch)' "$OUT/train_gpu.log" || echo "  (no table: see train_gpu.log)"
} | tee -a "$OUT/summary.txt"
exit 0
