#!/usr/bin/env bash
# The test command of the README: installs what the tests need beyond the Rust toolchain
# (scripts/install-deps.sh: git, nats-server, chromium, python3-gitlab, ...; quiet when everything
# is there), then runs the whole suite. Arguments go to `cargo test`, e.g.
# `scripts/test.sh --test it -- webhook::`. Its last lines are cargo test's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec cargo test "$@"
