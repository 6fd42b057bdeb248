"""torchzero's ``SumOfSquares``: a residual closure turned into a loss closure for any torch optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvfx._errors import describe
from curvfx._graph import leaves_reached
from curvfx.optim._least_squares import check_closure

__all__ = ["SumOfSquares"]


class SumOfSquares:
    """Sum of squares ``f(θ) = Σ_i r_i(θ)²`` of a residual closure, as a closure for ``torch.optim``.

    ``SumOfSquares()(closure)`` takes a closure in torchzero's least-squares protocol
    (``closure(backward=True)``, called here as ``closure(False)``, returning the residuals
    r, a tensor of any shape) and returns ``sos(backward=True)``:

    * ``sos(True)`` evaluates r under grad mode, sets the ``.grad`` of every leaf tensor
      requiring grad that f depends on to ``∂f/∂leaf = 2 (∂r/∂leaf)ᵀ r``, replacing any
      earlier ``.grad`` (as ``zero_grad()`` then ``f.backward()`` would for those
      tensors), and returns f detached, a 0-d tensor. Tensors f does not depend on keep
      their ``.grad``.
    * ``sos(False)`` returns f with its autograd graph and writes no ``.grad``.

    So ``torch.optim.Adam(params).step(SumOfSquares()(closure))`` or ``torch.optim.LBFGS``
    minimize rᵀr with the closure written for :class:`curvfx.optim.GaussNewton`, to compare
    a least-squares method with an ordinary one. f has no ½, as in ``GaussNewton``. Cost of
    ``sos(True)``: one evaluation of r and one backward pass.

    Differs from torchzero in: torchzero's ``SumOfSquares`` is a module of a
    ``tz.Optimizer`` chain that replaces the chain's closure; curvfx has no module chains, so
    the class adapts the closure itself (call the instance on it). The constructor takes
    no arguments, as torchzero's.

    Example:
        >>> X = torch.tensor([-1.1, 2.5], dtype=torch.float64, requires_grad=True)
        >>> def closure(backward=True):
        ...     return torch.stack([1 - X[0], 10 * (X[1] - X[0] ** 2)])
        >>> opt = torch.optim.LBFGS([X], line_search_fn="strong_wolfe")
        >>> for _ in range(5):
        ...     loss = opt.step(SumOfSquares()(closure))
        >>> torch.allclose(X, torch.ones(2, dtype=torch.float64))
        True
    """

    def __init__(self) -> None:
        pass  # torchzero's signature: SumOfSquares() takes no arguments

    def __call__(self, closure: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """The loss closure ``sos(backward=True)`` for the residual closure ``closure``.

        Raises:
            ValueError: If ``closure`` is None.
            TypeError: If ``closure`` is not callable or takes no ``backward`` argument.
        """
        closure = check_closure(closure)

        def sos(backward: bool = True) -> Tensor:
            with torch.enable_grad():
                f = _squares(closure(False))  # f = Σ r_i²
            if not backward:
                return f
            _set_grads(f)
            return f.detach()

        return sos

    def __repr__(self) -> str:
        return "SumOfSquares()"


def _squares(r: object) -> Tensor:
    """``r.pow(2).sum()``, a 0-d tensor, for residuals ``r`` returned by the closure."""
    if not isinstance(r, Tensor):
        raise TypeError(f"closure: must return the residuals as a tensor, got {describe(r)}")
    return r.pow(2).sum()


def _set_grads(f: Tensor) -> None:
    """``leaf.grad = ∂f/∂leaf`` for every leaf requiring grad that ``f`` depends on.

    Raises:
        ValueError: If ``f`` depends on no tensor requiring grad.
    """
    leaves = leaves_reached(f)
    if not leaves:
        raise ValueError(
            "closure: the residuals depend on no tensor that requires grad (no autograd graph); "
            "does the closure run under torch.no_grad() or detach the parameters?"
        )
    for leaf in leaves:
        leaf.grad = None  # replaced, not accumulated into
    f.backward(inputs=leaves)
