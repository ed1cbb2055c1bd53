"""HTML building blocks of the report: escaping, number formats, tables, and `value_html`, which
renders any JSON value of the manifest or config as nested tables (never as a raw list or dict
dump)."""

from __future__ import annotations

import html
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;
 color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:8px 0 4px} h2{font-size:17px;margin:26px 0 8px;
 border-bottom:1px solid #ddd;padding-bottom:4px} h3{font-size:14px;margin:14px 0 6px}
.sub{color:#666;font-size:13px}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-size:13px;
 font-weight:600;vertical-align:middle;margin-left:8px}
.done{background:#dff3e4;color:#17622f} .running{background:#fde2e1;color:#9b1c1c}
.banner{background:#fff4d6;border:1px solid #e6c65c;padding:10px 14px;margin:12px 0;
 border-radius:6px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #e2e2e2;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px} .card span{color:#666;font-size:12px}
table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{border:1px solid #e2e2e2;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f1f1} td.n{text-align:right;font-variant-numeric:tabular-nums}
table.kv{font-size:12px;margin:0} table.kv th{background:#f7f7f7;font-weight:normal}
img.fig{max-width:100%;background:#fff;border:1px solid #eee;border-radius:6px}
.ex{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.ex div{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:6px 10px}
.ex ol{margin:4px 0;padding-left:20px;font-size:13px} .ex li{margin:3px 0}
.d{color:#888;font-size:11px} .note{color:#666;font-size:12px}
details{margin:8px 0} summary{cursor:pointer;color:#444}
"""

MAX_ITEMS = 20  # list items shown by value_html; the rest are counted


class Raw(str):
    """A table cell that is already HTML (not escaped again)."""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any) -> str:
    """A scalar as text: floats to 6 significant digits, ints with thousands separators."""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def cell(c: Any) -> str:
    if isinstance(c, Raw):
        return str(c)
    if isinstance(c, (dict, list, tuple)):
        return value_html(c)
    return esc(fmt(c))


def table(rows: list[list[Any]], head: list[str] | None = None, num=frozenset()) -> str:
    """A table; columns in `num` are right-aligned numbers."""
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        cells = [
            f'<td class="n">{cell(c)}</td>' if i in num else f"<td>{cell(c)}</td>"
            for i, c in enumerate(r)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def is_numbers(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
    )


def value_html(v: Any, k: int | None = None) -> str:
    """A JSON value as HTML: a dict as a key/value table, a list as a table of its first
    MAX_ITEMS items (records as rows with their keys as columns), a list of k numbers as a
    pointer to the per-cluster table, a scalar as text."""
    if isinstance(v, dict):
        if not v:
            return "-"
        rows = "".join(
            f"<tr><th>{esc(key)}</th><td>{value_html(x, k)}</td></tr>" for key, x in v.items()
        )
        return f"<table class='kv'>{rows}</table>"
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        if k and len(v) == k and is_numbers(v):
            return f"{k:,} values, one per cluster (columns of the cluster table)"
        shown = list(v[:MAX_ITEMS])
        if all(isinstance(x, dict) for x in shown):
            cols = list(dict.fromkeys(c for x in shown for c in x))
            body = table([[x.get(c, "") for c in cols] for x in shown], cols)
        else:
            body = table([[i, x] for i, x in enumerate(shown)], ["#", "value"], {0})
        more = len(v) - len(shown)
        return body + (f'<span class="note">… and {more:,} more</span>' if more > 0 else "")
    if v is None:
        return "-"
    return esc(fmt(v))


def img(src: str | None, alt: str) -> str:
    if not src:
        return f'<p class="note">({esc(alt)}: no figure; install matplotlib for figures)</p>'
    return f'<img class="fig" src="{src}" alt="{esc(alt)}">'
