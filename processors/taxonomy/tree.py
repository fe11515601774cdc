"""The taxonomy as an in-memory tree: nodes keyed by normalised name under their parent, in insertion order.

Insertion order is the only order used anywhere (requests, merges, output), so the same seeds and the same
replies always give the same tree, which is what lets a resumed run hit the request cache for every prompt.
Every node remembers the input row that owns it (``owner``): the stage's output rows and item failures are
attributed to that row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from loaders.taxonomy.names import join_path, name_key


@dataclass(eq=False)
class Node:
    parts: tuple[str, ...]
    origin: str  # seed | imported | generated
    round: int  # 0 for seeds and imports; the expansion round of its level otherwise
    owner: str  # key of the input row this node's subtree belongs to
    children: dict[str, "Node"] = field(default_factory=dict)  # name_key -> node

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def level(self) -> int:
        return len(self.parts)

    @property
    def path(self) -> str:
        return join_path(self.parts)

    @property
    def parent_path(self) -> str:
        return join_path(self.parts[:-1])

    def child_names(self) -> list[str]:
        return [child.name for child in self.children.values()]


class Tree:
    """A forest of first-level categories under an invisible root (``parts == ()``)."""

    def __init__(self) -> None:
        self.root = Node(parts=(), origin="root", round=0, owner="")

    def find(self, parts: Sequence[str]) -> Node | None:
        node = self.root
        for part in parts:
            node = node.children.get(name_key(part))
            if node is None:
                return None
        return node

    def add_path(self, parts: Sequence[str], *, origin: str, round: int, owner: str) -> Node:
        """Add a path and any missing ancestors (which take the same origin); returns the deepest node."""
        node = self.root
        for depth, part in enumerate(parts, start=1):
            key = name_key(part)
            child = node.children.get(key)
            if child is None:
                child = Node(tuple(parts[:depth]), origin=origin, round=round, owner=owner or node.owner)
                node.children[key] = child
            node = child
        return node

    def add_child(
        self, parent: Node, name: str, *, origin: str, round: int, owner: str | None = None
    ) -> Node | None:
        """Add one child (owned by its parent's owner unless given); None when a same-key sibling exists."""
        key = name_key(name)
        if key in parent.children:
            return None
        child = Node((*parent.parts, name), origin=origin, round=round, owner=owner or parent.owner)
        parent.children[key] = child
        return child

    def walk(self) -> Iterator[Node]:
        """Every node but the invisible root, depth first, in insertion order."""
        stack = list(reversed(self.root.children.values()))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children.values()))

    def nodes_at(self, level: int) -> list[Node]:
        return [node for node in self.walk() if node.level == level]

    def leaves(self) -> list[Node]:
        return [node for node in self.walk() if not node.children]

    def __len__(self) -> int:
        return sum(1 for _ in self.walk())
