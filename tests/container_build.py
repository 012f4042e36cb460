"""Building and running the container image offline, for tests/test_container.py.

No image registry is needed: debootstrap makes a Debian bookworm root filesystem
from Debian's packages, `podman import` tags it as the Containerfile's base
(debian:bookworm-slim), `buildah bud --isolation chroot` builds the CPU image on
it with no daemon, and `buildah from` + `buildah run --isolation chroot` runs the
image's own entry point sharing the host's network, so the server inside answers
on 127.0.0.1. (`podman run` cannot set resource limits on these machines.)

Everything lives under one private storage root (layers, containers, the base),
removed at the end, so the test leaves no image behind and fills no shared store.
What pip needs to build here is found at run time from `pip config list`: the
find-links folder that holds torch's CPU wheel, and the CA bundle a TLS-inspecting
proxy needs; both are mounted read-only into the build.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BASE_TAG = "docker.io/library/debian:bookworm-slim"
TOOLS = ("buildah", "podman", "debootstrap")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
MIN_FREE_GIB = 8  # the base, the build stage and the final image, with room to spare


def unavailable() -> str:
    """Why the image cannot be built on this machine ('' when it can)."""
    if not sys.platform.startswith("linux"):
        return "building the image needs Linux (debootstrap, buildah)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed; as root `make test-image` installs "
            "them from Debian (apt-get install buildah podman debootstrap)"
        )
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot isolation need root"
    return ""


def pip_settings() -> dict[str, list[str]]:
    """`pip config list` as {key: [values]}, every scope ('global.cert', ':env:.cert' -> cert)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^\S*?\.([\w-]+)='(.*)'$", line.strip())
        if m:
            found.setdefault(m.group(1), []).extend(m.group(2).split())
    return found


def torch_wheel_folder(settings: dict[str, list[str]]) -> Path | None:
    """The find-links folder holding torch's CPU wheel, when pip is set up with one."""
    for place in settings.get("find-links", []):
        folder = Path(place.removeprefix("file://"))
        if folder.is_dir() and any(folder.glob("torch-*+cpu-*.whl")):
            return folder
    return None


def ca_bundle(settings: dict[str, list[str]]) -> Path | None:
    for place in settings.get("cert", []):
        if Path(place).is_file():
            return Path(place)
    return None


def debian_mirror() -> str:
    """The Debian mirror apt uses here (a deb822 .sources file or sources.list)."""
    apt = Path("/etc/apt")
    for f in sorted((apt / "sources.list.d").glob("*.sources")):
        text = f.read_text()
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and "bookworm" in suites.group(1).split():
                return uris.group(1)
    listing = apt / "sources.list"
    if listing.is_file():
        m = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", listing.read_text(), re.M)
        if m:
            return m.group(1)
    return DEBIAN_MIRROR


def scratch_dir() -> Path:
    """A folder on a disk (not a RAM /tmp) with room for the image's layers."""
    parent = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())
    free = shutil.disk_usage(parent).free / (1 << 30)
    if free < MIN_FREE_GIB:
        raise RuntimeError(
            f"{parent} has {free:.1f} GiB free; the image build needs ~{MIN_FREE_GIB}"
        )
    return Path(tempfile.mkdtemp(prefix="vibevoice-pool-image-", dir=parent))


