"""The settings as a person reads them, from their one declaration (config.py).

Owns what is read off `PoolConfig`'s fields for people: the sections in declaration
order, a setting's flag, its choices, whether it is a switch, and a default as a
reader writes it (cli.py builds the `launch` flags and their --help groups from
these); and the README's settings table, one block per section, written between its
markers by `python -m vibevoice_pool.settings_help --readme README.md` (a test fails
until the README's table matches the declaration).

    sections()                      [(title, [(name, FieldInfo)])], declaration order
    markdown() -> str               the README's table
    write_readme(path) -> bool      the table put between the README's markers
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from vibevoice_pool.config import ConfigError, PoolConfig, env_name


def sections() -> list[tuple[str, list[tuple[str, FieldInfo]]]]:
    """The settings by section, in declaration order."""
    out: dict[str, list[tuple[str, FieldInfo]]] = {}
    for name, info in PoolConfig.model_fields.items():
        out.setdefault(info.json_schema_extra["section"], []).append((name, info))
    return list(out.items())


def choices(info: FieldInfo) -> tuple[str, ...]:
    """The values a setting takes, when it is one of a few words."""
    return tuple(get_args(info.annotation)) if get_origin(info.annotation) is Literal else ()


def is_switch(info: FieldInfo) -> bool:
    return info.annotation is bool


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value: Any) -> str:
    """A default as a reader writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---- the README's table ------------------------------------------------------------

START, END = "<!-- settings: start -->", "<!-- settings: end -->"


def markdown() -> str:
    """The settings table of the README, one block per section."""
    out = []
    for title, fields in sections():
        out += [
            f"**{title}**",
            "",
            "| flag | environment | default | meaning |",
            "|---|---|---|---|",
        ]
        for name, info in fields:
            words = info.description.replace("|", "\\|")
            if choices(info):
                words += f"; one of {', '.join(f'`{c}`' for c in choices(info) if c)}"
            default = shown(info.default)
            shown_default = f"`{default}`" if default else ""
            out.append(f"| `{flag(name)}` | `{env_name(name)}` | {shown_default} | {words} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_readme(path: str | Path) -> bool:
    """Put the table between the markers of a README; True when it changed."""
    p = Path(path)
    text = p.read_text()
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not (start and end):
        raise ConfigError(f"{p} has no {START} ... {END} block")
    new = f"{head}{START}\n{markdown()}{END}{tail}"
    p.write_text(new)
    return new != text


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--readme"] and len(args) == 2:
        print(f"{args[1]}: {'updated' if write_readme(args[1]) else 'already current'}")
    elif args == ["--markdown"]:
        print(markdown(), end="")
    else:
        sys.exit("usage: python -m vibevoice_pool.settings_help (--markdown | --readme README.md)")
