import pytest

from skippipe.cli import main
from skippipe.config import load_config
from skippipe.errors import TopologyError
from skippipe.topology import Topology, load_topology

GEO2 = "configs/topology/geo2.yaml"


def _write(tmp_path, text):
    path = tmp_path / "topo.yaml"
    path.write_text(text)
    return str(path)


def test_geo2_file_latency_and_bandwidth():
    topo = Topology.from_yaml(GEO2)
    assert topo.names() == [f"n{i}" for i in range(6)]
    assert topo.latency_s("n0", "n1") == pytest.approx(0.050)
    assert topo.latency_s("n0", "n2") == pytest.approx(0.001)
    assert topo.latency_s("n0", "n0") == 0.0
    assert topo.bandwidth_bytes_per_s("n0", "n1") == pytest.approx(0.1e9 / 8)
    assert topo.bandwidth_bytes_per_s("n3", "n3") == float("inf")


def test_generate_round_robin_over_regions_file():
    cfg = load_config(None, ["topology.generate={count: 20, placement: round_robin, "
                             "regions_file: configs/topology/regions_gcp12.yaml}",
                             "schedule.partition_sizes=[5,3,3,3,3,3]"])
    topo = load_topology(cfg)
    assert len(topo.nodes) == 20
    assert topo.node("n0").region == "Australia" and topo.node("n12").region == "Australia"
    assert topo.node("n13").region == "Belgium"
    assert len(topo.region_names) == 12


def test_default_single_cluster_size():
    cfg = load_config(None, ["schedule.partition_sizes=[2,1,1]"])
    assert len(load_topology(cfg).nodes) == 4
    cfg = load_config(None, ["schedule.num_stages=3"])
    assert load_topology(cfg).names() == [f"n{i}" for i in range(6)]


def test_random_placement_is_seeded():
    def regions(seed):
        data = {"regions": "configs/topology/regions_gcp12.yaml",
                "generate": {"count": 10, "placement": "random", "seed": seed}}
        return [n.region for n in Topology.from_dict(data).nodes]
    assert regions(1) == regions(1)
    assert regions(1) != regions(2)


BAD = {
    "asymmetric": ("latency_ms: [[1, 80], [70, 1]]", "asymmetric"),
    "nonsquare": ("latency_ms: [[1, 80, 3], [80, 1, 3]]", "not a square"),
    "negative_bw": ("latency_ms: [[1, 80], [80, 1]]\n  bandwidth_gbps: [[17, -0.1], [-0.1, 17]]", "must be positive"),
    "nan_latency": ("latency_ms: [[1, 80], [80, .nan]]", "=nan must be a finite number"),
    "inf_bw": ("latency_ms: [[1, 80], [80, 1]]\n  bandwidth_gbps: [[.inf, 1], [1, 17]]", "must be a finite number"),
    "misspelt_key": ("latency_ms: [[1, 80], [80, 1]]\n  bandwith_gbps: 3", "regions.bandwith_gbps is not a key"),
}


@pytest.mark.parametrize("text, expect", [
    ("links: []\nnodes:\n  - {name: n0, region: local}\n", "unknown key 'links'"),
    ("generate: 5\n", "'generate' must be a mapping"),
])
def test_bad_topology_structure_is_one_line(tmp_path, text, expect):
    with pytest.raises(TopologyError, match=expect):
        Topology.from_yaml(_write(tmp_path, text))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_topology_files_are_named(tmp_path, case, capsys):
    lat, expect = BAD[case]
    bw = "" if "bandwidth" in lat else "\n  bandwidth_gbps: [[17, 0.1], [0.1, 17]]"
    text = f"regions:\n  names: [a, b]\n  {lat}{bw}\nnodes:\n  - {{name: n0, region: a}}\n  - {{name: n1, region: b}}\n"
    path = _write(tmp_path, text)
    with pytest.raises(TopologyError, match=expect):
        Topology.from_yaml(path)
    assert main(["plan", f"topology.file={path}", "schedule.partition_sizes=[1,1]", "schedule.skip_ratio=0"]) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1


def test_unknown_region_and_duplicate_node(tmp_path):
    head = "regions:\n  names: [a]\n  latency_ms: [[1]]\n  bandwidth_gbps: [[10]]\nnodes:\n"
    with pytest.raises(TopologyError, match="unknown region 'zz'"):
        Topology.from_yaml(_write(tmp_path, head + "  - {name: n0, region: zz}\n"))
    with pytest.raises(TopologyError, match="duplicate node name 'n0'"):
        Topology.from_yaml(_write(tmp_path, head + "  - {name: n0, region: a}\n  - {name: n0, region: a}\n"))


def test_ray_pins_parse_round_trip_and_bad_ones_are_named(tmp_path):
    doc = {"regions": {"names": ["eu"], "latency_ms": [[1]], "bandwidth_gbps": [[10]]},
           "nodes": [{"name": "n0", "region": "eu", "ray": {"resources": {"region_eu": 1}, "labels": {"zone": "a"}}},
                     {"name": "n1", "region": "eu"}]}
    topo = Topology.from_dict(doc)
    assert topo.nodes[0].ray == {"resources": {"region_eu": 1.0}, "labels": {"zone": "a"}}
    assert topo.nodes[1].ray == {}
    topo.save(tmp_path / "t.yaml")
    again = Topology.from_yaml(tmp_path / "t.yaml")
    assert [n.ray for n in again.nodes] == [n.ray for n in topo.nodes]
    assert "ray" not in again.to_dict()["nodes"][1]  # unpinned nodes keep the plain shape
    for bad, match in [({"resources": {"region_eu": 0}}, r"nodes\[0\]\.ray\.resources\.region_eu=0"),
                       ({"resources": {"gpu_kind": "h100"}}, "must be a positive number"),
                       ({"zone": "a"}, r"nodes\[0\]\.ray must be a mapping"),
                       ({"labels": ["a"]}, "must be mappings")]:
        doc["nodes"][0]["ray"] = bad
        with pytest.raises(TopologyError, match=match):
            Topology.from_dict(doc)
