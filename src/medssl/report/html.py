"""The report document: sections of paragraphs, alerts, tables and figures, rendered two ways.

``render_html`` gives one self-contained page (inline CSS, figures embedded as base64 PNG data URIs,
no script and no external resource); ``render_markdown`` gives ``report.md`` with figures linked
relative to the report folder.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from medssl.report.tables import Table, html_table, inline_html, markdown_table, plain_text


@dataclass
class Paragraph:
    text: str


@dataclass
class Alert:
    """A warning the reader must not miss (collapsed pretraining, missing data that changes a claim)."""

    text: str
    level: str = "warning"  # "warning" | "danger"


@dataclass
class Missing:
    """What a section cannot show, and why."""

    text: str


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Heading:
    text: str


@dataclass
class Details:
    """Blocks a reader opens on demand (a long table behind its summary): ``<details>`` in HTML, a
    plain subsection in Markdown."""

    summary: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Headlines:
    """One sentence per finding, boxed at the top of the report."""

    lines: list[str]


Block = Paragraph | Alert | Missing | Image | Heading | Table | Details | Headlines


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block | None) -> Section:
        self.blocks.extend(b for b in blocks if b is not None)
        return self


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .3rem; }
h2 { margin-top: 2.5rem; border-bottom: 1px solid #bbb; padding-bottom: .2rem; }
nav ul { columns: 2; list-style: none; padding-left: 0; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; text-align: right; }
thead th { background: #f0f0f0; text-align: center; }
tbody th { text-align: left; background: #fafafa; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #555; }
.note { font-size: .85rem; color: #555; margin-top: -.3rem; }
.missing { color: #666; font-style: italic; border-left: 4px solid #bbb; padding-left: .6rem; }
.alert { border: 2px solid #c77c00; background: #fff4e0; padding: .6rem .8rem; margin: .8rem 0; font-weight: 600; }
.alert.danger { border-color: #b00020; background: #fde8eb; color: #7a0014; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: .88em; background: #f3f3f3;
       padding: 0 .2em; border-radius: 3px; }
details { margin: .8rem 0; }
summary { cursor: pointer; font-weight: 600; }
.headline { border-left: 4px solid #2a6db0; background: #f0f6fc; padding: .5rem .8rem; }
.headline p { margin: .3rem 0; }
"""


def png_data_uri(path: str | Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


TextBlock = Paragraph | Alert | Missing | Heading


class Markup(NamedTuple):
    """How a block that is one text is written: ``{text}`` is its text (in HTML with its inline markup rendered
    and escaped), ``{level}`` an alert's level (escaped)."""

    html: str
    markdown: str


TEXT_MARKUP: dict[type[TextBlock], Markup] = {
    Alert: Markup('<div class="alert {level}" role="alert">{text}</div>', "> **⚠ {text}**\n"),
    Missing: Markup('<p class="missing">{text}</p>', "_{text}_\n"),
    Heading: Markup("<h3>{text}</h3>", "### {text}\n"),
    Paragraph: Markup("<p>{text}</p>", "{text}\n"),
}


def _text_html(block: TextBlock) -> str:
    level = html.escape(block.level) if isinstance(block, Alert) else ""
    return TEXT_MARKUP[type(block)].html.format(text=inline_html(block.text), level=level)


def _text_markdown(block: TextBlock) -> str:
    return TEXT_MARKUP[type(block)].markdown.format(text=block.text)


def _block_html(block: Block) -> str:
    if isinstance(block, Table):
        return html_table(block)
    if isinstance(block, Headlines):
        return '<div class="headline">' + "".join(f"<p>{inline_html(line)}</p>" for line in block.lines) + "</div>"
    if isinstance(block, Details):
        inner = "\n".join(_block_html(b) for b in block.blocks)
        return f"<details><summary>{inline_html(block.summary)}</summary>\n{inner}\n</details>"
    if isinstance(block, Image):
        alt = html.escape(plain_text(block.caption), quote=True)
        return (
            f'<figure><img src="{png_data_uri(block.path)}" alt="{alt}">'
            f"<figcaption>{inline_html(block.caption)}</figcaption></figure>"
        )
    return _text_html(block)


def render_html(title: str, sections: list[Section], preamble: list[Block] | None = None) -> str:
    """One self-contained HTML page."""
    toc = "".join(f'<li><a href="#{html.escape(s.id)}">{html.escape(s.title)}</a></li>' for s in sections)
    body = [f"<h1>{html.escape(title)}</h1>"]
    body.extend(_block_html(b) for b in preamble or [])
    body.append(f"<nav><ul>{toc}</ul></nav>")
    for section in sections:
        body.append(f'<section><h2 id="{html.escape(section.id)}">{html.escape(section.title)}</h2>')
        body.extend(_block_html(b) for b in section.blocks)
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _block_markdown(block: Block, root: Path) -> str:
    if isinstance(block, Table):
        return markdown_table(block)
    if isinstance(block, Headlines):
        return "\n>\n".join(f"> {line}" for line in block.lines) + "\n"
    if isinstance(block, Details):
        return f"**{block.summary}**\n\n" + "\n".join(_block_markdown(b, root) for b in block.blocks)
    if isinstance(block, Image):
        try:
            link = block.path.relative_to(root).as_posix()
        except ValueError:
            link = block.path.as_posix()
        return f"![{plain_text(block.caption)}]({link})\n\n*{block.caption}*\n"
    return _text_markdown(block)


def render_markdown(title: str, sections: list[Section], root: Path, preamble: list[Block] | None = None) -> str:
    """``report.md``: the same content, figures linked relative to ``root`` (the report folder)."""
    parts = [f"# {title}\n"]
    parts.extend(_block_markdown(b, root) for b in preamble or [])
    for section in sections:
        parts.append(f'<a id="{section.id}"></a>\n\n## {section.title}\n')
        parts.extend(_block_markdown(b, root) for b in section.blocks)
    return "\n".join(parts)
