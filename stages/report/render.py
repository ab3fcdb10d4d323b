"""The report as a document model, rendered to Markdown and to self-contained HTML.

`stages.report.document` builds a list of blocks (headings, paragraphs, tables, figures,
notes, samples) from the stage metrics; this module turns that one list into
both `report.md` and `report.html`. Neither output is ever parsed back: the
Markdown is a rendering, not a source (STYLE.md, "report code that writes
Markdown and parses it back").

Markdown references figures by relative path (`figures/<name>.png`); HTML
embeds them as base64 `data:` URIs so the page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

Kind = Literal["better", "worse", "neutral", "na", "ref"]


@dataclass(frozen=True)
class Badge:
    """A table cell shown as a coloured label in HTML (a verdict) and plain text in Markdown."""

    text: str
    kind: Kind = "neutral"


Cell = Union[str, Badge]


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str | None = None


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Note:
    """A visible remark: a skipped figure, an ignored file, a caveat."""

    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    align: list[Literal["l", "r"]] = field(default_factory=list)  # default: left
    caption: str | None = None
    # Rows drawn with emphasis (the reference) and muted (the control).
    emphasis: dict[int, Literal["ref", "control"]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.align:
            self.align = ["l"] * len(self.columns)
        if len(self.align) != len(self.columns):
            raise ValueError(f"table has {len(self.columns)} columns but {len(self.align)} alignments")
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table row {i} has {len(row)} cells, expected {len(self.columns)}")


@dataclass
class Figure:
    path: Path  # the PNG on disk; Markdown links it relative to the report
    caption: str
    alt: str


@dataclass
class Samples:
    title: str
    items: list[tuple[str, str]]  # (prompt, completion)


Block = Union[Heading, Para, Bullets, Note, Table, Figure, Samples]


# ------------------------------------------------------------------- Markdown

def _md_cell(cell: Cell) -> str:
    text = cell.text if isinstance(cell, Badge) else cell
    return text.replace("|", "\\|").replace("\n", " ")


def _md_fence(text: str) -> str:
    """A fenced block that the text cannot close early (longer fence than any run inside)."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _md_code(text: str) -> str:
    """Inline code that survives backticks in the text (CommonMark: a longer delimiter run)."""
    text = text.replace("\n", " ")
    ticks = "``" if "`" in text else "`"
    return f"{ticks} {text} {ticks}" if ticks == "``" else f"`{text}`"


