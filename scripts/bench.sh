#!/usr/bin/env bash
# Performance figures, reproducible on a fresh machine (about 5 minutes on 2 cores):
#   scripts/bench.sh [--quick]
# Installs the baselines' tools (git, nginx, wrk, nats-server, strace) when missing, builds in release mode, and
# prints one table: backfill vs git clone + git log, walk phases vs git log, idle and busy
# fleets vs a git fetch loop, delivery vs wrk, store size, NATS JetStream delivery vs a raw
# async-nats loop, cluster failover after kill -9; peak RSS of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v strace >/dev/null 2>&1 || need+=(strace)   # syscalls per delivered event
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
cargo build --release --quiet --workspace --bins
./target/release/bench all "$@"
