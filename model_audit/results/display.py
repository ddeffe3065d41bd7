"""What a result shows in a notebook: ``_repr_html_`` and ``to_frame()``.

``to_frame()`` is the result's main table as a pandas DataFrame (pandas is an optional extra:
``pip install 'model-audit[pandas]'``). ``_repr_html_`` draws the view that
:mod:`model_audit.outputs` registers for the result's type in :data:`HTML_VIEWS` (the report's
summary table and chart, self-contained, no script): the views live in the layers above this
one, which register them when ``model_audit`` is imported.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from ..errors import ConfigError

#: The notebook view of each result type: ``view(result) -> HTML``.
HTML_VIEWS: Dict[type, Callable[[Any], str]] = {}


class Displayable:
    """Mixin of the result types: a notebook view and a DataFrame of the main table."""

    def __repr__(self) -> str:
        return (f"<{type(self).__name__}: {len(self.rows())} rows; to_frame() for the table, "
                "to_dict() for everything>")

    def _repr_html_(self) -> Optional[str]:
        view = HTML_VIEWS.get(type(self))
        return view(self) if view is not None else None

    def rows(self) -> List[Dict[str, Any]]:
        """The result's main table, one dict per row (what :meth:`to_frame` holds)."""
        raise NotImplementedError

    def to_frame(self) -> Any:
        """:meth:`rows` as a ``pandas.DataFrame``."""
        try:
            import pandas
        except ImportError as exc:
            raise ConfigError("to_frame() needs pandas: pip install 'model-audit[pandas]' "
                              "(or pandas)") from exc
        return pandas.DataFrame(self.rows())
