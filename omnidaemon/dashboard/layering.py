"""A layered (Sugiyama-style) layout of a small directed graph, for the Graph page.

Nodes are strings; the steps are the classic ones, kept simple (apps have tens of agents):

1. Back edges: a depth-first search from the sources (then from whatever a cycle without a
   source leaves unvisited) finds the edges that close a cycle; the rest is acyclic.
2. Layers: a node's layer is its longest path from a source over the acyclic edges, so a
   cycle cannot make it loop; a back edge is laid out reversed (it goes up the layers).
3. Passing points: an edge longer than one layer passes through a point in each layer
   between (`~<edge>:<layer>`), which takes room there so no node sits on the edge.
4. Order: barycenter sweeps, down and up, reorder each layer by its neighbours' positions;
   the order with the fewest crossings wins.
5. Heights: each layer's nodes pulled toward the middle of their neighbours, in their order
   and without overlapping (least squares: isotonic regression), a few passes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Layering", "layer_graph", "place"]

SWEEPS = 4
PLACEMENT_PASSES = 3


@dataclass(frozen=True, slots=True)
class Layering:
    """A graph in layers.

    Attributes:
        layer: The layer of every node and passing point.
        columns: Each layer's nodes and passing points, in order.
        chains: For each edge (in the order given), its nodes from its lower layer to its
            higher: source to target, or target to source for a back edge.
        back: For each edge, whether it closes a cycle.
        segments: For each gap between two layers, the pieces of chains that cross it.
    """

    layer: dict[str, int]
    columns: list[list[str]]
    chains: list[list[str]]
    back: list[bool]
    segments: list[list[tuple[str, str]]]

    def crossings(self) -> int:
        """How many pairs of edge pieces cross between adjacent layers."""
        return _crossings(self.columns, self.segments)


def _back_edges(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[bool]:
    out: dict[str, list[tuple[int, str]]] = {n: [] for n in nodes}
    has_input: set[str] = set()
    for index, (source, target) in enumerate(edges):
        out[source].append((index, target))
        has_input.add(target)
    back = [False] * len(edges)
    state: dict[str, bool] = {}  # True: on the search's path; False: done
    for root in [n for n in nodes if n not in has_input] + list(nodes):
        if root in state:
            continue
        state[root] = True
        stack = [(root, iter(out[root]))]  # iterative: a long chain must not overflow
        while stack:
            node, todo = stack[-1]
            for index, target in todo:
                seen = state.get(target)
                if seen is None:
                    state[target] = True
                    stack.append((target, iter(out[target])))
                    break
                back[index] = seen  # to a node on the path: it closes a cycle
            else:
                state[node] = False
                stack.pop()
    return back


def _longest_paths(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, int]:
    preds: dict[str, int] = dict.fromkeys(nodes, 0)
    succs: dict[str, list[str]] = {n: [] for n in nodes}
    for source, target in edges:
        preds[target] += 1
        succs[source].append(target)
    ready = [n for n in nodes if not preds[n]]
    layer = dict.fromkeys(nodes, 0)
    while ready:  # Kahn's order: a node's layer is final when its last predecessor is done
        node = ready.pop()
        for nxt in succs[node]:
            layer[nxt] = max(layer[nxt], layer[node] + 1)
            preds[nxt] -= 1
            if not preds[nxt]:
                ready.append(nxt)
    return layer


def _crossings(columns: list[list[str]], segments: list[list[tuple[str, str]]]) -> int:
    pos = {n: i for column in columns for i, n in enumerate(column)}
    count = 0
    for gap in segments:
        ends = [(pos[a], pos[b]) for a, b in gap]
        for i, (a1, b1) in enumerate(ends):
            count += sum(1 for a2, b2 in ends[i + 1 :] if (a1 - a2) * (b1 - b2) < 0)
    return count


def _neighbours(
    segments: list[list[tuple[str, str]]],
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    before: dict[str, list[str]] = {}
    after: dict[str, list[str]] = {}
    for a, b in itertools.chain.from_iterable(segments):
        after.setdefault(a, []).append(b)
        before.setdefault(b, []).append(a)
    return before, after


def _mean_or(near: list[str] | None, value: Callable[[str], float], default: float) -> float:
    return sum(value(m) for m in near) / len(near) if near else default


def _order(columns: list[list[str]], segments: list[list[tuple[str, str]]]) -> list[list[str]]:
    before, after = _neighbours(segments)
    best, fewest = [list(c) for c in columns], _crossings(columns, segments)
    current = [list(c) for c in columns]
    for sweep in range(SWEEPS):
        down = sweep % 2 == 0
        near = before if down else after
        indices = range(1, len(current)) if down else range(len(current) - 2, -1, -1)
        pos = {n: float(i) for column in current for i, n in enumerate(column)}
        for k in indices:
            keys = {n: _mean_or(near.get(n), pos.__getitem__, pos[n]) for n in current[k]}
            current[k].sort(key=keys.__getitem__)  # stable: ties keep their order
            pos.update({n: float(i) for i, n in enumerate(current[k])})
        crossings = _crossings(current, segments)
        if crossings < fewest:
            best, fewest = [list(c) for c in current], crossings
    return best


def layer_graph(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> Layering:
    """Lay out the graph of `nodes` (ids not starting with `~`) and `edges` in layers."""
    back = _back_edges(nodes, edges)
    forward = [e for e, is_back in zip(edges, back, strict=True) if not is_back]
    layer = _longest_paths(nodes, forward)
    count = max(layer.values(), default=-1) + 1
    columns: list[list[str]] = [[] for _ in range(count)]
    for node in nodes:  # in the given order: the sweeps start from it
        columns[layer[node]].append(node)
    chains: list[list[str]] = []
    segments: list[list[tuple[str, str]]] = [[] for _ in range(max(count - 1, 0))]
    for index, ((source, target), is_back) in enumerate(zip(edges, back, strict=True)):
        low, high = (target, source) if is_back else (source, target)
        chain = [low]
        for k in range(layer[low] + 1, layer[high]):
            passing = f"~{index}:{k}"
            layer[passing] = k
            columns[k].append(passing)
            chain.append(passing)
        chain.append(high)
        for k, piece in enumerate(itertools.pairwise(chain)):
            segments[layer[low] + k].append(piece)
        chains.append(chain)
    return Layering(layer, _order(columns, segments), chains, back, segments)


def _fit(wanted: list[float], heights: list[float], gap: float) -> list[float]:
    """Tops as close to `wanted` as can be (least squares) with the boxes in this order and
    `gap` apart: pool adjacent violators on the targets less each box's minimum offset."""
    if not heights:
        return []
    offsets = list(itertools.accumulate((h + gap for h in heights[:-1]), initial=0.0))
    blocks: list[list[float]] = []  # [sum, count] of targets sharing one shift
    for target, offset in zip(wanted, offsets, strict=True):
        blocks.append([target - offset, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    shifts = [total / count for total, count in blocks for _ in range(int(count))]
    return [s + o for s, o in zip(shifts, offsets, strict=True)]


def place(layering: Layering, height: Callable[[str], float], gap: float) -> dict[str, float]:
    """The top of every node and passing point (the highest at 0): each layer in its order,
    `gap` apart, pulled toward the middles of its neighbours in the layer before (then
    after, then before again)."""
    before, after = _neighbours(layering.segments)
    top: dict[str, float] = {}

    def middle(node: str) -> float:
        return top[node] + height(node) / 2

    for column in layering.columns:  # to start: every layer centred on 0
        heights = [height(n) for n in column]
        top.update(zip(column, _fit([0.0] * len(column), heights, gap), strict=True))
    for sweep in range(PLACEMENT_PASSES):
        near = before if sweep % 2 == 0 else after
        columns = layering.columns if sweep % 2 == 0 else layering.columns[::-1]
        for column in columns:
            heights = [height(n) for n in column]
            wanted = [
                _mean_or(near.get(n), middle, middle(n)) - h / 2
                for n, h in zip(column, heights, strict=True)
            ]
            top.update(zip(column, _fit(wanted, heights, gap), strict=True))
    lowest = min(top.values(), default=0.0)
    return {n: t - lowest for n, t in top.items()}
