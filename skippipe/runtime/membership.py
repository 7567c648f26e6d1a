"""Who is in the run: the one record of it, owned by the executor and read by the coordinator.

Every node the run knows (the topology's, then the ones added to the running job), the members of
the current generation (the membership epoch: it changes when nodes are lost or admitted, and every
command carries it), and the nodes whose worker was started but not yet admitted (a replacement or
a new node, with its process incarnation). The nodes the planner must not route to are the known
nodes that are not members (:meth:`Membership.unroutable`): failed ones, and added or replaced ones
until they are admitted.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Set


class Membership:
    def __init__(self, nodes: Iterable[str]):
        self.nodes: List[str] = list(nodes)
        self.members: List[str] = list(self.nodes)  # in node order
        self.generation = 0
        self.joining: Dict[str, int] = {}  # started, not yet admitted: node -> incarnation

    def unroutable(self) -> Set[str]:
        return set(self.nodes) - set(self.members)

    def lose(self, dead: Iterable[str]) -> None:
        """``dead`` leave the run: a new generation of the survivors."""
        dead = set(dead)
        for node in dead:
            self.joining.pop(node, None)
        self.members = [n for n in self.members if n not in dead]
        self.generation += 1

    def add(self, node: str) -> None:
        """A node that was not in the topology; it becomes a member once admitted."""
        self.nodes.append(node)

    def joins(self, node: str, incarnation: int) -> None:
        """``node``'s worker (this incarnation) was started; it is admitted once ready."""
        self.joining[node] = incarnation

    def abandon(self, node: str) -> None:
        """``node``'s worker ended before it could join."""
        self.joining.pop(node, None)

    def admit(self, ready: Iterable[str]) -> None:
        """``ready`` (joining nodes) become members: a new generation."""
        ready = set(ready)
        for node in ready:
            self.joining.pop(node, None)
        self.members = [n for n in self.nodes if n in self.members or n in ready]
        self.generation += 1
