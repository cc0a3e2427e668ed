#!/usr/bin/env bash
# The prepared GPU check for a `device` session (H100/H200, torch 2.11 + triton 3.6, offline).
# Installs the package offline (building nern_fast._C with its CUDA ops for sm_90), then runs, each
# step with its own time limit so one hang cannot eat the session:
#   tests: csrc, Triton (five shards), inference and graphed-training tests, and the gradient
#          accuracy of every Triton backward candidate (bench.backward_accuracy) side by side
#                                                                    (session 8: 156 s, cut)
#   bench: benchmark suite (the issue goals) -> host vs GPU time of one decode -> on-demand
#          inference benchmark (graphs off/on, Triton and csrc)       (session 8's steps: 208 s)
#   profile: distillation-step profile, eager and in CUDA graphs (#5's GPU-busy goal, met in
#          session 8: 61 s); not part of "all"
# "all" (the default) runs the install and the tests and bench halves: session 8's steps took 416 s
# of them (install 52 s, tests 156 s, bench 208 s; a device session now has 15 minutes in all,
# machine start included), so about 7.5 minutes with the steps added since. "tests", "bench" and
# "profile" run one part (the build is kept between two calls on a warm machine).
# Under $OUT (default ./gpu_out): bench.csv and bench.log (the suite's rows and log), env.txt, and
# logs.tgz holding every step's log and side outputs (the device tool brings back at most 8 files,
# so the archive is refreshed after every step: a cut-off run still returns what it did).
# Usage (repository root):  bash bench/gpu_check.sh [all|tests|bench|profile]   (default all)
#                           bash bench/gpu_check.sh focus "NAME: COMMAND" ...   (chosen checks only)
set -u
OUT=${OUT:-$PWD/gpu_out}
LOGS=$(mktemp -d)/logs   # outside $OUT: only the archive of it travels back
mkdir -p "$LOGS"
WHAT=${1:-all}
export PYTHONUNBUFFERED=1
export NERN_FAST_CUDA_ARCHS=${NERN_FAST_CUDA_ARCHS:-9.0}   # H100/H200 only: halves the nvcc time
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "cpus: $(nproc)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $LOGS/NAME.log, report rc
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$LOGS/steps.txt"
  tail -n 12 "$LOGS/$name.log"
  tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" logs 2>/dev/null
  return $rc
}
pytest_step() {  # pytest_step NAME SECONDS FILES...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" $PY -m pytest -q --no-header -p no:cacheprovider -rs --maxfail=20 "$@"
}

step install 150 $PY -m pip install -v --no-index --no-deps --no-build-isolation -e . || {
  echo "install failed: see logs/install.log"; exit 1; }
grep "nern_fast setup" "$LOGS/install.log" | tee -a "$OUT/env.txt"
$PY -c "import nern_fast, nern_fast.ops as o, torch; \
r=o.make_request([torch.zeros(8,240,device='cuda'),torch.zeros(9,8,device='cuda')], \
nern_fast.WeightLayout.from_shapes([(4,4)]), nern_fast.EncodingSpec(), None, 'fp32'); \
print('backends on cuda:', o.availability(r))" 2>&1 | tee -a "$OUT/env.txt"

{  # the toolchain the extension was built with and the C++ runtime it loads (sessions 1-2: the
   # CPU ops crashed at the first exception they threw; suspect: a newer g++ than the libstdc++ loaded)
  echo "== toolchain"
  ${CXX:-c++} --version 2>&1 | head -1; /usr/bin/g++ --version 2>&1 | head -1
  ls -l "$(command -v c++ 2>/dev/null)" /opt/gcc/bin/g++ 2>&1 | head -2
  head -c 400 /opt/gcc/bin/g++ 2>/dev/null | grep -a -v "^#!" ; echo
  readelf -d nern_fast/_C*.so 2>/dev/null | grep NEEDED | grep -oE "\[lib[^]]*\]" | tr '\n' ' '; echo
  ldd nern_fast/_C*.so 2>&1 | grep -E "stdc|gcc_s|gomp"
  $PY -c "import torch; print('torch cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI); \
import ctypes.util; print('libstdc++ found', ctypes.util.find_library('stdc++'))" 2>&1
  strings nern_fast/_C*.so 2>/dev/null | grep -oE "GLIBCXX_3\.4\.[0-9]+" | sort -uV | tail -1
} >> "$OUT/env.txt" 2>&1

