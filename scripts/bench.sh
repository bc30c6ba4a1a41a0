#!/usr/bin/env bash
# Performance figures, reproducible on a fresh machine (about 10 minutes on 2 cores):
#   scripts/bench.sh [--quick]          (everything)
#   scripts/bench.sh growth [--quick]   (the growth table: 1x, 10x, 100x the work)
# Installs the baselines' tools (git, nginx, fcgiwrap, wrk, nats-server, strace) when missing, builds in release
# mode, and prints one table: backfill vs git clone + git log, walk phases vs git log, idle and busy
# fleets (local paths, and over smart HTTP: git http-backend behind nginx) vs git fetch and
# git ls-remote loops, delivery vs wrk, store size, NATS JetStream delivery vs a raw
# async-nats loop, cluster failover after kill -9; peak RSS of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v fcgiwrap >/dev/null 2>&1 || [ -x /usr/sbin/fcgiwrap ] || need+=(fcgiwrap)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v strace >/dev/null 2>&1 || need+=(strace)   # syscalls per delivered event
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
cargo build --release --quiet --workspace --bins
# `scripts/bench.sh growth [--quick]`: the growth table instead (1x, 10x, 100x the work).
if [ "${1:-}" = growth ]; then
  shift
  exec ./target/release/bench growth "$@"
fi
./target/release/bench all "$@"
