"""One section of the record (docs/PERFORMANCE.md) rewritten in place from its JSON, the
rest left as it is: `python -m bench.<section>.record FILE` after a rerun of that
section alone."""

from __future__ import annotations

from pathlib import Path

from bench import common


def rewrite_section(doc: str, title: str, lines: list[str], before: str = "\n## 5.") -> str:
    """The record `doc` with the section headed `title` replaced by `lines` (or added
    before the heading `before` where it has none), the rest left as it is: a section
    rerun alone updates its part without running every benchmark again."""
    new = "\n".join(lines)
    start = doc.find(title)
    if start < 0:
        at = doc.find(before)
        at = len(doc) if at < 0 else at + 1
        return doc[:at] + new + "\n" + doc[at:]
    end = doc.find("\n## ", start + len(title))
    end = len(doc) if end < 0 else end + 1
    return doc[:start] + new + "\n" + doc[end:]


def rewrite_main(argv, title: str, section: str, body, default_command: str) -> int:
    """`python -m bench.<section>.record FILE [--doc ...] [--command ...]`: rewrite the
    section `title` of the record from FILE, dated by the file's time."""
    import argparse
    import datetime as dt

    p = argparse.ArgumentParser(description=f"Rewrite the {section} section of the record")
    p.add_argument("json", help=f"the file `python -m bench.{section}.run --out` wrote")
    p.add_argument("--doc", default=str(common.ROOT / "docs" / "PERFORMANCE.md"))
    p.add_argument("--command", default=default_command)
    args = p.parse_args(argv)
    d = common.load_json(args.json)
    m = common.machine()
    where = f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}"
    when = dt.datetime.fromtimestamp(Path(args.json).stat().st_mtime, dt.timezone.utc)
    lines = [
        title,
        "",
        f"Measured on {where}, {when:%Y-%m-%d %H:%M UTC}, with `{args.command}`.",
        "",
    ]
    doc = Path(args.doc)
    doc.write_text(rewrite_section(doc.read_text(), title, lines + body(d)))
    print(f"rewrote {title!r} in {doc}")
    return 0
