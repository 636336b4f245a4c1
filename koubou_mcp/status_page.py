"""The read-only status page at ``/`` of the HTTP server: the view of ``koubou-mcp top``
(workers, the queue by priority, model-server slots, recent results and failures) as HTML
that reloads itself.

``top`` draws with ``rich``; its recording console exports the same frame as HTML, escaping
every text (prompts and results are model output: they must never become markup). The page
has no script: a ``<meta refresh>`` reloads it, so it works wherever HTML does.
"""

from __future__ import annotations

import io

from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from koubou_mcp import top
from koubou_mcp.config import Settings
from koubou_mcp.models import utcnow
from koubou_mcp.store import Store

#: how often the page reloads itself, s
REFRESH_S = 2
#: columns of the rendered frame (wide enough for every table of the view)
PAGE_WIDTH = 150

#: rich fills in {code}, {foreground} and {background}; CSS braces are doubled for it
_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="@REFRESH@">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>koubou-mcp status</title>
<style>
body {{ margin: 1.5em; }}
pre {{ font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px;
      line-height: 1.35; }}
</style>
</head>
<body style="color: {foreground}; background-color: {background}">
<pre id="koubou-status"><code>{code}</code></pre>
</body>
</html>
"""


def render_page(view: top.View | None, settings: Settings, error: str | None = None) -> str:
    """The page for ``view`` (None with ``error`` when the store could not be read)."""
    console = Console(record=True, file=io.StringIO(), width=PAGE_WIDTH, color_system="truecolor",
                      force_terminal=True)
    console.print(top.render(view, settings, error, hint=f"(refreshes every {REFRESH_S} s)"))
    return console.export_html(inline_styles=True,
                               code_format=_TEMPLATE.replace("@REFRESH@", str(REFRESH_S)))


def current_page(store: Store, settings: Settings) -> tuple[str, bool]:
    """The page as the store is now, and whether the store could be read (blocking: run it
    in a thread)."""
    try:
        return render_page(top.read_view(store, utcnow(), settings.run_dir), settings), True
    except SQLAlchemyError as exc:
        return render_page(None, settings, str(exc).splitlines()[0]), False


__all__ = ["REFRESH_S", "current_page", "render_page"]
