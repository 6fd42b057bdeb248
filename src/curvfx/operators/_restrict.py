"""Parameter subsets of curvature operators: select parameters by name or module prefix."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["layer_names", "selected_params"]


def selected_params(params: Any, names: str | list[str] | tuple[str, ...]) -> dict[str, Tensor]:
    """The entries of ``params`` selected by ``names``, in the order of ``params``.

    ``names`` is one string or a list of strings; each is a parameter name (selecting that
    parameter) or a module prefix (``"encoder.layer.0"`` selects every parameter whose name
    starts with ``"encoder.layer.0."``; ``""`` selects all).

    Raises:
        ValueError: If ``params`` is not a dict with string keys, ``names`` is empty or not
            strings, or a name selects no parameter.
    """
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ValueError(
            "names: restricting needs params as a dict with string keys (an nn.Module's "
            f"named parameters), got {type(params).__name__}"
        )
    wanted = [names] if isinstance(names, str) else names
    if not isinstance(wanted, list | tuple) or not wanted or not all(isinstance(n, str) for n in wanted):
        raise ValueError(f"names: expected a string or a non-empty list of strings, got {names!r}")
    for name in wanted:
        if not any(_selects(name, key) for key in params):
            raise ValueError(f"names: {name!r} is neither a parameter name nor a module prefix of one")
    return {k: v for k, v in params.items() if any(_selects(n, k) for n in wanted)}


def layer_names(params: dict[str, Tensor]) -> list[str]:
    """Prefixes of the modules owning the parameters directly (``"0.weight"`` -> ``"0"``), in order.

    A parameter of the root module (no dot in its name) is its own layer.
    """
    layers: dict[str, None] = {}
    for key in params:
        layers[key.rpartition(".")[0] or key] = None
    return list(layers)


def _selects(name: str, key: str) -> bool:
    return name == "" or key == name or key.startswith(name + ".")
