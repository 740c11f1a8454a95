"""The wheels the GPU machine lacks: resolved, fetched, packed into carry-sized parts, checked there.

The GPU machine has its own python3 (3.12, with torch, transformers, Pillow, pyarrow, pandas, ...)
and no package index. ``fetch`` walks vlpipe's runtime requirements, skips what the machine's image
already holds (device-packages.txt), downloads the rest for cp312 manylinux x86_64 at the versions
of constraints.txt (else the version this interpreter has, which the suite ran with), and packs
them into parts that each fit one device call (the working tree and carried paths travel together,
64 MiB a call). ``verify`` runs there after the install: every requirement that the carried wheels
put on the image's own packages is met by the versions actually installed.

    python -m benchmarks.gpu.wheels fetch --dest .whl
    python -m benchmarks.gpu.wheels verify --manifest .whl/manifest.json   (on the GPU machine)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import deque
from importlib import metadata

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEVICE_PACKAGES = pathlib.Path(__file__).with_name("device-packages.txt")
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# The device's interpreter, for evaluating environment markers (python3 there is 3.12.3).
TARGET_ENV = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# Ray's `default` extra is the dashboard and job-submission server; local runs start neither
# (include_dashboard=False), and its dependencies would cost another call's worth of wheels.
EXTRAS_ON_DEVICE = {"ray": {"data"}}
# On the image, but vlpipe's pins may need a newer one than an image built earlier has
# (pydantic 2.14 needs typing-extensions >= 4.16); carrying it costs 0.1 MiB.
CARRY_ANYWAY = {"typing-extensions"}
# Runtime requirements that the GPU run never imports (vlpipe imports them lazily, inside the
# stages that use them): Lingua is the language stage's detector, 92 MiB of wheel, two calls' worth.
LEFT_BEHIND = {"lingua-language-detector": "language ID is not part of the GPU run"}
LEFT_BEHIND_MODULES = ("lingua",)
# One device call carries at most 64 MiB in all; the rest is left for the working tree.
PART_BYTES = 56 << 20
# Wheels are deflate zips; re-zipped with LZMA the big ones shrink by a fifth to a third,
# which pip (Python's zipfile) installs all the same.
RECOMPRESS_OVER = 4 << 20


def runtime_requirements() -> list[Requirement]:
    """vlpipe's own dependencies from pyproject.toml that the GPU run needs, with the extras it needs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = []
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in LEFT_BEHIND:
            continue
        if name in EXTRAS_ON_DEVICE:
            req.extras = EXTRAS_ON_DEVICE[name]
        out.append(req)
    return out


