#!/usr/bin/env bash
# One command for a lent GPU machine (torch + Triton preinstalled, no network):
#
#   bash bench/gpu_check.sh OUTDIR [--quick]
#
# Stages, each with its own time limit so that the whole script ends in time (about 9 minutes
# on an H100-class GPU, --quick about 4) and every stage's output survives a later one's
# failure or time-out:
#   1. build    pip install --no-build-isolation --no-deps -e .  (the extension, for this GPU)
#   2. info     python -m fastcnn.info
#   3. tests    the GPU tests (-m gpu): kernels against the reference, whole fused models
#   4. models   bench/bench_models.py on the core set, one pytest run per model (JSON each)
#   5. host     bench/bench_host_overhead.py
#   6. report   python -m bench.report on the JSON files, into OUTDIR (the repository's own
#               RESULTS.md/README are not touched: copy OUTDIR/*.json to bench/runs/ and run
#               the report there to commit them)
# Logs, JSON, report and stage times land in OUTDIR; a summary is printed at the end, and the
# exit status is 1 if any stage failed or timed out (the other stages still ran).
#
# --smoke runs the same pipeline on a machine without a GPU (no build; a tiny CPU selection)
# to check the plumbing before a GPU session; CI (.ci/run) runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash bench/gpu_check.sh OUTDIR [--quick|--smoke]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
MODE=full
for arg in "$@"; do
    case $arg in
        --quick) MODE=quick ;;
        --smoke) MODE=smoke ;;
        *) usage ;;
    esac
done
case $OUT in -*) usage ;; esac
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
START=$(date +%s)
FAILED=""
: > "$OUT/stages.txt"

if [ "$MODE" != smoke ]; then
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA GPU visible to torch (use --smoke to check the pipeline on CPU)" >&2
        exit 2
    fi
fi

# Budgets in seconds per stage: full / quick.
if [ "$MODE" = full ]; then
    B_BUILD=200; B_TESTS=150; B_MODELS=170; B_HOST=45; ROUNDS_NOTE="all variants"
    MODELS="resnet20 simplenet wrn16_8 densenet_bc_100_12 se_resnext29_4x64d resnext29_4x64d"
    VARIANTS_FAST="eager,fused-triton,fused-cuda"
    VARIANTS_COMPILE="compile,fused-cuda+compile,fused-triton+compile"
    TEST_SELECT=(-m gpu)
elif [ "$MODE" = quick ]; then
    B_BUILD=120; B_TESTS=45; B_MODELS=50; B_HOST=0; ROUNDS_NOTE="no compile variants"
    MODELS="resnet20 simplenet"
    VARIANTS_FAST="eager,fused-triton,fused-cuda"
    VARIANTS_COMPILE=""
    TEST_SELECT=(-m gpu -k "model or memory or launches or bn_act_conv")
else
    B_BUILD=0; B_TESTS=120; B_MODELS=240; B_HOST=120; ROUNDS_NOTE="CPU smoke run"
    MODELS="lenet5"
    VARIANTS_FAST="eager,fused-cpu"
    VARIANTS_COMPILE=""
    TEST_SELECT=(-m gpu)
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log, record the time
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    echo "== [$name] (limit ${limit}s) $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local status=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT"
    [ $rc -ne 0 ] && [ "$status" = ok ] && status="exit $rc"
    [ "$status" = ok ] || FAILED="$FAILED $name"
    printf '%-28s %4ds  %s\n' "$name" "$dt" "$status" | tee -a "$OUT/stages.txt"
    tail -n 3 "$OUT/$name.log" | sed 's/^/   | /'
    return $rc
}

left() { echo $(( DEADLINE - $(date +%s) )); }

if [ "$MODE" = full ]; then DEADLINE=$(( START + 530 )); elif [ "$MODE" = quick ]; then DEADLINE=$(( START + 230 )); else DEADLINE=$(( START + 900 )); fi

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "$MODE" != smoke ]; then
    stage build "$B_BUILD" $PY -m pip install --no-build-isolation --no-deps -e . \
        || echo "gpu_check: the build failed: the cuda backend will be missing (see $OUT/build.log)"
fi
stage info 60 $PY -m fastcnn.info
$PY -m fastcnn.info > "$OUT/info.txt" 2>&1

# whole models first (the most telling), then every other GPU test; -v so that a time-out
# still leaves each finished test's outcome in the log
stage tests "$B_TESTS" $PY -m pytest tests/test_triton_models.py tests/test_extension_models.py \
    tests/test_memory.py tests "${TEST_SELECT[@]}" -v --tb=short -rfE --no-header -p no:cacheprovider \
    --junitxml="$OUT/tests.xml"
[ $? -eq 5 ] && echo "   (no GPU test ran: expected only in --smoke mode)"

# Model benchmarks: one pytest run per model so that each model's JSON survives a time-out.
models_end=$(( $(date +%s) + B_MODELS ))
for variants in "$VARIANTS_FAST" "$VARIANTS_COMPILE"; do
    [ -n "$variants" ] || continue
    tag=$( [ "$variants" = "$VARIANTS_FAST" ] && echo fast || echo compile )
    for m in $MODELS; do
        remaining=$(( models_end - $(date +%s) ))
        if [ $remaining -lt 15 ] || [ "$(left)" -lt 40 ]; then
            echo "   (models: out of time before $m/$tag)" | tee -a "$OUT/stages.txt"
            break 2
        fi
        stage "models-$m-$tag" "$remaining" $PY -m pytest bench/bench_models.py --benchmark-only -q \
            --no-header -p no:cacheprovider --bench-models="$m" --bench-variants="$variants" \
            --benchmark-json="$OUT/models-$m-$tag.json"
    done
done

if [ "$B_HOST" -gt 0 ] && [ "$(left)" -gt 30 ]; then
    limit=$(( $(left) - 20 < B_HOST ? $(left) - 20 : B_HOST ))
    host_k=()
    [ "$MODE" = smoke ] && host_k=(-k "ConvBnAct and not residual")
    stage host "$limit" $PY -m pytest bench/bench_host_overhead.py --benchmark-only -q --no-header \
        -p no:cacheprovider "${host_k[@]}" --benchmark-json="$OUT/host.json"
fi

cp bench/RESULTS.md "$OUT/RESULTS.md"; cp README.md "$OUT/README.md"
jsons=$(ls "$OUT"/*.json 2>/dev/null)
if [ -n "$jsons" ]; then
    # shellcheck disable=SC2086
    stage report 60 $PY -m bench.report $jsons --results "$OUT/RESULTS.md" --readme "$OUT/README.md" \
        --plots "$OUT/plots"
else
    echo "gpu_check: no benchmark JSON was written; no report" | tee -a "$OUT/stages.txt"
fi

total=$(( $(date +%s) - START ))
echo "== done in ${total}s ($MODE: $ROUNDS_NOTE); stage times in $OUT/stages.txt"
printf '%-28s %4ds\n' total "$total" >> "$OUT/stages.txt"
cat "$OUT/stages.txt"
if [ -n "$FAILED" ]; then
    echo "gpu_check: stage(s) failed or timed out:$FAILED (logs in $OUT); the others' results are kept" >&2
    exit 1
fi
