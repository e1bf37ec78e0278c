"""A radix tree over full KV blocks: the prefix cache.

Each node is one full block of ``block_size`` tokens; its key is that block's tokens, its parent the block
before it. A path from the root spells a token prefix whose KV is already computed, so a new request walks the
tree with its prompt and reuses every block on the longest matching path.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...]
    block: int
    parent: "RadixNode | None"
    children: dict[tuple[int, ...], "RadixNode"] = field(default_factory=dict)


class RadixTree:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.root = RadixNode(key=(), block=-1, parent=None)
        self.node_of_block: dict[int, RadixNode] = {}

    def __len__(self) -> int:
        return len(self.node_of_block)

    def match(self, token_ids: list[int], max_blocks: int) -> list[RadixNode]:
        """Nodes of the longest cached prefix of ``token_ids``, at most ``max_blocks`` blocks."""
        bs = self.block_size
        node, path = self.root, []
        for i in range(min(max_blocks, len(token_ids) // bs)):
            child = node.children.get(tuple(token_ids[i * bs:(i + 1) * bs]))
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def insert(self, parent: RadixNode | None, key: tuple[int, ...], block: int) -> RadixNode | None:
        """Register ``block`` as the child ``key`` of ``parent`` (None = root).

        Returns the new node, or None when another block already holds the same prefix (the caller keeps its
        block private and stops registering along this path).
        """
        parent = parent or self.root
        if key in parent.children:
            return None
        node = RadixNode(key=key, block=block, parent=parent)
        parent.children[key] = node
        self.node_of_block[block] = node
        return node

    def remove_subtree(self, node: RadixNode) -> list[int]:
        """Detach ``node`` and everything below it; return the blocks they held."""
        assert node.parent is not None
        del node.parent.children[node.key]
        freed, stack = [], [node]
        while stack:
            n = stack.pop()
            freed.append(n.block)
            del self.node_of_block[n.block]
            stack.extend(n.children.values())
            n.children = {}
        return freed
