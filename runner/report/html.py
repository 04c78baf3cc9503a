"""A self-contained HTML page: inline CSS, PNG plots as base64 data URIs, no scripts.

Everything that comes from files (table cells, column names, config text, error messages,
paths) is HTML-escaped, so a page opens with no network access and shows file content as text.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import pandas as pd

from runner.report.tables import format_value

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .failed { color: #b00020; }
.scroll { overflow-x: auto; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
table.data th, table.data td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
table.data th { background: #f2f2f2; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.75em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #333; }
"""


def table_html(frame: pd.DataFrame) -> str:
    """Render a data frame as an HTML table with formatted, escaped cells."""
    if frame.empty and frame.columns.empty:
        return "<p>(no rows)</p>"
    cells = frame.astype(object).map(format_value)
    body = cells.to_html(index=False, escape=True, border=0, classes="data", na_rep="")
    return f'<div class="scroll">{body}</div>'


def image_html(path: Path, caption: str) -> str:
    """Embed a PNG file as a base64 data URI."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(caption, quote=True)
    return f'<figure><img src="data:image/png;base64,{encoded}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


class Page:
    """An HTML document built section by section."""

    def __init__(self, title: str, source: Path) -> None:
        self.title = title
        self.parts: list[str] = [
            f"<h1>{html.escape(title)}</h1>",
            f'<p class="meta">Folder: <code>{html.escape(str(source))}</code><br>'
            f"Generated: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}</p>",
        ]

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, css_class: Optional[str] = None) -> None:
        attribute = f' class="{css_class}"' if css_class else ""
        self.parts.append(f"<p{attribute}>{html.escape(text)}</p>")

    def table(self, frame: pd.DataFrame, caption: Optional[str] = None) -> None:
        if caption:
            self.paragraph(caption)
        self.parts.append(table_html(frame))

    def collapsed_table(self, frame: pd.DataFrame, summary: str) -> None:
        self.parts.append(f"<details><summary>{html.escape(summary)}</summary>{table_html(frame)}</details>")

    def image(self, path: Path, caption: str) -> None:
        self.parts.append(image_html(path, caption))

    def preformatted(self, text: str, summary: Optional[str] = None) -> None:
        block = f"<pre>{html.escape(text)}</pre>"
        if summary:
            block = f"<details><summary>{html.escape(summary)}</summary>{block}</details>"
        self.parts.append(block)

    def links(self, targets: list[tuple[str, str]]) -> None:
        """List relative links to files next to the page: (relative path, label) pairs."""
        items = "".join(
            f'<li><a href="{html.escape(quote(target), quote=True)}">{html.escape(label)}</a></li>' for target, label in targets
        )
        self.parts.append(f"<ul>{items}</ul>")

    def render(self) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(self.parts)
            + "\n</body>\n</html>\n"
        )

    def write(self, path: Path) -> Path:
        path.write_text(self.render(), encoding="utf-8")
        return path
