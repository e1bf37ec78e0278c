#!/usr/bin/env bash
# GPU correctness (kernels, fast path vs torch path) and the latency benchmarks, in one or two device calls.
# Usage (on the GPU machine, repo root): HIGHSPEED_COMMIT=<hash> bash benchmarks/gpu_run.sh [core|rest|all] [TAG]
#   core: all op tests and the GPU end-to-end tests, then batch-1 Qwen3-30B-A3B and GLM-4.7-Flash (fast path with
#         kernel profiles, PDL off as an ablation, and the plain-torch baseline);
#   rest: the other presets, batch 8 and 32, and the kernel micro-benchmarks of the fused MoE, attention, RoPE
#         and the indexer;
#   ab:   A/B of switches: the op and GPU end-to-end tests, the kernels' register counts, then batch-1
#         Qwen3-30B-A3B and GLM-4.7-Flash as they are and once per switch in $AB_ENV (space-separated, e.g.
#         AB_ENV="HIGHSPEED_L2_PREFETCH=0 HIGHSPEED_PDL=0"; AB_ENV_QWEN / AB_ENV_GLM for one model only, e.g.
#         AB_ENV_QWEN="HIGHSPEED_TUNE_FUSED_DOWN=BLOCK_K=128"; several variables in one switch joined by '+',
#         e.g. "HIGHSPEED_PARTIAL_PICKS=0+HIGHSPEED_TUNE_FUSED_DOWN=ROW_SUMS=0"). Every run also writes its chain
#         timeline (bench latency --timeline-out) to benchmarks/results/timelines/; AB_PROFILE=0 skips the PDL-off
#         profile runs; AB_REPEAT=N runs N interleaved passes of the default and every variant.
# Records go to benchmarks/results/ (named with TAG, e.g. h200-run5) and come back as $OUT/results.tgz.
set -u
MODE=${1:-all}
TAG=${2:-h200}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" benchmarks/results
# Whatever happens, bring the records back as one file ($OUT returns at most 8 files).
trap 'tar czf "$OUT/results.tgz" benchmarks/results' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# The tests in 8 processes where pytest-xdist is installed (the H200 image has it: 67 s instead of 262 s for the
# full GPU suite, run 43), each test stopped after 100 s (pytest-timeout) so that a hang costs one test, not the call.
PAR=""; python3 -c "import xdist, pytest_timeout" 2>/dev/null && PAR="-n 8 --timeout 100"

bench() {  # name, args...
  local name=$1; shift
  timeout 150 python3 -m highspeed bench latency "$@" --output-json "benchmarks/results/$name-$TAG.json" 2>&1 \
    | grep -v Warning | tail -n 3 | tee -a "$OUT/bench.log"
}

if [ "$MODE" = core ] || [ "$MODE" = all ]; then
  timeout 330 python3 -m pytest -q -p no:cacheprovider $PAR tests/ops tests/engine/test_gpu_e2e.py 2>&1 | tail -n 60 \
    > "$OUT/gpu_tests.log"
  tail -n 8 "$OUT/gpu_tests.log"
  bench latency-qwen3-30b-a3b-b1 --preset qwen3-30b-a3b --random-weights --batch-size 1 --input-len 128 --output-len 256
  # Kernel profiles with PDL off: with it on, an eager kernel's time includes its wait for the previous one.
  HIGHSPEED_PDL=0 bench latency-qwen3-30b-a3b-b1-nopdl --preset qwen3-30b-a3b --random-weights --batch-size 1 --input-len 128 --output-len 256 --profile-out "$OUT/profile-qwen3-b1.txt"
  bench latency-qwen3-30b-a3b-b1-eager --preset qwen3-30b-a3b --random-weights --batch-size 1 --input-len 128 --output-len 64 --baseline eager
  bench latency-glm-4.7-flash-b1 --preset glm-4.7-flash --random-weights --batch-size 1 --input-len 128 --output-len 256
  HIGHSPEED_PDL=0 bench latency-glm-4.7-flash-b1-nopdl --preset glm-4.7-flash --random-weights --batch-size 1 --input-len 128 --output-len 256 --profile-out "$OUT/profile-glm-flash-b1.txt"
  bench latency-glm-4.7-flash-b1-eager --preset glm-4.7-flash --random-weights --batch-size 1 --input-len 128 --output-len 64 --baseline eager
