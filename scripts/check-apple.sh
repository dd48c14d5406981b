#!/usr/bin/env bash
# Type-checks the crate for aarch64-apple-darwin, so the Metal-only code paths (wgpu's Metal backend, the MSL
# passthrough loader in src/gpu/metal.rs) compile for the platform they run on. `cargo check` links nothing,
# so no Apple SDK or linker is needed; the library, the binary, the tests, the examples and the benches are
# all checked with the default features.
#
# Exit status: 0 when the check passes, or when the target's standard library cannot be installed (then it
# says so loudly: nothing was type-checked); the check's own status when it fails.
#
# Usage: scripts/check-apple.sh [extra cargo args]
set -uo pipefail

TARGET=aarch64-apple-darwin
cd "$(dirname "$0")/.."

installed=0
if command -v rustup >/dev/null 2>&1; then
    if rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
        installed=1
    elif rustup target add "$TARGET"; then
        installed=1
    fi
fi
if [ "$installed" != 1 ]; then
    echo "*** $TARGET target unavailable; Metal-only code not type-checked ***" >&2
    exit 0
fi

set -e
echo "cargo check --target $TARGET --all-targets $*"
cargo check --target "$TARGET" --all-targets "$@"
echo "$TARGET: type-check passed"
