"""Checks a folder of wheels for the GPU run against tools/gpu/wheels.txt: exactly one wheel per pinned
distribution at its pinned version, nothing else; no torch / triton / nvidia-* wheel (the device image's
own must never be replaced); every wheel pure Python; every requirement (extras aside) either carried
or on the device image (tools/gpu/image_packages.txt); the total under --max-mib. Prints one line per
wheel and the total; exits 1 naming each failed check.

    python tools/gpu/check_wheels.py .whl [--max-mib 8]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
FORBIDDEN = re.compile(r"^(torch|triton|nvidia-.*|pytorch-triton.*)$")


def canonical(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def pins(path: str = os.path.join(HERE, "wheels.txt")) -> dict[str, str]:
    """canonical name -> pinned version."""
    out = {}
    for line in read_list(path):
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}: {line!r} is not NAME==VERSION")
        out[canonical(name)] = version.strip()
    return out


def image_packages(path: str = os.path.join(HERE, "image_packages.txt")) -> set[str]:
    return {canonical(n) for n in read_list(path)}


def wheel_info(path: str) -> tuple[str, str, list[str], str]:
    """(canonical name, version, requirement names without extras-only ones, tag) of a wheel file."""
    stem = os.path.basename(path)[: -len(".whl")]
    parts = stem.split("-")
    name, version, tag = parts[0], parts[1], "-".join(parts[-3:])
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode("utf-8", "replace").splitlines()
    requires = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            spec = line.split(":", 1)[1].strip()
            if "extra ==" in spec.replace("extra==", "extra =="):
                continue
            requires.append(canonical(re.split(r"[\s;<>=!~\[(]", spec, maxsplit=1)[0]))
    return canonical(name), version, requires, tag


def check(folder: str, max_mib: float) -> list[str]:
    wanted, image = pins(), image_packages()
    problems, seen, total = [], {}, 0
    files = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    for f in files:
        path = os.path.join(folder, f)
        name, version, requires, tag = wheel_info(path)
        size = os.path.getsize(path)
        total += size
        print(f"  {f:<60} {size / 1024:8.1f} KiB")
        if FORBIDDEN.match(name):
            problems.append(f"{f}: {name} must not be carried (the device image's own would be replaced)")
        if not tag.endswith("none-any"):
            problems.append(f"{f}: not pure Python (tag {tag}); the device image is Python 3.12 on x86-64")
        if name in seen:
            problems.append(f"{f}: a second wheel of {name} (also {seen[name]}); keep one version")
        seen[name] = f
        if name not in wanted:
            problems.append(f"{f}: {name} is not pinned in tools/gpu/wheels.txt")
        elif wanted[name] != version:
            problems.append(f"{f}: version {version}, wheels.txt pins {wanted[name]}")
        for req in requires:
            if req not in wanted and req not in image:
                problems.append(f"{f}: requires {req}, which is neither carried nor on the device image")
    for name in sorted(set(wanted) - set(seen)):
        problems.append(f"{name}=={wanted[name]}: pinned but no wheel in {folder}")
    print(f"  total: {len(files)} wheels, {total / 2**20:.2f} MiB (limit {max_mib} MiB)")
    if total > max_mib * 2**20:
        problems.append(f"total {total / 2**20:.2f} MiB exceeds {max_mib} MiB")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--max-mib", type=float, default=8.0)
    args = parser.parse_args(argv)
    problems = check(args.folder, args.max_mib)
    for p in problems:
        print(f"check_wheels: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