def to_markdown(title: str, blocks: list[Block], figures_rel: str) -> str:
    """Render the blocks as GitHub-flavoured Markdown; figures link to `figures_rel/<name>`."""
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Note):
            out += [f"> **Note.** {b.text}", ""]
        elif isinstance(b, Table):
            if b.caption:
                out += [f"*{b.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(c) for c in b.columns) + " |")
            out.append("|" + "|".join("---:" if a == "r" else ":---" for a in b.align) + "|")
            for row in b.rows:
                out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
            out.append("")
        elif isinstance(b, Figure):
            out += [f"![{b.alt}]({figures_rel}/{b.path.name})", "", f"*{b.caption}*", ""]
        elif isinstance(b, Samples):
            out += [f"**{b.title}**", ""]
            for prompt, completion in b.items:
                out += [f"Prompt: {_md_code(prompt)}", "", _md_fence(completion), ""]
        else:  # pragma: no cover - the Block union is closed
            raise TypeError(f"unknown block {type(b).__name__}")
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------- HTML

CSS = """
:root { --fg:#1d2327; --muted:#5f6b76; --rule:#dde3e8; --bg:#ffffff; --band:#f6f8fa;
        --better:#1f7a5a; --better-bg:#e3f4ec; --worse:#b3412a; --worse-bg:#fbe9e4;
        --neutral:#4a5560; --neutral-bg:#eceff2; --accent:#d9822b; }
* { box-sizing: border-box; }
html { background: var(--bg); }
body { margin: 0 auto; max-width: 1200px; padding: 2.5rem 2rem 4rem; color: var(--fg);
       font: 15px/1.55 -apple-system, "Segoe UI", "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
h1 { font-size: 1.9rem; margin: 0 0 .3rem; letter-spacing: -.01em; }
h2 { font-size: 1.35rem; margin: 2.6rem 0 .8rem; padding-bottom: .3rem; border-bottom: 2px solid var(--rule); }
h3 { font-size: 1.08rem; margin: 1.8rem 0 .6rem; }
p { margin: .5rem 0 .9rem; max-width: 75ch; }
.subtitle { color: var(--muted); margin: 0 0 1.5rem; }
nav.toc { background: var(--band); border: 1px solid var(--rule); border-radius: 8px;
          padding: .7rem 1rem; margin: 1rem 0 1.5rem; font-size: .92rem; }
nav.toc a { color: var(--fg); text-decoration: none; margin-right: 1.1rem; white-space: nowrap; }
nav.toc a:hover { text-decoration: underline; }
ul.bullets { padding-left: 1.2rem; max-width: 80ch; }
ul.bullets li { margin: .25rem 0; }
.note { border-left: 4px solid var(--accent); background: #fdf6ee; padding: .5rem .9rem;
        margin: .8rem 0; border-radius: 0 6px 6px 0; color: #5a4630; font-size: .92rem; max-width: 90ch; }
.table-wrap { overflow-x: auto; margin: .6rem 0 1.2rem; }
table { border-collapse: collapse; font-size: .9rem; min-width: 50%; }
caption { caption-side: top; text-align: left; color: var(--muted); font-size: .88rem; padding-bottom: .4rem; }
th, td { padding: .38rem .75rem; border-bottom: 1px solid var(--rule); vertical-align: top; }
th { text-align: left; font-weight: 600; background: var(--band); border-bottom: 2px solid var(--rule); }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td:first-child { white-space: nowrap; }
tbody tr:hover { background: #fafbfc; }
tr.ref td { background: #fff8ef; font-weight: 600; }
tr.control td { color: var(--muted); font-style: italic; }
.badge { display: inline-block; padding: .05rem .5rem; border-radius: 999px; font-size: .82rem;
         font-weight: 600; white-space: nowrap; font-style: normal; }
.badge.better { color: var(--better); background: var(--better-bg); }
.badge.worse { color: var(--worse); background: var(--worse-bg); }
.badge.neutral, .badge.na { color: var(--neutral); background: var(--neutral-bg); }
.badge.ref { color: #7a4a12; background: #fbe7cf; }
figure { margin: 1rem 0 1.8rem; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--rule); border-radius: 6px; }
figcaption { color: var(--muted); font-size: .88rem; margin-top: .35rem; max-width: 90ch; }
.samples { display: grid; gap: .6rem; margin: .4rem 0 1.2rem; }
.sample { background: var(--band); border: 1px solid var(--rule); border-radius: 6px; padding: .55rem .8rem;
          font: .86rem/1.45 "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap; }
.sample .prompt { font-weight: 700; }
.sample .completion { color: #2d3a45; }
footer { margin-top: 3rem; color: var(--muted); font-size: .82rem; }
"""


def _h(text: str) -> str:
    return html.escape(text, quote=True)


def _html_cell(cell: Cell, align: str) -> str:
    cls = ' class="r"' if align == "r" else ""
    if isinstance(cell, Badge):
        return f'<td{cls}><span class="badge {cell.kind}">{_h(cell.text)}</span></td>'
    return f"<td{cls}>{_h(cell)}</td>"


# Figures are rasterised at 150 dpi and shown at 100 CSS px per inch: 11 pt figure text
# then reads at the size of the body text, and stays sharp on high-density screens.
HIDPI_SCALE = 1.5


def png_size(png: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    head = png.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{png}: not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def data_uri(png: Path) -> str:
    """A PNG file as a base64 `data:` URI (the HTML report embeds every figure)."""
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def to_html(title: str, subtitle: str, blocks: list[Block]) -> str:
    """Render the blocks as one self-contained HTML page (CSS inline, figures embedded)."""
    body: list[str] = []
    toc = [(b.anchor, b.text) for b in blocks if isinstance(b, Heading) and b.level == 2 and b.anchor]
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{_h(b.anchor)}"' if b.anchor else ""
            body.append(f"<h{b.level}{anchor}>{_h(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_h(b.text)}</p>")
        elif isinstance(b, Bullets):
            items = "".join(f"<li>{_h(i)}</li>" for i in b.items)
            body.append(f'<ul class="bullets">{items}</ul>')
        elif isinstance(b, Note):
            body.append(f'<div class="note"><strong>Note.</strong> {_h(b.text)}</div>')
        elif isinstance(b, Table):
            head = "".join(
                f'<th{" class=r" if a == "r" else ""}>{_h(c)}</th>' for c, a in zip(b.columns, b.align))
            rows = []
            for i, row in enumerate(b.rows):
                cls = f' class="{b.emphasis[i]}"' if i in b.emphasis else ""
                cells = "".join(_html_cell(c, a) for c, a in zip(row, b.align))
                rows.append(f"<tr{cls}>{cells}</tr>")
            caption = f"<caption>{_h(b.caption)}</caption>" if b.caption else ""
            body.append(f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
                        f'<tbody>{"".join(rows)}</tbody></table></div>')
        elif isinstance(b, Figure):
            w, h = png_size(b.path)  # drawn at HIDPI_SCALE px per CSS px: text matches the page
            body.append(f'<figure><img src="{data_uri(b.path)}" alt="{_h(b.alt)}" '
                        f'width="{round(w / HIDPI_SCALE)}" height="{round(h / HIDPI_SCALE)}">'
                        f"<figcaption>{_h(b.caption)}</figcaption></figure>")
        elif isinstance(b, Samples):
            items = "".join(
                f'<div class="sample"><span class="prompt">{_h(p)}</span>'
                f'<span class="completion">{_h(c)}</span></div>' for p, c in b.items)
            body.append(f"<h3>{_h(b.title)}</h3><div class=\"samples\">{items}</div>")
        else:  # pragma: no cover - the Block union is closed
            raise TypeError(f"unknown block {type(b).__name__}")
    nav = "".join(f'<a href="#{_h(a)}">{_h(t)}</a>' for a, t in toc)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An inline empty icon: no request for /favicon.ico (a 404 in the console).
        '<link rel="icon" href="data:,">'
        f"<title>{_h(title)}</title><style>{CSS}</style></head>\n<body>\n"
        f"<h1>{_h(title)}</h1><p class=\"subtitle\">{_h(subtitle)}</p>\n"
        f'<nav class="toc">{nav}</nav>\n'
        + "\n".join(body)
        + "\n<footer>Generated by <code>python -m stages.report</code> from the stage metrics "
          "(JSON/TSV) only.</footer>\n</body></html>\n"
    )


__all__ = ["Badge", "Cell", "Heading", "Para", "Bullets", "Note", "Table", "Figure", "Samples",
           "Block", "to_markdown", "to_html", "data_uri"]
