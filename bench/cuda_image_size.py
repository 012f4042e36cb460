"""Estimate the CUDA image's size from its wheels, without downloading them.

The CUDA variant of the Containerfile needs torch's multi-GB CUDA wheels, which
a machine without a GPU has no use for, so its size is estimated: torch's CUDA
wheel for CPython 3.11 on x86_64 and every CUDA wheel it brings (nvidia-*,
cuda-*, triton), found in the package registry's simple JSON index. Each
wheel's zip directory is read with HTTP range requests (a few hundred KB each):
it gives the size of the wheel's files once installed, and its METADATA the
requirements to follow.

    python bench/cuda_image_size.py [--torch 2.13.0]
        [--cpu-image-bytes N --cpu-torch-wheel torch-2.13.0+cpu-....whl]

prints each wheel with its download and installed size, the totals, and given
the CPU image's measured size and the CPU torch wheel it holds:
CPU image - CPU torch (installed) + CUDA torch and its CUDA wheels (installed).
"""

from __future__ import annotations

import argparse
import io
import re
import zipfile

import httpx
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

INDEX = "https://pypi.org/simple/{}/"
JSON_INDEX = "application/vnd.pypi.simple.v1+json"
CUDA = re.compile(r"^(nvidia-|cuda-|triton$)")  # what the CPU build does not carry
LINUX = {
    "platform_system": "Linux",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


class RangeFile(io.RawIOBase):
    """A remote file read through HTTP range requests, seekable for zipfile."""

    def __init__(self, client: httpx.Client, url: str, size: int):
        self.client, self.url, self.size, self.pos = client, url, size, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def readinto(self, b) -> int:
        end = min(self.size, self.pos + len(b))
        if end <= self.pos:
            return 0
        r = self.client.get(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        r.raise_for_status()
        data = r.content
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def wheel(client: httpx.Client, req: Requirement) -> dict:
    """The newest x86_64 Linux (or pure) wheel for CPython 3.11 that meets req."""
    r = client.get(INDEX.format(req.name), headers={"Accept": JSON_INDEX})
    r.raise_for_status()
    best: tuple[Version, dict] | None = None
    for f in r.json()["files"]:
        fn = f["filename"]
        if not fn.endswith(".whl") or f.get("yanked"):
            continue
        parts = fn[:-4].split("-")
        try:
            version = Version(parts[1])
        except InvalidVersion:
            continue
        py, plat = parts[-3], parts[-1]
        linux = ("linux" in plat and plat.endswith("x86_64")) or plat == "any"
        if py not in ("cp311", "py3", "py2.py3") or not linux:
            continue
        if req.specifier.contains(version, prereleases=True) and (not best or version > best[0]):
            best = (version, f)
    if best is None:
        raise LookupError(f"no x86_64 Linux wheel for CPython 3.11 meets {req}")
    return best[1]


def read_wheel(client: httpx.Client, f: dict, extras: set[str]) -> tuple[int, list[Requirement]]:
    """(installed bytes, the CUDA requirements it brings) from the wheel's zip directory."""
    remote = io.BufferedReader(RangeFile(client, f["url"], f["size"]), 1 << 20)
    with zipfile.ZipFile(remote) as z:
        installed = sum(i.file_size for i in z.infolist())
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    brings = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if not CUDA.match(canonicalize_name(req.name)):
            continue
        if req.marker is None or any(
            req.marker.evaluate(LINUX | {"extra": e}) for e in (extras | {""})
        ):
            brings.append(req)
    return installed, brings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", default="2.13.0")
    ap.add_argument("--cpu-image-bytes", type=int, default=0, help="the CPU image, measured")
    ap.add_argument("--cpu-torch-wheel", default="", help="the CPU torch wheel it holds")
    args = ap.parse_args()
    total_dl = total_inst = 0
    with httpx.Client(timeout=60, follow_redirects=True) as client:
        todo, seen = [Requirement(f"torch=={args.torch}")], set()
        while todo:
            req = todo.pop(0)
            name = canonicalize_name(req.name)
            if name in seen:
                continue
            seen.add(name)
            f = wheel(client, req)
            installed, brings = read_wheel(client, f, set(req.extras))
            total_dl += f["size"]
            total_inst += installed
            print(f"{f['filename']:72} {f['size'] / 1e6:7.0f} MB {installed / 1e6:7.0f} MB")
            todo += brings
    print(
        f"{'torch (CUDA) and its CUDA wheels':72} {total_dl / 1e6:7.0f} MB {total_inst / 1e6:7.0f} MB"
    )
    if args.cpu_image_bytes and args.cpu_torch_wheel:
        with zipfile.ZipFile(args.cpu_torch_wheel) as z:
            cpu_torch = sum(i.file_size for i in z.infolist())
        estimate = args.cpu_image_bytes - cpu_torch + total_inst
        print(f"CPU torch installed: {cpu_torch / 1e6:.0f} MB")
        print(f"CUDA image, estimated: {estimate / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
