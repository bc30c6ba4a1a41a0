#!/usr/bin/env bash
# Installs what the tests and the demo need beyond the Rust toolchain: git (the tests build real
# repositories with it, and gix fetches local repositories through `git upload-pack`), and
# nats-server (the NATS destination and cluster tests run a real JetStream server on loopback)
# and openssl (a self-signed certificate for the NATS TLS test).
set -euo pipefail

need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    rustup component add "$component" || echo "warning: could not add rustup component $component" >&2
  fi
done
