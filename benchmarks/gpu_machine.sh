#!/usr/bin/env bash
# The first call on a bare GPU machine without a package registry (gpu_env.sh: carried wheels, fastprime
# importable without pip): the GPU campaign, the fused head's breakdown and the end-to-end trainer benchmark.
# About 9 minutes at the defaults (the campaign's steps took 112 + 56 + 31 + 29 s on an H200, its losses more).
#
#   bash benchmarks/gpu_machine.sh OUT_DIR [CAMPAIGN_BUDGET_S] [E2E_TIMEOUT_S] [BREAKDOWN_TIMEOUT_S]
#
# OUT_DIR receives env.txt, campaign.tgz, head_breakdown.json/.log, e2e.log and e2e_<device>.md (at most 8 files,
# as a lent machine returns them); the campaign's summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
budget=${2:-330}
e2e_timeout=${3:-150}
breakdown_timeout=${4:-120}
mkdir -p "$out"

source benchmarks/gpu_env.sh || exit 1

{
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
    python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
    python3 -c "import fastprime.kernels, fastprime.trainer.train, liger_kernel; print('imports ok')"
} 2>&1 | tee "$out/env.txt"

campaign=/tmp/fastprime_campaign
python3 benchmarks/campaign.py --out "$campaign" --budget-s "$budget" > "$campaign.txt" 2>&1
tar czf "$out/campaign.tgz" -C /tmp fastprime_campaign fastprime_campaign.txt

timeout "$breakdown_timeout" python3 benchmarks/head_breakdown.py --out "$out/head_breakdown.json" \
    > "$out/head_breakdown.log" 2>&1
echo "head_breakdown: rc=$?"

FASTPRIME_BENCH_E2E_REPEATS=1 timeout "$e2e_timeout" python3 -m pytest benchmarks/bench_e2e.py \
    --benchmark-enable -q -s -p no:cacheprovider > "$out/e2e.log" 2>&1
echo "e2e: rc=$?"
find benchmarks/results -name "e2e_*.md" -newer "$out/env.txt" -exec cp {} "$out/" \;
tail -n 40 "$campaign.txt"
