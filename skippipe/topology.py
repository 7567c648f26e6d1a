"""Topology: regions (symmetric one-way latency in ms, bandwidth in Gbit/s) and the nodes in them.

DESIGN.md sections 3 and 8. A topology YAML has this shape::

    regions:
      names: [a, b]
      latency_ms: [[1, 80], [80, 1]]
      bandwidth_gbps: [[17, 0.1], [0.1, 17]]
    nodes:                      # or: generate: {count: 20, placement: round_robin}
      - {name: n0, region: a, speed: 1.0, memory_gb: 80}
      - {name: n1, region: b, ray: {resources: {region_b: 1}, labels: {region: b}}}

``regions`` may also be a path to a regions-only YAML (top-level ``names``, ``latency_ms``,
``bandwidth_gbps``, as ``configs/topology/regions_gcp12.yaml``). ``generate`` places ``count``
nodes named n0, n1, ... over the regions: ``round_robin`` (node i in region i mod R, as the
SkipPipe reference), ``random`` (seeded) or ``single`` (all in the first region).

``ray`` (optional, ``launcher=ray``): where the node's worker must run in a Ray cluster: custom
``resources`` its bundle asks for (``ray start --resources='{"region_b": 4}'``) and ``labels`` the
Ray node must carry (``ray start --labels='{"region": "b"}'``). A run's own ``topology.yaml`` adds
``ray.placed_on`` (the Ray node's id and IP) for each node a Ray run placed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from skippipe.errors import TopologyError
from skippipe.fileio import absent

PLACEMENTS = ("round_robin", "random", "single")
_SINGLE_REGION = {"names": ["local"], "latency_ms": [[0.05]], "bandwidth_gbps": [[100.0]]}


@dataclass
class Node:
    name: str
    region: str
    speed: float = 1.0  # relative compute speed (2.0: twice as fast)
    memory_gb: float = 80.0
    ray: Dict[str, Any] = field(default_factory=dict, compare=False)  # {resources, labels, placed_on}


class Topology:
    """Nodes with their regions; link latency and bandwidth between any two node names."""

    def __init__(self, region_names: Sequence[str], latency_ms, bandwidth_gbps, nodes: Sequence[Node],
                 origin: str = "topology"):
        self.region_names = [str(r) for r in region_names]
        self.latency_ms = _square_matrix(latency_ms, len(self.region_names), "latency_ms", origin)
        self.bandwidth_gbps = _square_matrix(bandwidth_gbps, len(self.region_names), "bandwidth_gbps", origin)
        _check_regions(self.region_names, self.latency_ms, self.bandwidth_gbps, origin)
        self.nodes: List[Node] = list(nodes)
        self._index: Dict[str, int] = {}
        region_index = {r: i for i, r in enumerate(self.region_names)}
        for i, node in enumerate(self.nodes):
            if node.name in self._index:
                raise TopologyError(f"{origin}: duplicate node name '{node.name}'")
            if node.region not in region_index:
                raise TopologyError(f"{origin}: node '{node.name}' has unknown region '{node.region}'; "
                                    f"known: {', '.join(self.region_names)}")
            if node.speed <= 0 or node.memory_gb <= 0:
                raise TopologyError(f"{origin}: node '{node.name}' needs speed > 0 and memory_gb > 0")
            self._index[node.name] = i
        if not self.nodes:
            raise TopologyError(f"{origin}: no nodes")
        self._node_region = np.array([region_index[n.region] for n in self.nodes], dtype=np.int64)

    # -- lookups ------------------------------------------------------------------------------
    def names(self) -> List[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> Node:
        try:
            return self.nodes[self._index[name]]
        except KeyError:
            raise TopologyError(f"node '{name}' is not in the topology; known: {_short(self.names())}") from None

    def index(self, name: str) -> int:
        self.node(name)
        return self._index[name]

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def latency_s(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        return float(self.latency_ms[self._region_of(a), self._region_of(b)]) / 1000.0

    def bandwidth_bytes_per_s(self, a: str, b: str) -> float:
        if a == b:
            return float("inf")
        return float(self.bandwidth_gbps[self._region_of(a), self._region_of(b)]) * 1e9 / 8.0

    def _region_of(self, name: str) -> int:
        return int(self._node_region[self.index(name)])

    # -- whole-matrix views (node x node), used by the vectorised allocation ---------------------
    def latency_matrix_s(self) -> np.ndarray:
        lat = self.latency_ms[np.ix_(self._node_region, self._node_region)] / 1000.0
        np.fill_diagonal(lat, 0.0)
        return lat

    def bandwidth_matrix_bytes_per_s(self) -> np.ndarray:
        bw = self.bandwidth_gbps[np.ix_(self._node_region, self._node_region)] * 1e9 / 8.0
        np.fill_diagonal(bw, np.inf)
        return bw

    def with_node(self, node: Node) -> "Topology":
        """This topology with one more node (checked like any other)."""
        return Topology(self.region_names, self.latency_ms, self.bandwidth_gbps, [*self.nodes, node],
                        origin="new node")

    def to_dict(self) -> Dict[str, Any]:
        """The topology YAML's shape (regions and explicit nodes); ``from_dict`` reads it back."""
        return {"regions": {"names": list(self.region_names), "latency_ms": self.latency_ms.tolist(),
                            "bandwidth_gbps": self.bandwidth_gbps.tolist()},
                "nodes": [{"name": n.name, "region": n.region, "speed": n.speed, "memory_gb": n.memory_gb,
                           **({"ray": n.ray} if n.ray else {})} for n in self.nodes]}

    def save(self, path: Path) -> None:
        """Write the topology YAML atomically (temp file, then rename)."""
        import yaml

        from skippipe.fileio import write_text_atomic

        write_text_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, origin: str = "topology", base_dir: Optional[Path] = None) -> "Topology":
        if not isinstance(data, dict):
            raise TopologyError(f"{origin}: must be a mapping with 'regions' and 'nodes' or 'generate'")
        unknown = sorted(set(data) - {"regions", "nodes", "generate"})
        if unknown:
            raise TopologyError(f"{origin}: unknown key '{unknown[0]}'; a topology has regions, and nodes or generate")
        regions = _regions_from(data.get("regions"), origin, base_dir)
        if data.get("nodes") is not None:
            nodes = _nodes_from(data["nodes"], origin)
        elif data.get("generate") is not None:
            if not isinstance(data["generate"], dict):
                raise TopologyError(f"{origin}: 'generate' must be a mapping, e.g. {{count: 20, placement: round_robin}}")
            gen = dict(data["generate"])
            if gen.get("regions_file") and data.get("regions") is None:
                regions = _regions_from(gen["regions_file"], origin, base_dir)
            nodes = generate_nodes(regions["names"], gen, origin)
        else:
            raise TopologyError(f"{origin}: give 'nodes' (a list) or 'generate' ({{count, placement}})")
        return cls(regions["names"], regions["latency_ms"], regions["bandwidth_gbps"], nodes, origin)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Topology":
        data = _read_yaml(Path(path), "topology file")
        return cls.from_dict(data, origin=str(path), base_dir=Path(path).parent)

    @classmethod
    def single_cluster(cls, count: int) -> "Topology":
        nodes = [Node(f"n{i}", "local") for i in range(count)]
        return cls(_SINGLE_REGION["names"], _SINGLE_REGION["latency_ms"], _SINGLE_REGION["bandwidth_gbps"], nodes)