class Store:
    """A private containers storage (layers, images, containers) under one folder."""

    def __init__(self, root: Path):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flags = [
            "--root",
            str(root / "storage"),
            "--runroot",
            str(root / "run"),
            "--storage-driver",
            "overlay",
        ]

    def tool(self, name: str, *args: str, log: str = "", timeout: float = 900, **kw):
        """Run buildah or podman on this store; its output goes to logs/<log>.log."""
        cmd = [name, *self.flags, *args]
        if not log:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        path = self.logs / f"{log}.log"
        with open(path, "w") as out:
            done = subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw
            )
        if done.returncode != 0:
            tail = "\n".join(path.read_text().splitlines()[-40:])
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({done.returncode}):\n{tail}")
        return done

    def make_base(self) -> None:
        """debootstrap bookworm minbase -> podman import as debian:bookworm-slim."""
        rootfs = self.root / "rootfs"
        with open(self.logs / "debootstrap.log", "w") as out:
            subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=600,
            )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            self.tool("podman", "import", "-", BASE_TAG, log="import", stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar.wait()
        shutil.rmtree(rootfs)

    def build(self, context: Path, tag: str, build_args: dict[str, str], mounts: list[str]):
        args = ["bud", "--isolation", "chroot", "--pull=never", "--format", "docker"]
        for k, v in build_args.items():
            args += ["--build-arg", f"{k}={v}"]
        for m in mounts:
            args += ["-v", m]
        self.tool("buildah", *args, "-t", tag, "-f", "Containerfile", str(context), log="build")

    def image_config(self, tag: str) -> dict:
        """The image's OCI config and its Docker health check."""
        out = self.tool("buildah", "inspect", "--type", "image", tag, check=True).stdout
        data = json.loads(out)
        config = dict(data["OCIv1"]["config"])
        config["Healthcheck"] = data["Docker"]["config"].get("Healthcheck")
        return config

    def image_size(self, tag: str) -> int:
        out = self.tool("podman", "image", "inspect", "--format", "{{.Size}}", tag, check=True)
        return int(out.stdout.strip())

    def container(self, tag: str) -> str:
        return self.tool("buildah", "from", "--pull=never", tag, check=True).stdout.strip()

    def run(self, ctr: str, argv: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
        """Start argv in the container (the host's network); the caller waits."""
        cmd = ["buildah", *self.flags, "run", "--isolation", "chroot"]
        for k, v in env.items():
            cmd += ["--env", f"{k}={v}"]
        return subprocess.Popen([*cmd, ctr, "--", *argv], **kw)

    def run_read_only(
        self,
        image: str,
        ctr: str,
        argv: list[str],
        env: dict[str, str],
        user: str,
        volumes: dict[str, Path],
        tmpfs: dict[str, str],
        **kw,
    ) -> subprocess.Popen:
        """argv in the container as `docker run --read-only --tmpfs ...` runs it: the
        image's root read-only, the host folders `volumes` over its volume paths,
        `tmpfs` ({path: size}) mounted fresh, the image's environment and `env`, as
        `user`, in a PID namespace of its own where argv[0] is PID 1 (tini really is
        PID 1 here, unlike under `buildah run`). The host's network. The returned
        process is unshare's: PID 1 is its one child, and its exit status is PID 1's."""
        merged = self.tool("buildah", "mount", ctr, check=True).stdout.strip()
        root = self.root / f"read-only-{ctr[:12]}"
        root.mkdir()
        image_env = self.image_config(image).get("Env") or []

        def q(path) -> str:
            return shlex.quote(str(path))

        steps = [
            f"mount --bind {q(merged)} {q(root)}",
            f"mount -o remount,bind,ro {q(root)}",
            f"mount -t proc proc {q(root / 'proc')}",
            f"mount --rbind /dev {q(root / 'dev')}",
        ]
        for path, size in tmpfs.items():
            where = q(root / path.lstrip("/"))
            steps.append(f"mount -t tmpfs -o size={size},mode=1777 tmpfs {where}")
        for path, host in volumes.items():
            steps.append(f"mount --bind {q(host)} {q(root / path.lstrip('/'))}")
        words = [*image_env, *(f"{k}={v}" for k, v in env.items()), *argv]
        steps.append(
            f"exec chroot --userspec={q(user)} {q(root)} /usr/bin/env -i " + " ".join(map(q, words))
        )
        cmd = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private"]
        return subprocess.Popen([*cmd, "sh", "-c", " && ".join(steps)], **kw)

    def remove(self) -> None:
        """Containers, images, layers, the folder: nothing of the test is left."""
        self.tool("buildah", "rm", "--all")
        self.tool("buildah", "rmi", "--all", "--force")
        shutil.rmtree(self.root, ignore_errors=True)
