"""Who uploaded which voice: the folder's hidden owners file.

A voice added through VoiceLibrary.add() records its uploader (an owner id, see
api/auth.py) in OWNERS_FILE ({voice name: owner id}); a file put in the folder by the
operator has no owner and is a preset. Only an admin overwrites or deletes a preset
or another owner's voice (VoiceForbidden otherwise). The file is replaced whole, never
edited, and read again only when it changed; a damaged one is said in the log, its
uploads count as presets, and it is kept aside (never overwritten) at the next change.

`VoiceOwners` is a part of `VoiceLibrary` (library.py), which sets `folder`, `_owned`
and `_damaged` and lists the voices (`names`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

from vibevoice_pool.voices.folder import write_atomic

log = logging.getLogger("vibevoice_pool")
OWNERS_FILE = ".owners.json"  # {voice name: owner id} of the voices added by upload


class VoiceForbidden(Exception):
    """A caller changing a voice that is not its own (HTTP 403)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class VoiceOwners:
    def _owners(self) -> dict[str, str]:
        """The owners file (a copy), read again only when its inode, size or mtime
        changed: every request's default voice asks, and it is replaced, never edited."""
        path = self.folder / OWNERS_FILE
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            kept = self._owned
            if kept is not None and kept[0] == stamp:
                return dict(kept[1])
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            data = None
        owners = {k: v for k, v in data.items() if isinstance(v, str)} if data else {}
        self._damaged = not isinstance(data, dict) or len(owners) < len(data)
        if self._damaged:  # said once a state of the file (it is read once a stamp)
            log.warning(
                "The voices' owners file %s is damaged: the uploads it does not name count as "
                "presets; it is kept aside as %s.damaged-<time> at the next upload or delete",
                path,
                OWNERS_FILE,
            )
        self._owned = (stamp, owners)
        return dict(owners)

    def _save_owners(self, owners: dict[str, str]) -> None:
        if self._damaged:  # what it held stays for the operator, never overwritten
            with contextlib.suppress(OSError):
                path = self.folder / OWNERS_FILE
                os.replace(path, path.with_name(f"{OWNERS_FILE}.damaged-{time.time_ns()}"))
            self._damaged = False
        write_atomic(self.folder, OWNERS_FILE, json.dumps(owners, sort_keys=True).encode())

    def owner(self, name: str) -> str | None:
        """Who uploaded `name`; None for a preset (a file the operator put there)."""
        return self._owners().get(name)

    def presets(self) -> list[str]:
        """The voices nobody uploaded: the operator's files and the demo voices."""
        owners = self._owners()
        return [n for n in self.names() if n not in owners]

    def _check_may_change(self, name: str, owner: str | None, admin: bool) -> None:
        if admin:
            return
        holder = self._owners().get(name)
        if holder is None:
            raise VoiceForbidden(f"{name!r} is a preset; only an admin key may change or delete it")
        if holder != owner:
            raise VoiceForbidden(
                f"the voice {name!r} was uploaded by another key; only that key or an "
                "admin may change or delete it"
            )
