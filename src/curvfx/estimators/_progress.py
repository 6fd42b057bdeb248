"""An optional tqdm progress bar counting matrix-vector products (tqdm imported lazily)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar over ``total`` products if ``enabled``, else a bar that does nothing.

    Raises:
        ImportError: If ``enabled`` and tqdm is not installed, saying how to install it.
    """
    if not enabled:
        return _NoBar()
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm
    except ImportError as err:
        raise ImportError(
            "progress=True needs tqdm: pip install 'curvfx[progress]' (or pip install tqdm)"
        ) from err
    return tqdm(total=total, desc=desc, unit="matvec")


class _NoBar:
    """The interface of a tqdm bar used here, doing nothing."""

    def update(self, n: int = 1) -> None:
        """Do nothing."""

    def set_postfix_str(self, s: str = "") -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
