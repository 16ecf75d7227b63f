"""Our rules' output placements agree with DTensor's own sharding propagation.

The rules re-derive what ``torch.distributed.tensor`` registers per op (see rules.py for why we
do not call its private strategy functions); this pins the two together: for every strategy our
rule enumerates, DTensor is given the same input placements on a fake 4-rank mesh and must
produce the same output placement without redistributing. Runs in a subprocess because the
fake process group is global state.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from autopar.graph.opgraph import OpNode, TensorMeta
    from autopar.sharding.placements import Partial, spec_to_torch
    from autopar.sharding.rules import enumerate_strategies, op_dims

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    mesh = init_device_mesh("cpu", (4,))

    def node(op, ins, out, args=()):
        metas = tuple(TensorMeta(s, "float32", 0) for s in ins)
        return OpNode(name="n", kind="op", op=op, inputs=tuple("i%d" % i for i in range(len(ins))),
                      input_metas=metas, outputs=(TensorMeta(out, "float32", 0),), args=args)

    cases = [
        (node("aten.mm.default", [(8, 16), (16, 12)], (8, 12)), torch.mm),
        (node("aten.bmm.default", [(4, 8, 16), (4, 16, 12)], (4, 8, 12)), torch.bmm),
        (node("aten.add.Tensor", [(8, 12), (12,)], (8, 12)), torch.add),
        (node("aten.gelu.default", [(8, 12)], (8, 12)), torch.nn.functional.gelu),
        (node("aten._softmax.default", [(4, 8, 12)], (4, 8, 12), (None, -1, False)),
         lambda x: torch.softmax(x, -1)),
        (node("aten.t.default", [(8, 12)], (12, 8)), torch.t),
    ]
    checked = 0
    for n, fn in cases:
        dims = op_dims(n)
        strats = enumerate_strategies(dims, input_metas=n.input_metas, output_metas=n.outputs,
                                      mesh_shape=(4,), grad_inputs=(False,) * len(n.inputs),
                                      param_inputs=(False,) * len(n.inputs))
        for st in strats:
            if any(isinstance(p, Partial) for s in st.input_specs for p in s):
                continue  # distribute_tensor cannot create Partial inputs
            args = [distribute_tensor(torch.randn(m.shape), mesh, list(spec_to_torch(s)))
                    for m, s in zip(n.input_metas, st.input_specs)]
            out = fn(*args)
            want = spec_to_torch(st.output_specs[0])
            got = tuple(out.placements)
            norm = lambda ps: tuple("P" if p.is_partial() else str(p) for p in ps)
            assert norm(got) == norm(want), (n.op, st.name, got, want)
            checked += 1
    dist.destroy_process_group()
    print("checked", checked)
    """
)


def test_rules_match_dtensor_propagation() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 12
