#!/usr/bin/env python3
"""The machine code the NVIDIA driver compiled for ecq's kernels, read from its shader disk cache.

The NVIDIA Vulkan driver keeps what it compiles in a disk cache (`__GL_SHADER_DISK_CACHE_PATH`). Each entry of a
cache file `*.bin` is a zstd frame; the frames that hold a compiled compute pipeline start with "NVDA" and carry
its SASS (the GPU's instructions, 16 bytes each) after a header. This finds each pipeline's code (from the first
offset at which nvdisasm reads everything up to the last EXIT instruction), writes it as `kernelN.sass` under
--out and prints, per pipeline, its instruction count, a count of the instructions that tell the kernels apart,
the highest register it uses and each loop's length (a backward branch and its target).

Needs the `zstandard` module (`pip install zstandard`) and nvdisasm, which the PyPI wheel
`nvidia-cuda-nvdisasm` holds (`pip download --no-deps nvidia-cuda-nvdisasm`, unzip it, pass
--nvdisasm .../nvidia/cu13/bin/nvdisasm). How to fill the cache on the NVIDIA machine: DEVELOPERS.md.

    python3 scripts/nv-sass.py CACHE.bin [MORE.bin ...] --out sass/ [--arch SM90] [--loop N:0xADDR]
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

# SM 7.x to 9.x EXIT, first 8 bytes of its 16 (the control bits in the other 8 vary).
EXIT = bytes.fromhex("4d79000000000000")
ZSTD_MAGIC = bytes.fromhex("28b52ffd")
# Instructions worth counting per kernel: shuffles, votes, shared-memory and global loads and stores, barriers,
# population counts, float multiply-adds.
SHOWN = ["SHFL", "VOTE", "POPC", "LDS", "STS", "LDG", "STG", "BAR", "FFMA"]


def frames(data):
    """Every zstd frame in `data` that decompresses, as bytes."""
    import zstandard

    out = []
    at = data.find(ZSTD_MAGIC)
    while at >= 0:
        try:
            out.append(zstandard.ZstdDecompressor().decompressobj().decompress(data[at:]))
        except zstandard.ZstdError:
            pass
        at = data.find(ZSTD_MAGIC, at + 1)
    return out


def disassemble(nvdisasm, arch, code):
    """nvdisasm's text for raw instructions `code`, or None where it does not read them all."""
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(code)
        path = f.name
    try:
        r = subprocess.run([nvdisasm, "-b", arch, path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    return r.stdout if r.returncode == 0 else None


def pipeline_code(nvdisasm, arch, blob):
    """The disassembly of a pipeline blob's code, or None: from the first offset, aligned as its last EXIT,
    at which nvdisasm reads everything through that EXIT."""
    end = blob.rfind(EXIT)
    if end < 0:
        return None
    for start in range(end % 16, end, 16):
        text = disassemble(nvdisasm, arch, blob[start : end + 16])
        if text is not None:
            return text
    return None


def instructions(text):
    """(address, instruction) pairs of nvdisasm's output."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s*(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def opcode(ins):
    """The opcode of an instruction without its predicate and modifiers."""
    words = ins.split()
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def loops(ins):
    """(target, branch address, instruction count) of every backward branch."""
    out = []
    for addr, text in ins:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            out.append((target, addr, sum(1 for a, _ in ins if target <= a <= addr)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", nargs="+", help="shader disk cache files (*.bin)")
    ap.add_argument("--out", required=True, help="folder for kernelN.sass")
    ap.add_argument("--nvdisasm", default="nvdisasm")
    ap.add_argument("--arch", default="SM90", help="nvdisasm -b value: SM90 for H100/H200")
    ap.add_argument("--loop", action="append", default=[], help="N:0xADDR prints kernel N's loop at ADDR")
    args = ap.parse_args()
    try:
        import zstandard  # noqa: F401
    except ImportError:
        sys.exit("needs the zstandard module: pip install zstandard")
    os.makedirs(args.out, exist_ok=True)
    n = 0
    kernels = {}
    for path in args.cache:
        with open(path, "rb") as f:
            data = f.read()
        for blob in frames(data):
            if not blob.startswith(b"NVDA") or EXIT not in blob:
                continue
            text = pipeline_code(args.nvdisasm, args.arch, blob)
            if text is None:
                continue
            name = os.path.join(args.out, f"kernel{n}.sass")
            with open(name, "w") as f:
                f.write(text)
            ins = instructions(text)
            kernels[n] = ins
            ops = collections.Counter(opcode(t) for _, t in ins)
            regs = [int(r) for r in re.findall(r"\bR(\d+)\b", text)]
            shown = " ".join(f"{k} {ops[k]}" for k in SHOWN if ops[k])
            print(f"kernel{n}: {len(ins)} instructions, registers up to R{max(regs, default=0)}; {shown}")
            for target, addr, count in loops(ins):
                print(f"  loop {target:#x}..{addr:#x}: {count} instructions")
            n += 1
    for spec in args.loop:
        k, addr = spec.split(":")
        ins, target = kernels[int(k)], int(addr, 16)
        body = next(((t, a) for t, a, _ in loops(ins) if t == target), None)
        if body is None:
            sys.exit(f"kernel{k} has no loop at {addr}")
        sel = [(a, t) for a, t in ins if body[0] <= a <= body[1]]
        ops = collections.Counter(opcode(t) for _, t in sel)
        print(f"kernel{k} loop {addr}: " + ", ".join(f"{o} {c}" for o, c in ops.most_common()))
        for a, t in sel:
            print(f"  {a:5x}  {t}")
    if n == 0:
        print("no compiled pipelines found")


if __name__ == "__main__":
    main()
