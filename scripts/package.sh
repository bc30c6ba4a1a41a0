#!/usr/bin/env bash
# Builds the Debian package (cargo-deb; metadata in Cargo.toml under [package.metadata.deb]).
#
#   scripts/package.sh                  cargo build --release, then package that binary
#   scripts/package.sh --no-build       package the existing target/release/policy-audit
#   scripts/package.sh --binary PATH    package the binary at PATH (e.g. the tests' debug build)
#   --out DIR                           where the .deb goes (default target/debian); its path is
#                                       printed on the last line of stdout
#   --fast                              faster, larger compression (for tests)
#
# The files that are not in the repository as they are installed are generated here, from the
# binary being packaged or from their source, so they cannot drift: the man page and the shell
# completions (from the clap definitions, `policy-audit man` / `completions`), the conffile
# /etc/policy-audit/config.toml (config.toml with state_dir = "/var/lib/policy-audit") and the
# Debian changelog.
set -euo pipefail
cd "$(dirname "$0")/.."

build=yes binary= out=target/debian fast=
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=no ;;
    --binary) binary="$2"; build=no; shift ;;
    --out) out="$2"; shift ;;
    --fast) fast=--fast ;;
    *) echo "usage: scripts/package.sh [--no-build | --binary PATH] [--out DIR] [--fast]" >&2; exit 2 ;;
  esac
  shift
done

if ! cargo deb --version >/dev/null 2>&1; then
  echo "error: cargo-deb is not installed (cargo install cargo-deb --locked, or run scripts/install-deps.sh)" >&2
  exit 2
fi

if [ "$build" = yes ]; then
  cargo build --release --locked --bin policy-audit
fi
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [ -n "$binary" ]; then
  [ -x "$binary" ] || { echo "error: no executable at $binary" >&2; exit 2; }
  binary=$(realpath "$binary")
  # cargo-deb takes the binary from <target dir>/release: give it a private target dir holding a
  # copy, so that packaging a debug build never overwrites a release build.
  target=$PWD/target/deb-binary
  rm -rf "$target" && mkdir -p "$target/release"
  cp "$binary" "$target/release/policy-audit"
  export CARGO_TARGET_DIR=$target
fi
bin="$target/release/policy-audit"
[ -x "$bin" ] || { echo "error: no binary at $bin (run without --no-build)" >&2; exit 2; }

# Generated assets; their paths are the ones [package.metadata.deb] lists.
assets=target/deb-assets
rm -rf "$assets" && mkdir -p "$assets/completions"
"$bin" man > "$assets/policy-audit.1"
"$bin" completions bash > "$assets/completions/policy-audit"
"$bin" completions zsh > "$assets/completions/_policy-audit"
"$bin" completions fish > "$assets/completions/policy-audit.fish"

sed -e 's|^state_dir = "state"$|state_dir = "/var/lib/policy-audit"|' \
    -e 's|^# Copy this file, edit the|# Edit the|' config.toml > "$assets/config.toml"
grep -qx 'state_dir = "/var/lib/policy-audit"' "$assets/config.toml" || {
  echo 'error: config.toml has no line state_dir = "state" to point at /var/lib/policy-audit (update scripts/package.sh)' >&2
  exit 1
}

: > "$assets/default"

version=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"name":"policy-audit","version":"\([^"]*\)".*/\1/p')
commit=$("$bin" --version | sed -n 's/.*(commit \([^)]*\)).*/\1/p')
maintainer=$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' Cargo.toml)
revision=$(sed -n 's/^revision = "\(.*\)"$/\1/p' Cargo.toml)
{
  echo "policy-audit ($version${revision:+-$revision}) unstable; urgency=medium"
  echo
  echo "  * Package of policy-audit $version built from commit ${commit:-unknown}."
  echo "    Changes: see the project's git history."
  echo
  echo " -- $maintainer  $(date -R -u)"
} > "$assets/changelog"

mkdir -p "$out"
deb_out=$(cargo deb --package policy-audit --no-build $fast --output "$out" 2>&1) || {
  printf '%s\n' "$deb_out" >&2
  exit 1
}
deb=$(printf '%s\n' "$deb_out" | grep '\.deb$' | tail -n1)
[ -f "$deb" ] || { printf '%s\n' "$deb_out" >&2; echo "error: cargo deb made no .deb" >&2; exit 1; }
echo "$deb"
