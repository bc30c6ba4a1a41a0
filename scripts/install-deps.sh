#!/usr/bin/env bash
# Installs what the tests and the demo need beyond the Rust toolchain: git (the tests build real
# repositories with it, and gix fetches local repositories through `git upload-pack`), the
# openssl CLI (the TLS tests make their own certificate authority with it), and what
# building and checking the Debian package needs (scripts/package.sh, tests/it/package.rs):
# cargo-deb, dpkg-dev (dpkg-shlibdeps), binutils (strip), lintian, man-db (man), systemd
# (systemd-analyze) and util-linux (unshare); nats-server (the NATS destination and cluster tests
# run a real JetStream server on loopback); for the web server's tests: chromium + chromium-driver
# (a real browser over WebDriver), python3-gitlab (a real GitLab API client), prometheus
# (promtool checks /metrics); for the figures: wrk, nginx, fcgiwrap (runs git http-backend behind
# nginx for the smart-HTTP fleet figure). Quiet when everything is there.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have git || need+=(git)
have openssl || need+=(openssl)
have nats-server || need+=(nats-server)
have dpkg-shlibdeps || need+=(dpkg-dev)
have strip || need+=(binutils)
have lintian || need+=(lintian)
have man || need+=(man-db)
have systemd-analyze || need+=(systemd)
have unshare || need+=(util-linux)
have chromium || need+=(chromium)
have chromedriver || need+=(chromium-driver)
have promtool || need+=(prometheus)
/usr/bin/python3 -c 'import gitlab' >/dev/null 2>&1 || need+=(python3-gitlab)
have wrk || need+=(wrk)
have nginx || [ -x /usr/sbin/nginx ] || need+=(nginx)
have fcgiwrap || [ -x /usr/sbin/fcgiwrap ] || need+=(fcgiwrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    rustup component add "$component" || echo "warning: could not add rustup component $component" >&2
  fi
done
# cargo-deb builds from source (a few minutes, once).
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing: cargo-deb" >&2
  cargo install cargo-deb --locked --version 3.8.0 --quiet
fi
