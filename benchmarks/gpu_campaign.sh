#!/usr/bin/env bash
# The first thing to run on any GPU machine (about 8 minutes): GPU tests, the decisive kernel benchmarks, and a
# one-screen summary; see benchmarks/campaign.py. Options: --out DIR, --budget-s S, --dry-run, --summarize DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/campaign.py "$@"