def split_link(key: str, names: Sequence[str]) -> Optional[tuple]:
    """``"n0-n1"`` -> ``("n0", "n1")`` for two node names of ``names`` (names may hold '-');
    None when no split names two distinct nodes or more than one does."""
    known = set(names)
    splits = [(key[:i], key[i + 1:]) for i, ch in enumerate(key) if ch == "-"]
    found = [(a, b) for a, b in splits if a in known and b in known and a != b]
    return found[0] if len(found) == 1 else None


def _short(items: Sequence[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


def _read_yaml(path: Path, what: str) -> Any:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise TopologyError(f"{what} '{path}' {absent(path)}")
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise TopologyError(f"{what} '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None


def _regions_from(regions: Any, origin: str, base_dir: Optional[Path]) -> Dict[str, Any]:
    if regions is None:
        return dict(_SINGLE_REGION)
    if isinstance(regions, (str, Path)):
        path = Path(regions)
        if not path.is_file() and base_dir is not None and (base_dir / path).is_file():
            path = base_dir / path
        regions = _read_yaml(path, "regions file")
        origin = str(path)
    if not isinstance(regions, dict):
        raise TopologyError(f"{origin}: 'regions' must be a mapping {{names, latency_ms, bandwidth_gbps}}")
    for key in ("names", "latency_ms", "bandwidth_gbps"):
        if key not in regions:
            raise TopologyError(f"{origin}: regions lack '{key}'")
    unknown = sorted(set(regions) - {"names", "latency_ms", "bandwidth_gbps"})
    if unknown:
        raise TopologyError(f"{origin}: regions.{unknown[0]} is not a key; regions hold names, latency_ms and bandwidth_gbps")
    return regions


def _square_matrix(values: Any, size: int, key: str, origin: str) -> np.ndarray:
    try:
        matrix = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TopologyError(f"{origin}: regions.{key} must be a {size}x{size} matrix of numbers") from None
    if matrix.shape != (size, size):
        raise TopologyError(f"{origin}: regions.{key} is not a square {size}x{size} matrix "
                            f"(got shape {'x'.join(map(str, matrix.shape))})")
    return matrix


def _check_regions(names: List[str], latency_ms: np.ndarray, bandwidth_gbps: np.ndarray, origin: str) -> None:
    if len(set(names)) != len(names):
        raise TopologyError(f"{origin}: regions.names has duplicates")
    for key, matrix in (("latency_ms", latency_ms), ("bandwidth_gbps", bandwidth_gbps)):
        odd = np.argwhere(~np.isfinite(matrix))
        if len(odd):
            i, j = odd[0]
            raise TopologyError(f"{origin}: regions.{key}[{names[i]}][{names[j]}]={matrix[i, j]:g} "
                                "must be a finite number")
        bad = np.argwhere(~np.isclose(matrix, matrix.T, rtol=1e-6, atol=1e-12))
        if len(bad):
            i, j = bad[0]
            raise TopologyError(f"{origin}: regions.{key} is asymmetric: [{names[i]}][{names[j]}]="
                                f"{matrix[i, j]:g} but [{names[j]}][{names[i]}]={matrix[j, i]:g}")
    neg = np.argwhere(latency_ms < 0)
    if len(neg):
        i, j = neg[0]
        raise TopologyError(f"{origin}: regions.latency_ms[{names[i]}][{names[j]}]={latency_ms[i, j]:g} is negative")
    bad_bw = np.argwhere(bandwidth_gbps <= 0)
    if len(bad_bw):
        i, j = bad_bw[0]
        raise TopologyError(f"{origin}: regions.bandwidth_gbps[{names[i]}][{names[j]}]="
                            f"{bandwidth_gbps[i, j]:g} must be positive")


def _nodes_from(entries: Any, origin: str) -> List[Node]:
    if not isinstance(entries, list):
        raise TopologyError(f"{origin}: 'nodes' must be a list of {{name, region, speed, memory_gb}}")
    nodes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "region" not in entry:
            raise TopologyError(f"{origin}: nodes[{i}] needs 'name' and 'region'")
        unknown = set(entry) - {"name", "region", "speed", "memory_gb", "ray"}
        if unknown:
            raise TopologyError(f"{origin}: nodes[{i}] has unknown keys {sorted(unknown)}")
        try:
            nodes.append(Node(str(entry["name"]), str(entry["region"]), float(entry.get("speed", 1.0)),
                              float(entry.get("memory_gb", 80.0)), _ray_of(entry.get("ray"), f"{origin}: nodes[{i}]")))
        except (TypeError, ValueError):
            raise TopologyError(f"{origin}: nodes[{i}] has a non-numeric speed or memory_gb") from None
    return nodes


def _ray_of(spec: Any, where: str) -> Dict[str, Any]:
    """A node's ``ray`` entry, checked: ``resources`` name -> positive amount, ``labels`` name -> text."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or set(spec) - {"resources", "labels", "placed_on"}:
        raise TopologyError(f"{where}.ray must be a mapping with 'resources' and/or 'labels', "
                            "e.g. {resources: {region_eu: 1}, labels: {region: eu}}")
    resources, labels = spec.get("resources") or {}, spec.get("labels") or {}
    if not isinstance(resources, dict) or not isinstance(labels, dict):
        raise TopologyError(f"{where}.ray.resources and .labels must be mappings")
    for name, amount in resources.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise TopologyError(f"{where}.ray.resources.{name}={amount!r} must be a positive number")
    out: Dict[str, Any] = {}
    if resources:
        out["resources"] = {str(k): float(v) for k, v in resources.items()}
    if labels:
        out["labels"] = {str(k): str(v) for k, v in labels.items()}
    if spec.get("placed_on"):
        out["placed_on"] = dict(spec["placed_on"])
    return out


def generate_nodes(region_names: Sequence[str], gen: Dict[str, Any], origin: str = "topology") -> List[Node]:
    """``count`` nodes n0.. placed round robin, at random (seeded) or all in the first region."""
    count = gen.get("count")
    placement = gen.get("placement", "round_robin")
    if not isinstance(count, int) or count <= 0:
        raise TopologyError(f"{origin}: generate.count={count!r} must be a positive integer")
    if placement not in PLACEMENTS:
        raise TopologyError(f"{origin}: generate.placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    rng = random.Random(gen.get("seed", 0))
    speed = float(gen.get("speed", 1.0))
    memory_gb = float(gen.get("memory_gb", 80.0))
    regions = list(region_names)
    if placement == "round_robin":
        chosen = [regions[i % len(regions)] for i in range(count)]
    elif placement == "random":
        chosen = [rng.choice(regions) for _ in range(count)]
    else:
        chosen = [regions[0]] * count
    return [Node(f"n{i}", region, speed, memory_gb) for i, region in enumerate(chosen)]


def load_topology(cfg) -> Topology:
    """The topology of ``cfg.topology``: a file, inline regions+nodes, or generated nodes.

    With nothing given: one cluster of ``sum(schedule.partition_sizes)`` nodes (or ``2 * stages``).
    """
    topo_cfg = cfg.topology
    if topo_cfg.file:
        return Topology.from_yaml(topo_cfg.file)
    if topo_cfg.nodes is not None or topo_cfg.generate is not None:
        data = {"regions": topo_cfg.regions, "nodes": topo_cfg.nodes, "generate": topo_cfg.generate}
        return Topology.from_dict(data, origin="config topology")
    if topo_cfg.regions is not None:
        raise TopologyError("config topology: 'regions' given without 'nodes' or 'generate'")
    sizes = list(cfg.schedule.partition_sizes)
    count = sum(sizes) if sizes else 2 * cfg.schedule.num_stages
    return Topology.single_cluster(count)