fi
if [ "$MODE" = ab ]; then
  # AB_TESTS: the test paths to run first (default: all op tests and the GPU end-to-end tests); AB_TEST_ENV:
  # switches set for that test run only (e.g. AB_TEST_ENV="HIGHSPEED_FOLD_NORM=self"), so an off-by-default
  # variant is checked end to end before it is timed.
  env ${AB_TEST_ENV:-} timeout 330 python3 -m pytest -q -p no:cacheprovider $PAR ${AB_TESTS:-tests/ops tests/engine/test_gpu_e2e.py} 2>&1 \
    | tail -n 40 > "$OUT/gpu_tests.log"
  tail -n 4 "$OUT/gpu_tests.log"
  # AB_REGS=0: skip the register counts (when the kernels are unchanged and device time is short).
  [ "${AB_REGS:-1}" = 1 ] && timeout 120 python3 benchmarks/kernel_regs.py > "$OUT/kernel_regs.json" 2>&1
  # Each run also writes what each kernel adds to the replayed graph (bench latency --timeline-out).
  TL=benchmarks/results/timelines; mkdir -p $TL
  for p in ${AB_MODELS:-qwen3-30b-a3b glm-4.7-flash}; do   # AB_MODELS: other presets, e.g. deepseek-v2-lite
    # Per-preset settings are named AB_<WHAT>_<PRESET> (upper case, '-' and '.' as '_', e.g. GLM_5).
    key=$(printf '%s' "$p" | tr 'a-z.-' 'A-Z__')
    # AB_ARGS_<PRESET>: more bench arguments for that preset (e.g. AB_ARGS_GLM_5="--num-layers 5").
    var=AB_ARGS_$key; args=${!var:-}
    # One variant per switch, e.g. HIGHSPEED_L2_PREFETCH=0; AB_ENV_QWEN / AB_ENV_GLM: for that model only.
    # AB_ENV_<PRESET> (e.g. AB_ENV_DEEPSEEK_V2_LITE): for that preset only.
    var=AB_ENV_$key; extra=${!var:-}
    [ "$p" = glm-4.7-flash ] && extra="$extra ${AB_ENV_GLM:-}"; [ "$p" = qwen3-30b-a3b ] && extra="$extra ${AB_ENV_QWEN:-}"
    # AB_REPEAT=N: N interleaved passes of (default, every variant), so a ~1% difference can be told from the
    # run-to-run spread; passes after the first write records named ...-repN- and no timelines.
    for rep in $(seq 1 "${AB_REPEAT:-1}"); do
      sfx=""; [ "$rep" -gt 1 ] && sfx="-rep$rep"
      tl() { [ "$rep" = 1 ] && printf -- '--timeline-out %s' "$TL/timeline-$1-$TAG.txt"; }
      bench latency-$p-b1$sfx --preset $p --random-weights --batch-size 1 --input-len 128 --output-len 256 $args \
        $(tl "$p-b1")
      # Kernel profile with PDL off (with it on, an eager kernel's time includes its wait for the previous one).
      [ "$rep" = 1 ] && [ "${AB_PROFILE:-1}" = 1 ] && HIGHSPEED_PDL=0 bench latency-$p-b1-nopdl --preset $p \
        --random-weights --batch-size 1 --input-len 128 --output-len 256 --profile-out "$OUT/profile-$p-b1.txt"
      for sw in ${AB_ENV:-} $extra; do
        tag=$(printf '%s' "$sw" | sed 's/^HIGHSPEED_//' | tr -c 'A-Za-z0-9_' '-')
        env $(printf '%s' "$sw" | tr '+' ' ') timeout 150 python3 -m highspeed bench latency --preset $p --random-weights --batch-size 1 $args \
          --input-len 128 --output-len 256 --output-json "benchmarks/results/latency-$p-b1-HIGHSPEED_$tag$sfx-$TAG.json" \
          $(tl "$p-b1-HIGHSPEED_$tag") 2>&1 | grep -v Warning | tail -n 1 | sed "s/^/[$sw$sfx] /" | tee -a "$OUT/bench.log"
      done
    done
  done
fi
if [ "$MODE" = rest ] || [ "$MODE" = all ]; then
  bench latency-glm-4.5-air-20l-b1 --preset glm-4.5-air --num-layers 20 --random-weights --batch-size 1 --input-len 128 --output-len 128
  bench latency-deepseek-v2-lite-b1 --preset deepseek-v2-lite --random-weights --batch-size 1 --input-len 128 --output-len 128
  bench latency-glm-5-5l-b1 --preset glm-5 --num-layers 5 --random-weights --batch-size 1 --input-len 128 --output-len 64
  mkdir -p benchmarks/results/timelines
  for b in 8 32; do
    for p in qwen3-30b-a3b glm-4.7-flash; do   # with the timeline: graph replay against real steps
      bench latency-$p-b$b --preset $p --random-weights --batch-size $b --input-len 128 --output-len 128 \
        --timeline-out "benchmarks/results/timelines/timeline-$p-b$b-$TAG.txt"
    done
  done
  if [ "${REST_KERNELS:-1}" = 1 ]; then   # REST_KERNELS=0: the latency runs only
    timeout 280 python3 benchmarks/kernels.py "benchmarks/results/kernels-$TAG.json" --only fused_moe,attention,rope,dsa \
      --budget 250 > "$OUT/kernels.log" 2>&1
    tail -n 3 "$OUT/kernels.log"
  fi
fi
