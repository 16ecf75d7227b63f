"""The ``autopar`` console script: a thin shell over the Python API.

One flag per config field; every command maps errors to exit codes a script can test:
0 ok, 2 bad input (unknown model, topology, malformed or inconsistent plan file, an exception in
the user's own model code), 3 infeasible (does not fit).
Every plan is validated (``Plan.validate``) before it is rendered, exported or launched.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from autopar.config import STACKS, Offload, Optimizer
from autopar.errors import AutoparError, ConfigError, InfeasibleError, TraceError, UserCodeError
from autopar.export import EXPORT_FORMATS

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_INFEASIBLE = 0, 1, 2, 3
FIXED_FLAGS = (
    "dp",
    "tp",
    "pp",
    "microbatches",
    "micro_batch_size",
    "recompute",
    "zero",
    "schedule",
    "virtual_stages",
)


def build_parser() -> argparse.ArgumentParser:
    """The complete flag set (frozen by tests/cli/test_cli_options.py)."""
    parser = argparse.ArgumentParser(
        prog="autopar",
        description="Find, explain and apply a parallel training plan for a PyTorch model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="search the best plan for a model on a cluster and print it")
    p.add_argument("model", help="zoo name (see `autopar models`), family:k=v,..., a YAML file, "
                   "or package.module:factory")  # fmt: skip
    p.add_argument("--cluster", required=True, help="shipped topology name or a topology YAML path")
    p.add_argument("--nodes", type=int, default=None, help="number of hosts (default: the file's)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default 512)")  # fmt: skip
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--example-inputs", default=None, metavar="PKG.MOD:FN",
                   help="for a model without an example_inputs() method: a function of no "
                   "arguments returning one batch of what its forward takes (a tensor, tuple or "
                   "dict; batch on dim 0). Token models without it get token ids from their "
                   "first nn.Embedding and --seq")  # fmt: skip
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument(
        "--optimizer",
        choices=get_args(Optimizer),
        default="adam",
        help="sets optimizer state bytes per parameter and step cost (default adam)",
    )
    p.add_argument("--offload", choices=get_args(Offload), default="auto",
                   help="model state in host memory: auto (searched where the model does not "
                   "fit, needs the topology's host profile), none, optimizer (ZeRO-Offload), "
                   "full (FSDP2 CPU offload); auto and optimizer/full also search per-block "
                   "activation offload")  # fmt: skip
    stack = p.add_argument_group("software stack the plan is priced for")
    stack.add_argument("--stack", choices=tuple(STACKS), default=None,
                       help="preset setting the five flags below and the recompute kinds searched "
                            "(each has a source; explicit flags win)")  # fmt: skip
    stack.add_argument("--attention", choices=("flash", "unfused"), default=None,
                       help="attention kernel (default flash)")  # fmt: skip
    stack.add_argument("--sequence-parallel", choices=("auto", "on", "off"), default=None,
                       help="sequence parallelism with tp (default auto: searched)")  # fmt: skip
    stack.add_argument("--overlap-grad-reduce", choices=("on", "off"), default=None,
                       help="data-parallel gradient reduction overlapped with backward "
                       "(default on)")  # fmt: skip
    stack.add_argument("--grad-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                       help="dtype gradients are accumulated and reduced in (default: --dtype; "
                       "fp32 with --stack megatron-core or torchtitan)")  # fmt: skip
    stack.add_argument("--pipeline-scatter-gather", choices=("on", "off"), default=None,
                       help="a pipeline send replicated over tp goes as 1/tp per rank and is "
                       "all-gathered on arrival (Megatron-LM 2021-22; default off, on with "
                       "--stack megatron-2021)")  # fmt: skip
    p.add_argument("--top", type=int, default=5, help="runners-up to show (default 5)")
    p.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")
    p.add_argument("--report", type=Path, default=None,
                   help="also write a self-contained HTML report here")  # fmt: skip
    p.add_argument("--time-limit", type=float, default=None, help="search time budget, seconds")
    p.add_argument("--emit", choices=EXPORT_FORMATS, default=None,
                   help="print the plan as that framework's launch command and config")  # fmt: skip
    fixed = p.add_argument_group("fix part of the plan (price your current setup)")
    fixed.add_argument("--dp", type=int, default=None, help="data-parallel degree")
    fixed.add_argument("--tp", type=int, default=None, help="tensor-parallel degree")
    fixed.add_argument("--pp", type=int, default=None, help="pipeline-parallel degree")
    fixed.add_argument("--microbatches", type=int, default=None, help="microbatches per step")
    fixed.add_argument(
        "--micro-batch-size", type=int, default=None, help="sequences per microbatch"
    )
    fixed.add_argument("--recompute", choices=("none", "selective", "full"), default=None)
    fixed.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage")
    fixed.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved_1f1b"), default=None)
    fixed.add_argument("--virtual-stages", type=int, default=None,
                       help="model chunks per device of interleaved_1f1b (Megatron's virtual "
                            "pipeline size)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress output on stderr")

    e = sub.add_parser("explain", help="re-render a saved plan")
    e.add_argument("plan", type=Path, help="plan JSON written by `autopar plan --json`")
    e.add_argument("--emit", choices=EXPORT_FORMATS, default=None)
    e.add_argument("--report", type=Path, default=None,
                   help="also write a self-contained HTML report here")  # fmt: skip

    sub.add_parser("models", help="list the built-in models with parameter counts")

    t = sub.add_parser("topology", help="inspect cluster topologies")
    tsub = t.add_subparsers(dest="topology_command", required=True, metavar="SUBCOMMAND")
    ts = tsub.add_parser("show", help="hosts, devices, links and priced collectives")
    ts.add_argument("name", help="shipped topology name or a topology YAML path")
    ts.add_argument("--nodes", type=int, default=None)
    tsub.add_parser("list", help="list the shipped topologies")

    c = sub.add_parser(
        "calibrate", help="measure collectives (or, with --compute, kernels) and write a profile"
    )
    c.add_argument("--output", type=Path, default=None, help="profile YAML to write")
    c.add_argument("--compute", action="store_true",
                   help="time GEMMs, attention and memory-bound kernels on this device and fit "
                   "its compute profile instead of the network")  # fmt: skip
    c.add_argument("--device", default=None,
                   help="torch device for --compute (default: cuda if present, else cpu)")  # fmt: skip
    c.add_argument("--max-bytes", type=int, default=1 << 24, help="largest message size")
    c.add_argument("--repeats", type=int, default=5, help="timed repetitions per size")

    la = sub.add_parser("launch", help="run a training script with torchrun sized from a plan")
    la.add_argument("plan", type=Path)
    la.add_argument("--dry-run", action="store_true",
                    help="print the torchrun line (one per node) only")  # fmt: skip
    la.add_argument("--nnodes", type=int, default=None,
                    help="nodes (default: the hosts of the cluster the plan was made for)")  # fmt: skip
    la.add_argument("--nproc-per-node", type=int, default=None,
                    help="processes per node (default: the plan's devices per host)")  # fmt: skip
    la.add_argument("--node-rank", type=int, default=None,
                    help="this node's rank in a multi-node launch (default: c10d rendezvous "
                    "assigns it)")  # fmt: skip
    la.add_argument("script", nargs="*", help="-- train_script.py [args] (after a literal --)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in argv:  # `autopar launch PLAN -- script.py --its-own-flags`: never parsed by us
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if tail:
        if args.command != "launch":
            print("autopar: error: '--' is only used by `autopar launch`", file=sys.stderr)
            return EXIT_BAD_INPUT
        args.script = [*args.script, *tail]
    try:
        return _COMMANDS[args.command](args)
    except InfeasibleError as e:
        print(f"autopar: infeasible: {e}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except ConfigError as e:
        print(f"autopar: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except AutoparError as e:
        print(f"autopar: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("autopar: interrupted", file=sys.stderr)
        return 130


def _cmd_plan(args: argparse.Namespace) -> int:
    from autopar.config import TrainingConfig
    from autopar.explain import render
    from autopar.export import export_plan
    from autopar.models import parse_model_spec
    from autopar.solver.search import search
    from autopar.topology.load import load_cluster

    if args.json is not None:
        _check_writable(args.json, flag="--json")  # before any tracing: never lose a plan
    if args.report is not None:
        _check_writable(args.report, flag="--report")
    cluster = load_cluster(args.cluster, nodes=args.nodes)
    spec = _with_seq_len(args.model, args.seq)
    model = parse_model_spec(spec, example_inputs=args.example_inputs, seq_len=args.seq)
    if not callable(getattr(model, "example_inputs", None)):
        from torch import nn

        tokens = any(isinstance(m, nn.Embedding) for m in model.modules())
        raise ConfigError(
            f"{type(model).__name__} has no example_inputs() method: pass --example-inputs "
            "package.module:function (a function returning one batch of what its forward takes, "
            "batch on dim 0)"
            + (", or --seq to feed its nn.Embedding token ids of that length" if tokens else ""),
            field="--example-inputs",
        )
    batch = {} if args.global_batch is None else {"global_batch": args.global_batch}
    overlap = None if args.overlap_grad_reduce is None else args.overlap_grad_reduce == "on"
    sg = args.pipeline_scatter_gather
    config = TrainingConfig(
        **batch,  # unset: TrainingConfig's own default
        seq_len=args.seq,
        dtype=args.dtype,
        optimizer=args.optimizer,
        offload=args.offload,
        stack=args.stack,
        attention=args.attention,
        sequence_parallel=args.sequence_parallel,
        overlap_grad_reduce=overlap,
        grad_dtype=args.grad_dtype,
        pipeline_scatter_gather=None if sg is None else sg == "on",
    )
    fixed = {k: getattr(args, k) for k in FIXED_FLAGS if getattr(args, k) is not None}
    user_files = _user_files(model, args.model, args.example_inputs)
    try:
        plan = search(
            model,
            cluster,
            config,
            fixed=fixed or None,
            top_k=args.top,
            time_limit_s=args.time_limit,
            progress=not args.quiet,
            model_spec=spec,
        )
    except TraceError as e:
        raise UserCodeError(str(e), spec=args.model, location=_user_location(e, user_files)) from e
    except AutoparError:
        raise
    except Exception as e:  # the user's model code raised (its example_inputs, its forward)
        where = _user_location(e, user_files) if user_files else None
        if where is None:
            raise  # autopar's own bug: keep the traceback
        line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserCodeError(
            f"{type(e).__name__}: {line}" if line else type(e).__name__,
            spec=args.model,
            location=where,
        ) from e
    plan.validate()
    print(export_plan(plan, args.emit) if args.emit else render(plan))
    if args.json is not None:
        try:
            plan.to_json(args.json)
        except OSError as e:
            raise ConfigError(
                f"cannot write the plan ({e.strerror}); it is printed above", file=str(args.json),
                field="--json",
            ) from e  # fmt: skip
        print(f"\nplan written to {args.json}", file=sys.stderr)
    if args.report is not None:
        _write_report(plan, args.report, cluster=cluster)
    return EXIT_OK


def _write_report(plan: Any, path: Path, *, cluster: Any = None) -> None:
    from autopar.report import write_report

    try:
        out = write_report(plan, path, cluster=cluster)
    except OSError as e:
        raise ConfigError(
            f"cannot write the report ({e.strerror})", file=str(path), field="--report"
        ) from e
    print(f"report written to {out}", file=sys.stderr)


def _check_writable(path: Path, *, flag: str) -> None:
    """Refuse a path the plan could not be written to, before the search runs."""
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        if path.exists():
            with path.open("a"):
                pass
        else:
            with path.open("x"):
                pass
            path.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write the plan here ({e.strerror or e})", file=str(path), field=flag
        ) from e


def _user_files(model: Any, spec: str, example_inputs: str | None) -> list[str]:
    """Source files of the user's own code behind the model: the factory's module, the model's
    class and the example-inputs function (none for the zoo and Hugging Face models)."""
    files = []
    for candidate in (spec, example_inputs):
        module = candidate.partition(":")[0] if candidate and ":" in candidate else None
        mod = sys.modules.get(module) if module else None
        path = getattr(mod, "__file__", None)
        if path:
            files.append(path)
    try:
        path = inspect.getsourcefile(type(model))
    except TypeError:
        path = None
    if path:
        files.append(path)
    root = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return [f for f in files if not os.path.abspath(f).startswith(root)]


def _user_location(error: BaseException, files: list[str]) -> str | None:
    from autopar.errors import user_code_location

    return user_code_location(error, files=files) if files else None


def _cmd_explain(args: argparse.Namespace) -> int:
    from autopar.explain import render
    from autopar.export import export_plan
    from autopar.plan import Plan

    plan = Plan.from_json(args.plan)  # validated: an inconsistent plan is exit 2
    print(export_plan(plan, args.emit) if args.emit else render(plan))
    if args.report is not None:
        _write_report(plan, args.report)
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    from autopar.models import list_models

    rows = list_models()
    print(f"{'name':<14} {'family':<8} {'parameters':>11} {'published':>10}")
    for row in rows:
        published = _human_count(row.published_params) if row.published_params else "-"
        print(f"{row.name:<14} {row.family:<8} {_human_count(row.params):>11} {published:>10}")
    families = ", ".join(sorted({r.family for r in rows}))
    print(f"\nParametric families: {families}  (e.g. gpt:layers=48,hidden=8192,heads=64)")
    return EXIT_OK


def _cmd_topology(args: argparse.Namespace) -> int:
    from autopar.topology.load import load_cluster, shipped_topologies

    if args.topology_command == "list":
        for name in shipped_topologies():
            print(name)
        return EXIT_OK
    from autopar.cost.describe import describe_cluster

    print(describe_cluster(load_cluster(args.name, nodes=args.nodes)))
    return EXIT_OK


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from autopar.cost.calibrate import calibrate_compute_main, calibrate_main

    if args.compute:
        return calibrate_compute_main(args.output, args.device, args.repeats)
    return calibrate_main(output=args.output, max_bytes=args.max_bytes, repeats=args.repeats)


def _cmd_launch(args: argparse.Namespace) -> int:
    from autopar.emit.launch import launch

    script = list(args.script)
    if not script:
        raise ConfigError("missing the training script: autopar launch PLAN.json -- train.py [args]",
                          field="script")  # fmt: skip
    return launch(
        args.plan,
        script,
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        node_rank=args.node_rank,
        dry_run=args.dry_run,
    )


def _with_seq_len(spec: str, seq: int | None) -> str:
    """Rebuild a zoo or family model at the requested sequence length (it sizes positions)."""
    from autopar.models import PRESETS

    if seq is None:
        return spec
    if spec in PRESETS:  # a preset takes overrides after a colon: gpt3-175b:seq_len=4096
        return f"{spec}:seq_len={seq}"
    if ":" in spec and "=" in spec.split(":", 1)[1]:
        return f"{spec},seq_len={seq}"
    return spec


def _human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


_COMMANDS = {
    "plan": _cmd_plan,
    "explain": _cmd_explain,
    "models": _cmd_models,
    "topology": _cmd_topology,
    "calibrate": _cmd_calibrate,
    "launch": _cmd_launch,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