def device_packages() -> set[str]:
    lines = DEVICE_PACKAGES.read_text().splitlines()
    return {canonicalize_name(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def pins() -> dict[str, str]:
    """``name -> version`` from constraints.txt."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.strip()
    return out


def pick_version(req: Requirement, pinned: dict[str, str]) -> str:
    """The pinned version, else the one this interpreter runs; it must satisfy ``req``."""
    name = canonicalize_name(req.name)
    version = pinned.get(name)
    if version is None:
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req}: not installed here and not pinned in constraints.txt; pin it there") from None
    if not req.specifier.contains(Version(version), prereleases=True):
        raise SystemExit(f"{req}: the chosen version {version} does not satisfy it; fix the pin in constraints.txt")
    return version


def download(name: str, version: str, dest: pathlib.Path) -> pathlib.Path:
    """One cp312 manylinux x86_64 wheel (or a pure-Python one), no dependencies."""
    found = _local_wheel(name, version, dest)
    if found:
        return found
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(dest),
            f"{name}=={version}",
        ],
        check=True,
    )
    found = _local_wheel(name, version, dest)
    if not found:
        raise SystemExit(f"pip downloaded no wheel for {name}=={version}")
    return found


def _local_wheel(name: str, version: str, dest: pathlib.Path) -> pathlib.Path | None:
    stem = canonicalize_name(name).replace("-", "_")
    for path in dest.glob("*.whl"):
        dist, ver = path.name.split("-")[:2]
        if canonicalize_name(dist).replace("-", "_") == stem and Version(ver) == Version(version):
            return path
    return None


def wheel_requirements(path: pathlib.Path, extras: set[str]) -> list[Requirement]:
    """A wheel's Requires-Dist that apply on the device with these extras."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        lines = wheel.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or any(req.marker.evaluate({**TARGET_ENV, "extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def resolve(dest: pathlib.Path) -> dict:
    """Walk the requirements: what to carry (name -> version, wheel) and what the image must meet."""
    on_device, pinned = device_packages(), pins()
    carried: dict[str, dict] = {}
    needs_from_image: list[dict] = []
    todo = deque((req, "vlpipe") for req in runtime_requirements())
    while todo:
        req, needed_by = todo.popleft()
        name = canonicalize_name(req.name)
        if name in on_device and name not in CARRY_ANYWAY:
            needs_from_image.append({"requirement": str(req), "needed_by": needed_by})
            continue
        if name in carried:
            carried[name]["extras"] = sorted(set(carried[name]["extras"]) | set(req.extras))
            continue  # extras of a second request are rare here; its requirements were walked once
        version = pick_version(req, pinned)
        wheel = download(name, version, dest)
        carried[name] = {"version": version, "wheel": wheel.name, "extras": sorted(req.extras)}
        todo.extend((sub, f"{name}=={version}") for sub in wheel_requirements(wheel, set(req.extras)))
    return {"carried": dict(sorted(carried.items())), "needs_from_image": needs_from_image, "left_behind": LEFT_BEHIND}


def recompress(path: pathlib.Path) -> None:
    """Re-zip a wheel with LZMA in place (same files, same RECORD)."""
    staged = path.with_suffix(".lzma-tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(staged, "w", zipfile.ZIP_LZMA) as out:
        for info in src.infolist():
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr, copy.compress_type = info.external_attr, zipfile.ZIP_LZMA
            out.writestr(copy, src.read(info))
    if staged.stat().st_size < path.stat().st_size:
        os.replace(staged, path)
    else:
        staged.unlink()


def pack(dest: pathlib.Path, manifest: dict, part_bytes: int) -> list[pathlib.Path]:
    """One tar of the carried wheels and the manifest, cut into ``call1/``, ``call2/``, ... parts."""
    for old in dest.glob("call*"):
        shutil.rmtree(old)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        bundle = pathlib.Path(tmp) / "bundle.tar"
        with tarfile.open(bundle, "w") as tar:
            tar.add(dest / "manifest.json", arcname="manifest.json")
            for entry in manifest["carried"].values():
                tar.add(dest / "wheels" / entry["wheel"], arcname=f"wheels/{entry['wheel']}")
        digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
        parts = []
        with open(bundle, "rb") as src:
            while chunk := src.read(part_bytes):
                folder = dest / f"call{len(parts) + 1}"
                folder.mkdir()
                (folder / f"bundle.tar.part{len(parts) + 1}").write_bytes(chunk)
                parts.append(folder)
        for folder in parts:
            (folder / "bundle.sha256").write_text(f"{digest}  bundle.tar\n{len(parts)} parts\n")
    return parts


def fetch(args: argparse.Namespace) -> None:
    dest: pathlib.Path = args.dest
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    manifest = resolve(wheels)
    keep = {entry["wheel"] for entry in manifest["carried"].values()}
    for stale in wheels.glob("*.whl"):
        if stale.name not in keep:
            stale.unlink()  # two versions of one package stop the whole install there
    for name in keep:
        if (wheels / name).stat().st_size > RECOMPRESS_OVER:
            recompress(wheels / name)
    for entry in manifest["carried"].values():
        entry["bytes"] = (wheels / entry["wheel"]).stat().st_size
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    parts = pack(dest, manifest, args.part_bytes)
    total = sum(e["bytes"] for e in manifest["carried"].values())
    for name, entry in manifest["carried"].items():
        print(f"  carry {name}=={entry['version']:<12} {entry['bytes'] / 2**20:7.2f} MiB  {entry['wheel']}")
    print(
        f"{len(manifest['carried'])} wheels, {total / 2**20:.1f} MiB, in {len(parts)} part(s): "
        + ", ".join(
            f"{p.relative_to(dest.parent)} {sum(f.stat().st_size for f in p.iterdir()) / 2**20:.1f} MiB" for p in parts
        )
    )
    print(
        f"{len(manifest['needs_from_image'])} requirements left to the image's own packages (checked there by verify)"
    )
    for name, why in manifest["left_behind"].items():
        print(f"  left behind {name}: {why}")


def verify(args: argparse.Namespace) -> None:
    """Every requirement on the image's packages is met by what this interpreter now imports."""
    manifest = json.loads(args.manifest.read_text())
    problems = []
    for need in manifest["needs_from_image"]:
        req = Requirement(need["requirement"])
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req} (for {need['needed_by']}): not installed")
            continue
        if not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req} (for {need['needed_by']}): {version} is installed")
    for name, entry in manifest["carried"].items():
        installed = metadata.version(name)
        if Version(installed) != Version(entry["version"]):
            problems.append(f"{name}: carried {entry['version']} but {installed} is imported first")
    for line in problems:
        print(f"verify: {line}")
    print(
        f"verify: {len(manifest['carried'])} carried, {len(manifest['needs_from_image'])} requirements on the image, "
        f"{len(problems)} problem(s)"
    )
    if problems:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.wheels", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="resolve, download, recompress and pack the wheels")
    f.add_argument("--dest", type=pathlib.Path, default=ROOT / ".whl")
    f.add_argument("--part-bytes", type=int, default=PART_BYTES)
    v = sub.add_parser("verify", help="check the installed versions against the manifest (on the device)")
    v.add_argument("--manifest", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    {"fetch": fetch, "verify": verify}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
