"""A tiny document model rendered twice: Markdown (``report.md``) and one self-contained HTML page
(``report.html``, images inlined as base64 data URIs, no external CSS or scripts)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str  # inline Markdown: **bold** and `code` are rendered in HTML too


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    align_right_from: int = 1  # columns at and after this index are right-aligned (numbers)


@dataclass
class Image:
    path: Path  # file on disk (PNG)
    alt: str
    rel: str  # path relative to the report folder, for Markdown


@dataclass
class Document:
    title: str
    blocks: list[Heading | Paragraph | Table | Image] = field(default_factory=list)

    def add(self, block: Heading | Paragraph | Table | Image) -> None:
        self.blocks.append(block)

    # ------------------------------------------------------------------ Markdown
    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if isinstance(b, Heading):
                out += ["#" * b.level + " " + b.text, ""]
            elif isinstance(b, Paragraph):
                out += [b.text, ""]
            elif isinstance(b, Table):
                out += _md_table(b)
            elif isinstance(b, Image):
                out += [f"![{b.alt}]({b.rel})", ""]
        return "\n".join(out).rstrip() + "\n"

    # ------------------------------------------------------------------ HTML
    def to_html(self) -> str:
        parts = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for b in self.blocks:
            if isinstance(b, Heading):
                parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
            elif isinstance(b, Paragraph):
                parts.append(f"<p>{_inline(b.text)}</p>")
            elif isinstance(b, Table):
                parts.append(_html_table(b))
            elif isinstance(b, Image):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                parts.append(f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
                parts.append(f"<figcaption>{html.escape(b.alt)}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:0.5rem 0 1.5rem}th,td{border:1px solid #ccc;padding:0.25rem 0.6rem}"
    "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "caption{caption-side:bottom;font-size:0.85em;color:#555;text-align:left;padding-top:0.3rem}"
    "img{max-width:100%}code{background:#f3f3f3;padding:0 0.2rem}"
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in t.headers) + " |"]
    lines.append("|" + "|".join("---:" if i >= t.align_right_from else "---" for i in range(len(t.headers))) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    if t.caption:
        lines += ["", f"*{t.caption}*"]
    return [*lines, ""]


def _inline(text: str) -> str:
    import re

    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in t.headers)
    body = []
    for row in t.rows:
        cells = "".join(
            f'<td class="num">{_inline(c)}</td>' if i >= t.align_right_from else f"<td>{_inline(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    caption = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
