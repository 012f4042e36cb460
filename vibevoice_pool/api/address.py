"""Where this user's servers on this machine listen: the terminal commands (status,
synth, jobs, scale, health) find the server without --url, whatever --port, config
file or variable it was launched with; the image's health check too.

    publish(host, port) -> Path | None   a launch, once it listens: <folder>/<pid>.json
    withdraw(path)                       the launch, as it stops
    servers() -> list[Server]            the live ones; a file a dead launch left is removed
    default_url() -> str                 $VIBEVOICE_POOL_URL, else the one server running
                                         here, else 127.0.0.1 at $VIBEVOICE_POOL_PORT or
                                         7860; NoDefaultUrl naming them when several run

The folder is $XDG_RUNTIME_DIR/vibevoice-pool, else vibevoice-pool-<uid> in the temp
folder, made mode 0700; one that another user owns or others can write is not used
(a file there could point the commands, and their API key, elsewhere). A file names
its launch's pid and start time, so a pid the system gave to another process since
does not count as the server. A file is {"url", "pid", "created"}; a live launch's
file without a url (another version's layout) is passed over and left to it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger("vibevoice_pool")

URL_ENV = "VIBEVOICE_POOL_URL"
PORT_ENV = "VIBEVOICE_POOL_PORT"
FALLBACK_URL = "http://127.0.0.1:7860"


class NoDefaultUrl(Exception):
    """Several servers run here: the command must be told which."""


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


def _ours(path: Path) -> bool:
    """Made if missing (mode 0700); True when it is a folder of this user's that no one
    else can write."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def private_temp() -> Path | None:
    """vibevoice-pool-<uid> in the temp folder, or None if it is not safely ours."""
    path = Path(tempfile.gettempdir()) / f"vibevoice-pool-{os.getuid()}"
    return path if _ours(path) else None


def folder() -> Path | None:
    """This user's folder of running servers (made if missing), or None if it cannot
    be made or is not safely ours."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _ours(Path(runtime) / "vibevoice-pool"):
        return Path(runtime) / "vibevoice-pool"
    return private_temp()


def client_url(host: str, port: int) -> str:
    """The URL a command on this machine reaches a server bound to host:port at."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def publish(host: str, port: int) -> Path | None:
    """Say where this process serves; None (logged) where there is no folder for it."""
    where = folder()
    if where is None:
        log.debug("no private folder to say where this server listens: --url is needed")
        return None
    me = psutil.Process()
    path = where / f"{me.pid}.json"
    record = {"url": client_url(host, port), "pid": me.pid, "created": me.create_time()}
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(record))
        tmp.replace(path)  # whole or absent for a reader
    except OSError as e:
        log.debug("could not say where this server listens (%s)", e)
        return None
    return path


def withdraw(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _alive(record: dict) -> bool:
    try:
        return abs(psutil.Process(int(record["pid"])).create_time() - record["created"]) < 0.5
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def servers() -> list[Server]:
    where = folder()
    if where is None:
        return []
    found = []
    for path in sorted(where.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not (isinstance(record, dict) and _alive(record)):
            path.unlink(missing_ok=True)  # its launch is gone (SIGKILL, a crash)
        elif isinstance(record.get("url"), str):
            found.append(Server(record["url"], int(record["pid"])))
        # else: a live launch of another version wrote it in another layout: left to it
    return found


def default_url() -> str:
    if os.environ.get(URL_ENV):
        return os.environ[URL_ENV].rstrip("/")
    live = servers()
    if len(live) == 1:
        return live[0].url
    if len(live) > 1:
        names = ", ".join(f"{s.url} (pid {s.pid})" for s in live)
        raise NoDefaultUrl(f"{len(live)} servers run here: pass --url, one of {names}")
    port = os.environ.get(PORT_ENV, "").strip()  # the launch's own setting, where it is shared
    return f"http://127.0.0.1:{port}" if port.isdigit() else FALLBACK_URL
