"""Pipeline-specific pricing rules of the search, each pinned by a case that breaks without it."""

from __future__ import annotations

from pathlib import Path

from autopar.config import TrainingConfig
from autopar.models import gpt
from autopar.solver.search import search
from autopar.topology.load import load_cluster

REPO = Path(__file__).resolve().parents[2]


def _small():
    return gpt(layers=8, hidden=512, heads=8, vocab=4000, seq_len=256)


def test_no_plan_has_fewer_microbatches_than_stages():
    plan = search(_small(), load_cluster("dgx-a100", nodes=1), TrainingConfig(global_batch=8),
                  fixed={"pp": 4}, top_k=10, progress=False)  # fmt: skip
    for p in (plan, *plan.alternatives, *plan.landscape):
        assert p.microbatches >= p.parallel.pp, p


def test_p2p_is_priced_on_the_boundary_that_crosses_hosts(tmp_path):
    """pp=4 stages of 4 ranks on 2 hosts of 8: stage 0 -> 1 stays inside host 0, stage 1 -> 2
    crosses hosts. Slower NICs must make pipeline p2p dearer."""
    text = (REPO / "topologies" / "dgx-a100.yaml").read_text()
    slow = tmp_path / "slow-nics.yaml"
    slow.write_text(text.replace("name: dgx-a100", "name: slow-nics").replace(
        "link: ib-hdr-200", "link: eth-100g"))  # fmt: skip
    fixed = {"tp": 1, "dp": 4, "pp": 4, "schedule": "1f1b", "micro_batch_size": 1}
    cfg = TrainingConfig(global_batch=32)
    fast = search(_small(), load_cluster("dgx-a100", nodes=2), cfg, fixed=fixed, progress=False)
    slow_plan = search(_small(), load_cluster(slow, nodes=2), cfg, fixed=fixed, progress=False)
    assert fast.stages[1].devices == (4, 5, 6, 7) and fast.stages[2].devices[0] == 8
    assert slow_plan.predicted.breakdown.pp_comm > 2 * fast.predicted.breakdown.pp_comm > 0


def test_a_tied_embedding_weight_is_not_sent_between_layers():
    """The head reads the tied token embedding, so it 'leaves' the embed layer, but only the
    b x s x h hidden state is sent per microbatch (the pipeline send)."""
    from autopar.graph.prepare import prepare_model
    from autopar.sharding.layer_plan import choose_layer, price_layer

    cluster = load_cluster("dgx-a100", nodes=1)
    model = prepare_model(gpt(layers=2, hidden=256, heads=4, vocab=4000, seq_len=128), dtype="fp32")
    embed = model.layers[0]
    assert embed.kind == "embed"
    choice = choose_layer(embed.graph, tp=1, world=8, cluster=cluster, dtype="fp32",
                          sequence_parallel=False)  # fmt: skip
    price = price_layer(embed.graph, choice, tp=1, world=8, cluster=cluster, dtype="fp32")
    assert price.output_bytes == 1 * 128 * 256 * 4
