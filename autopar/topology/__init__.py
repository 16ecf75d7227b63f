"""Cluster descriptions: topology files -> Cluster (hosts, devices, links) and logical meshes."""

from autopar.topology.cluster import Cluster, Fabric, GroupPath, Host, HostGroup, Network
from autopar.topology.load import list_topologies, load_cluster
from autopar.topology.mesh import LogicalMesh, MeshAxis

__all__ = [
    "Cluster",
    "Fabric",
    "GroupPath",
    "Host",
    "HostGroup",
    "Network",
    "LogicalMesh",
    "MeshAxis",
    "list_topologies",
    "load_cluster",
]
