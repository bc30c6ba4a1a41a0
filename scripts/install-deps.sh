#!/usr/bin/env bash
# Installs what the tests and the demo need beyond the Rust toolchain: git (the tests build real
# repositories with it, and gix fetches local repositories through `git upload-pack`); for the
# web server's tests: chromium + chromium-driver (a real browser over WebDriver), python3-gitlab
# (a real GitLab API client), prometheus (promtool checks /metrics); for the figures: wrk, nginx.
set -euo pipefail

need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
/usr/bin/python3 -c 'import gitlab' >/dev/null 2>&1 || need+=(python3-gitlab)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
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
