"""The run report: plots and one self-contained HTML page (``RUN/report.html``).

:func:`write_report` reads a run folder at any stage (missing files give notes, not errors)
and writes the page atomically; ``cryorecon report RUN`` calls it, and the reconstruction
driver calls :func:`refresh_report` (the same, but never raising) periodically. Figures are
PNGs from matplotlib's Agg canvas, inlined as ``data:`` URIs; the page needs no network and
no scripts. See ``docs/report.md``.
"""

from .html import build_html, refresh_report, write_report

__all__ = ["build_html", "refresh_report", "write_report"]
