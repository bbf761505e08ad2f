"""MkDocs hooks for the saefast site (mkdocs.yml ``hooks:``).

The docstrings cross-reference in Sphinx style (``:class:`~saefast.SAE```, ``:func:`train```), which the API
reference would otherwise show verbatim as ``:class:SAE``. After a page is rendered, each such role becomes the
code span it wraps, ``~a.b.C`` shortened to ``C`` as Sphinx does.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    shorten, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if shorten else target}</code>"


def on_post_page(output: str, page, config) -> str:
    """Turn the rendered Sphinx roles of ``output`` into plain code spans."""
    return ROLE.sub(_code, output)
