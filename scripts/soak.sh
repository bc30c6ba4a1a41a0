#!/usr/bin/env bash
# The crash suite as a soak: SIGKILL the daemon many times at seeded random moments.
#   scripts/soak.sh [KILLS] [SEED]     (defaults: 200 kills, seed 7)
# Prints the kill count, the events stored exactly once and the redeliveries.
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-200}"
seed="${2:-7}"
POLICY_AUDIT_CRASH_KILLS="$kills" POLICY_AUDIT_CRASH_SEED="$seed" \
  cargo test --release --test it crash::sigkill_at_random_moments_loses_and_duplicates_nothing -- --nocapture 2>&1 \
  | grep -E "crash suite|test result|panicked|assert"
