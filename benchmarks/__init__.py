"""Benchmarks of koubou-mcp against the peers a user would pick instead, measured side by side.

Run ``python -m benchmarks`` from the repository root (``--quick`` for a smoke run that asserts
no timings, ``--only NAME ...`` for some of them, ``--out DIR`` to write elsewhere). Machines here
are shared and noisy: every benchmark measures its subject and a peer in the same run, repeats,
and reports medians with their spread and the ratio to the peer. Ratios hold; absolute times
drift from run to run.

Each benchmark is a module ``benchmarks.<name>`` with ``run(quick: bool) -> dict``. The dict
follows one convention (version ``RESULT_CONVENTION``), which ``common.py`` prints as a table and
renders as Markdown:

``name``
    the module name (``"dispatch"``).
``title``
    a heading (``"Dispatch latency: submit to in_progress"``).
``method``
    one or two sentences saying what was measured and how, for the reader of the Markdown.
``columns``
    the keys of ``rows`` in display order. A key may carry its unit as a suffix (``p50_ms``,
    ``tasks_per_s``); the printed header is the key as is.
``rows``
    a list of dicts, one per line of the table. Values are numbers, strings or None (shown
    as ``-``). A spread is given as a string such as ``"412 (398-430)"``: median (min-max).
``targets``
    a list of ``{"what", "target", "measured", "met"}``: ``target`` and ``measured`` are short
    strings for people, ``met`` a bool (or None when it could not be judged, e.g. the peer was
    unavailable). The Markdown says plainly which targets are missed.
``notes``
    a list of sentences: caveats, how to read the numbers, what limits them.

Optional keys: ``skipped`` (a reason; the benchmark did not run, which is not an error),
``data`` (raw numbers for the JSON only, not rendered). ``__main__`` adds ``seconds`` (wall time
of the benchmark), ``load_average_at_start`` and, when ``run`` raised, ``error`` (the
traceback); an errored or missing benchmark makes ``python -m benchmarks`` exit non-zero after
the others ran. In ``--quick`` mode ``__main__`` sets every target's ``met`` to None: quick
numbers are not judged.
"""

RESULT_CONVENTION = 1

#: Run order. Modules that are absent are reported as errors, the rest still run.
BENCHMARKS = ("dispatch", "throughput", "scale_up", "capacity", "mcp_stdio", "cost", "postgres")
