"""A small document model and its renderers: plain text for mail, Markdown, rich.

A :class:`Document` is sections of paragraphs, bullet lists, shell commands
and tables, free of any output format. :func:`render_text` writes what kernel
mailing lists expect -- ASCII only, no line over 80 columns (tables wrap their
long cells, commands continue with a backslash, paragraphs are filled);
:func:`render_markdown` writes GitHub Markdown; :func:`render_rich` prints to
a terminal with rich tables.
"""

from __future__ import annotations

import re
import shlex
import textwrap
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Union

WIDTH = 80


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Code:
    """Shell lines; a line starting with ``#`` is a comment."""

    lines: list[str]


@dataclass
class Column:
    name: str  # "\n" separates header lines
    right: bool = False
    wrap: int | None = None  # longest cell line; longer cells wrap


@dataclass
class Table:
    columns: list[Column]
    rows: list[list[str]]
    title: str = ""
    notes: list[str] = field(default_factory=list)


Block = Union[Para, Bullets, Code, Table, "Section"]


@dataclass
class Section:
    title: str
    blocks: list[Any] = field(default_factory=list)


@dataclass
class Document:
    title: str
    sections: list[Section] = field(default_factory=list)


# -- plain text ----------------------------------------------------------------------

def ascii_only(text: str) -> str:
    """Text with every character outside ASCII spelled in ASCII (or ``?``)."""
    if text.isascii():
        return text
    swap = {"\u2014": "--", "\u2013": "-", "\u2192": "->", "\u00b5": "u", "\u00d7": "x",
            "\u2026": "...", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}
    text = "".join(swap.get(ch, ch) for ch in text)
    return unicodedata.normalize("NFKD", text).encode("ascii", "replace").decode("ascii")


def _fill(text: str, width: int, first: str = "", rest: str = "") -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]


def wrap_command(line: str, width: int = WIDTH, indent: str = "    ") -> list[str]:
    """A shell command over several lines, each ending in `` \\`` but the last,
    at most ``width`` columns where tokens allow."""
    if line.startswith("#"):
        return _fill(line[1:].strip(), width, indent + "# ", indent + "# ")
    tokens = [shlex.quote(t) for t in shlex.split(line)]
    # An option and its value stay on one line.
    units: list[str] = []
    for tok in tokens:
        if units and units[-1].startswith("-") and " " not in units[-1] and \
                not tok.startswith("-"):
            units[-1] += " " + tok
        else:
            units.append(tok)
    out: list[str] = []
    cur = indent + units[0]
    cont = indent + "    "
    for unit in units[1:]:
        if len(cur) + 1 + len(unit) + 2 > width:
            out.append(cur + " \\")
            cur = cont + unit
        else:
            cur += " " + unit
    out.append(cur)
    return out


def _break_cell(text: str, limit: int | None) -> list[str]:
    lines: list[str] = []
    for part in text.split("\n"):
        while limit and len(part) > limit:
            # Break after a separator if there is one in reach.
            cut = max((i + 1 for i, ch in enumerate(part[:limit]) if ch in " +-,/"),
                      default=limit)
            lines.append(part[:cut].rstrip())
            part = part[cut:].lstrip()
        lines.append(part)
    return lines


def table_lines(t: Table, width: int = WIDTH) -> list[str]:
    """A table as aligned ASCII columns, wrapping the columns that allow it
    (narrowest first) until it fits ``width``."""
    limits = [c.wrap for c in t.columns]

    def layout() -> tuple[list[list[list[str]]], list[int]]:
        cells = [[_break_cell(c.name, limits[i]) for i, c in enumerate(t.columns)]]
        cells += [[_break_cell(v, limits[i]) for i, v in enumerate(r)] for r in t.rows]
        widths = [max(len(line) for row in cells for line in row[i]) for i in
                  range(len(t.columns))]
        return cells, widths

    cells, widths = layout()
    while sum(widths) + 2 * (len(widths) - 1) > width:
        wrappable = [i for i, c in enumerate(t.columns) if not c.right and widths[i] > 8]
        if not wrappable:
            break
        i = max(wrappable, key=lambda j: widths[j])
        limits[i] = widths[i] - 1
        cells, widths = layout()

    def emit(row: list[list[str]]) -> list[str]:
        height = max(len(c) for c in row)
        out = []
        for k in range(height):
            parts = []
            for i, c in enumerate(row):
                text = c[k] if k < len(c) else ""
                parts.append(text.rjust(widths[i]) if t.columns[i].right else
                             text.ljust(widths[i]))
            out.append("  ".join(parts).rstrip())
        return out

    header = [_break_cell(c.name, limits[i]) for i, c in enumerate(t.columns)]
    # Header lines align to the bottom.
    h = max(len(x) for x in header)
    header = [[""] * (h - len(x)) + x for x in header]
    lines = emit(header)
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines += emit(row)
    return lines


