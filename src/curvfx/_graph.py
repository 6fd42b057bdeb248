"""The one walk over an autograd graph: which leaf tensors its operations take as inputs."""

from __future__ import annotations

from collections.abc import Collection, Iterator

from torch import Tensor

__all__ = ["depend_on", "leaf_inputs", "leaves_reached"]


def leaf_inputs(root: Tensor, stops: Collection = ()) -> Iterator[Tensor]:
    """Each leaf tensor of ``root``'s autograd graph, once per operation input it is.

    Walks the graph of ``root.grad_fn`` (each operation visited once) and yields the leaf
    behind every edge from an operation to a leaf's ``AccumulateGrad`` node: a leaf that
    two operations take (or one operation twice, as ``w * w``) is yielded twice. Only
    leaves that require grad have such nodes; a ``root`` without ``grad_fn`` yields
    nothing. The walk does not enter the nodes in ``stops``. Cost: one visit per
    operation of the graph, no tensor work.
    """
    stack = [root.grad_fn] if root.grad_fn is not None and root.grad_fn not in stops else []
    seen = set(stack) | set(stops)
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)  # set on AccumulateGrad nodes only
            if leaf is not None:
                yield leaf
            elif child not in seen:
                seen.add(child)
                stack.append(child)


def leaves_reached(root: Tensor) -> list[Tensor]:
    """The distinct leaf tensors requiring grad that ``root`` depends on, in the order first met."""
    found: dict[int, Tensor] = {}
    for leaf in leaf_inputs(root):
        found.setdefault(id(leaf), leaf)
    return list(found.values())


def depend_on(tensors: list[Tensor], sources: list[Tensor]) -> list[bool]:
    """Whether each of ``tensors`` is computed from one of ``sources`` (or is one), by its graph.

    A source that is a leaf requiring grad is found by its ``AccumulateGrad`` node, any other
    by its ``grad_fn``. One memoized visit per operation over all ``tensors`` together.
    """
    leaves = {id(s) for s in sources if s.grad_fn is None}
    nodes = {s.grad_fn for s in sources if s.grad_fn is not None}
    memo: dict = {}

    def edge(child) -> bool:
        leaf = getattr(child, "variable", None)  # set on AccumulateGrad nodes only
        return id(leaf) in leaves if leaf is not None else memo[child]

    def reaches(start) -> bool:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            if node in nodes:
                memo[node] = True
            elif expanded:
                memo[node] = any(edge(c) for c in children)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in memo and not hasattr(c, "variable"))
        return memo[start]

    return [id(t) in leaves or (t.grad_fn is not None and reaches(t.grad_fn)) for t in tensors]
