#!/usr/bin/env bash
# The first call on a bare GPU machine without a package registry (gpu_env.sh: carried wheels, fastprime
# importable without pip): the GPU campaign and the end-to-end trainer benchmark, packed into one archive.
#
#   bash benchmarks/gpu_machine.sh OUT_DIR [CAMPAIGN_BUDGET_S] [E2E_TIMEOUT_S]
#
# OUT_DIR receives campaign.tgz, e2e.log, e2e_<device>.md and env.txt; the campaign's summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1
budget=${2:-330}
e2e_timeout=${3:-150}
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

FASTPRIME_BENCH_E2E_REPEATS=1 timeout "$e2e_timeout" python3 -m pytest benchmarks/bench_e2e.py \
    --benchmark-enable -q -s -p no:cacheprovider > "$out/e2e.log" 2>&1
echo "e2e: rc=$?"
cp benchmarks/results/e2e_*.md "$out/" 2>/dev/null
tail -n 40 "$campaign.txt"