def _text_blocks(blocks: list[Any], out: list[str], width: int, depth: int) -> None:
    for b in blocks:
        if isinstance(b, Section):
            out.append("")
            if depth == 0:
                out += [b.title, "-" * min(len(b.title), width)]
            else:
                out += _fill(b.title + ":", width)
            _text_blocks(b.blocks, out, width, depth + 1)
        elif isinstance(b, Para):
            out.append("")
            out += _fill(b.text, width)
        elif isinstance(b, Bullets):
            out.append("")
            for item in b.items:
                out += _fill(item, width, "- ", "  ")
        elif isinstance(b, Code):
            out.append("")
            for line in b.lines:
                out += wrap_command(line, width)
        elif isinstance(b, Table):
            out.append("")
            if b.title:
                out += _fill(b.title, width)
                out.append("")
            out += table_lines(b, width)
            for note in b.notes:
                out += _fill(note, width, "  ", "  ")
        else:  # pragma: no cover - a programming error
            raise TypeError(f"unknown block {b!r}")


def render_text(doc: Document, width: int = WIDTH) -> str:
    """ASCII, at most ``width`` columns (a command token longer than that is
    the only exception, and none is built here)."""
    out = [doc.title, "=" * min(len(doc.title), width)]
    _text_blocks(doc.sections, out, width, 0)
    return ascii_only("\n".join(line.rstrip() for line in out).strip("\n") + "\n")


# -- Markdown --------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_blocks(blocks: list[Any], out: list[str], depth: int) -> None:
    for b in blocks:
        if isinstance(b, Section):
            out += ["", "#" * (depth + 2) + " " + b.title]
            _md_blocks(b.blocks, out, depth + 1)
        elif isinstance(b, Para):
            out += ["", b.text]
        elif isinstance(b, Bullets):
            out.append("")
            out += [f"- {item}" for item in b.items]
        elif isinstance(b, Code):
            out += ["", "```sh", *b.lines, "```"]
        elif isinstance(b, Table):
            if b.title:
                out += ["", f"**{_md_cell(b.title)}**"]
            out += ["", "| " + " | ".join(_md_cell(c.name) for c in b.columns) + " |",
                    "|" + "|".join("---:" if c.right else "---" for c in b.columns) + "|"]
            out += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in b.rows]
            if b.notes:
                out.append("")
                out += [f"{_md_cell(n)}  " for n in b.notes]


def render_markdown(doc: Document) -> str:
    out = [f"# {doc.title}"]
    _md_blocks(doc.sections, out, 0)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out).strip("\n") + "\n")


# -- rich --------------------------------------------------------------------------------

def render_rich(doc: Document, console: Any) -> None:
    from rich.table import Table as RichTable

    def blocks(items: list[Any], depth: int) -> None:
        for b in items:
            if isinstance(b, Section):
                console.print()
                if depth == 0:
                    console.rule(b.title)
                else:
                    console.print(b.title, style="bold", markup=False, highlight=False)
                blocks(b.blocks, depth + 1)
            elif isinstance(b, Para):
                console.print()
                console.print(b.text, markup=False, highlight=False)
            elif isinstance(b, Bullets):
                for item in b.items:
                    console.print("  - " + item, markup=False, highlight=False)
            elif isinstance(b, Code):
                for line in b.lines:
                    console.print("  " + line, markup=False, highlight=False, soft_wrap=True)
            elif isinstance(b, Table):
                t = RichTable(title=b.title or None, title_justify="left")
                for c in b.columns:
                    t.add_column(c.name, justify="right" if c.right else "left")
                for r in b.rows:
                    t.add_row(*r)
                console.print(t)
                for note in b.notes:
                    console.print("  " + note, markup=False, highlight=False)

    console.rule(doc.title)
    blocks(doc.sections, 0)
