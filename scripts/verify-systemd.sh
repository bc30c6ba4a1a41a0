#!/usr/bin/env bash
# Checks the unit files with `systemd-analyze verify`. Exit 0 when clean, 1 on a problem, 2 when
# it cannot check (no systemd-analyze: install the systemd package, see scripts/install-deps.sh).
#
#   scripts/verify-systemd.sh [BINARY]    the units in systemd/, with BINARY (default
#                                         target/debug/policy-audit) as /usr/bin/policy-audit
#   scripts/verify-systemd.sh --root DIR  the units as installed under DIR (e.g. an unpacked .deb:
#                                         DIR/lib/systemd/system, DIR/usr/bin/policy-audit)
#
# Either way the check runs on a temporary root (`systemd-analyze verify --root`), so the paths in
# the units are checked as they are written (ExecStart=/usr/bin/policy-audit must exist in that
# root) without installing anything on this machine. The root also gets this machine's targets
# and /bin/kill, which the units refer to.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "error: systemd-analyze not found (apt-get install systemd, or run scripts/install-deps.sh)" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
units=$root/lib/systemd/system
mkdir -p "$units" "$root/usr/bin" "$root/bin"
if [ "${1:-}" = "--root" ]; then
  [ -d "${2:-}" ] || { echo "error: --root needs a directory" >&2; exit 2; }
  installed=$2/lib/systemd/system
  ls "$installed"/policy-audit* >/dev/null 2>&1 || { echo "error: no policy-audit units in $installed" >&2; exit 1; }
  cp "$installed"/policy-audit* "$units/"
  [ -x "$2/usr/bin/policy-audit" ] || { echo "error: no executable $2/usr/bin/policy-audit" >&2; exit 1; }
  bin=$(realpath "$2/usr/bin/policy-audit")
else
  bin=$(realpath "${1:-target/debug/policy-audit}")
  [ -x "$bin" ] || { echo "error: no binary at $bin (build first)" >&2; exit 2; }
  cp systemd/*.service systemd/*.timer "$units/"
fi
# verify only needs an executable at the path; a wrapper avoids copying a large binary.
printf '#!/bin/sh\nexec %q "$@"\n' "$bin" > "$root/usr/bin/policy-audit"
chmod 755 "$root/usr/bin/policy-audit"
for target in /lib/systemd/system/*.target; do
  [ -e "$units/$(basename "$target")" ] || cp "$target" "$units/"
done
cp "$(command -v kill)" "$root/bin/kill" 2>/dev/null || cp /bin/kill "$root/bin/kill"

names=$(cd "$units" && ls policy-audit*.service policy-audit*.timer)
# shellcheck disable=SC2086
out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no --root="$root" $names 2>&1) && rc=0 || rc=$?
# Outside a booted systemd (containers, CI) verify also reports that there is no bus.
problems=$(printf '%s\n' "$out" | grep -v -e '^$' -e 'Failed to .*bus' -e 'System has not been booted' || true)
if [ "$rc" -ne 0 ] || [ -n "$problems" ]; then
  printf 'systemd-analyze verify (exit %s):\n%s\n' "$rc" "$out" >&2
  exit 1
fi
echo "systemd units: ok ($(echo $names))"
