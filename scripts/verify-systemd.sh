#!/usr/bin/env bash
# Checks the unit files with `systemd-analyze verify` (when available), pointing them at a
# built binary so the check does not need an installed policy-audit. Exit 0 when clean.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "systemd-analyze not available: skipped"
  exit 0
fi
bin="${1:-$PWD/target/debug/policy-audit}"
[ -x "$bin" ] || { echo "no binary at $bin (build first)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in systemd/*.service systemd/*.timer; do
  sed "s#/usr/local/bin/policy-audit#$bin#g" "$unit" > "$tmp/$(basename "$unit")"
done
out=$(cd "$tmp" && SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no ./*.service ./*.timer 2>&1 || true)
# Outside a booted systemd (containers, CI) verify also reports the host's missing units.
problems=$(printf '%s\n' "$out" | grep -v -e '^$' -e 'Failed to .*bus' -e 'System has not been booted' -e 'Operation not permitted' -e 'Cannot determine cgroup' -e 'Failed to setup working directory' || true)
problems=$(printf '%s\n' "$problems" | grep -i -e "$tmp" -e 'policy-audit' || true)
if [ -n "$problems" ]; then
  printf '%s\n' "$problems" >&2
  exit 1
fi
echo "systemd units: ok ($(ls systemd | tr '\n' ' '))"