# "focus": a follow-up's chosen checks, side by side, each argument one step "NAME: COMMAND" (run
# by bash in the repository root, with $LOGS exported for side outputs), each under FOCUS_LIMIT s.
if [ "$WHAT" = focus ]; then
  shift
  export LOGS NERN_FAST_TRITON_AUTOTUNE=0 NERN_FAST_TRITON_TUNE_CACHE=0
  for spec in "$@"; do
    step "${spec%%:*}" "${FOCUS_LIMIT:-150}" bash -c "${spec#*:}" > /dev/null &
  done
  wait
  cat "$LOGS/steps.txt"
  for f in "$LOGS"/*.log; do echo "-- $(basename "$f")"; tail -n 4 "$f"; done
  tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" logs
  exit 0
fi

# Tests first: the code changed since the last GPU session is verified even if the session is cut.
# They run side by side (one GPU, 16 CPUs: the Triton tests are bound by kernel compilation, one
# compile per CPU), the Triton GPU tests in five round-robin shards, the tuner-candidate tests (the
# longest: every candidate compiled) first; session 8's three shards of 71 tests ran 126-150 s each
# and two were cut in those tests (five since session 13: nine compile-heavy GPU tests came since).
# Default configurations, no tuning and no on-disk tuning decisions: the bench step times candidates
# on a quiet GPU and keeps its choices.
if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
  export NERN_FAST_TRITON_AUTOTUNE=0 NERN_FAST_TRITON_TUNE_CACHE=0
  $PY -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/test_triton.py 2>/dev/null \
    | grep "::" | awk '/every_tuner_candidate/ {print; next} {rest[n++] = $0} END {for (j = 0; j < n; j++) print rest[j]}' \
    > "$LOGS/triton_gpu_tests.txt"
  for i in 0 1 2 3 4; do
    awk -v i=$i 'NR % 5 == i' "$LOGS/triton_gpu_tests.txt" > "$LOGS/triton_shard$i.txt"
    [ -s "$LOGS/triton_shard$i.txt" ] && \
      pytest_step tests_triton$i 170 --durations=5 $(cat "$LOGS/triton_shard$i.txt") > /dev/null &
  done
  pytest_step tests_csrc 120 tests/test_csrc.py > /dev/null &
  pytest_step tests_inference 60 tests/test_inference.py > /dev/null &  # CUDA-graph captures
  pytest_step tests_train_graphs 90 tests/test_train_recipes.py -m gpu > /dev/null &  # captured steps
  # Gradient errors of every Triton backward candidate against float64, eager's beside them (the
  # opt-in chunked K-major tf32 backward: 4x tf32's error at cea8d5d, dzᵀ made differently since).
  step backward_accuracy 150 $PY -m bench.backward_accuracy --layout resnet18 --precision tf32 \
    --rows 65536 --out "$LOGS/backward_accuracy.jsonl" > /dev/null &
  wait
  cat "$LOGS/steps.txt"
  for f in "$LOGS"/tests_*.log; do echo "-- $(basename "$f")"; tail -n 3 "$f"; done
  if grep -q "raw_op_error) exited with -" "$LOGS/tests_csrc.log"; then
    # The error-path crash again: rebuild the CPU ops with the system compiler in a copy and rerun
    # the error tests there (tells a toolchain mismatch from a bug of ours).
    step csrc_system_gcc 150 bash -c "rm -rf /tmp/sysgcc && cp -r . /tmp/sysgcc && cd /tmp/sysgcc && \
      CC=/usr/bin/gcc CXX=/usr/bin/g++ NERN_FAST_NO_CUDA=1 $PY setup.py build_ext --inplace -q && \
      ldd nern_fast/_C*.so | grep -E 'stdc|gcc_s' ; \
      $PY -m pytest -q -p no:cacheprovider tests/test_csrc.py -k 'raw_op_error or boundary'"
  fi
  unset NERN_FAST_TRITON_AUTOTUNE NERN_FAST_TRITON_TUNE_CACHE
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
  # The tuner's log: every timed candidate (kernel times per tile configuration) and the choice.
  step bench_run 190 env NERN_FAST_TRITON_TUNE_LOG=1 $PY -m nern_fast bench --device cuda --budget 140 \
    --out "$OUT"
  # Host (enqueue) time vs GPU kernel time per decode call, ResNet-20/56 (#3: the Triton backend's
  # fixed cost on small layouts).
  step decode_host_time 75 env NERN_FAST_TRITON_TUNE_LOG=1 $PY -m bench.decode_host_time --device cuda \
    --repeats 20 --out "$LOGS/decode_host_time.jsonl"
  # On-demand inference (with the graphs variants) in tf32: session 8 ran it in fp32, where the
  # Triton decode alone (4.3 ms of kernels per ResNet-56 decode) is about a materialized forward.
  # Since session 9 a forward's layer decodes share one preparation (packing + tables; a packing
  # graph with graphs=True) and small forwards also tune 32/16-row tiles (24 s in session 8).
  # Since session 10 attach decodes by groups of consecutive layers (6 calls per ResNet-56 forward
  # instead of 54); the per-layer variants (group_bytes=0) run beside them for comparison.
  step inference_prefetch 75 $PY -m bench.inference_prefetch --device cuda --nets resnet20,resnet56 \
    --batches 1,256 --repeats 20 --precision tf32 --out "$LOGS/inference_prefetch.jsonl"
  step inference_prefetch_csrc 40 $PY -m bench.inference_prefetch --device cuda --nets resnet56 \
    --batches 1,256 --repeats 20 --precision tf32 --backend csrc --out "$LOGS/inference_prefetch.jsonl"
fi
if [ "$WHAT" = profile ]; then
  step profile 45 $PY bench/profile_distill_step.py --count-ops --out "$LOGS/profile.json"  # 30 s cut it in session 2
  # The same step captured in CUDA graphs (#5's GPU-busy goal); kernels and tuning are cached by now.
  step profile_graphs 35 $PY bench/profile_distill_step.py --cuda-graphs --count-ops --warmup 5 --steps 10 \
    --out "$LOGS/profile_graphs.json"
fi
tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" logs
ls -la "$OUT"
