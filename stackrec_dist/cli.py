"""``stackrec`` command line: parse, build, run, close. Each subcommand is a short function."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from stackrec_dist.config import ConfigError, JobConfig, dump_config, load_config
from stackrec_dist.console import emit_result, print_metrics_table, report_error
from stackrec_dist.errors import StackrecError, unwrap_worker_error
from stackrec_dist.launch.submit import add_arguments as add_submit_arguments

log = logging.getLogger("stackrec")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="job YAML in configs/ (default: embedded defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                        help="override a config field (repeatable), value parsed as YAML")


def _load(args: argparse.Namespace) -> JobConfig:
    return load_config(args.config, args.overrides)


# -- subcommands ---------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_config(_load(args)), end="")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from stackrec_dist.data.prepare import prepare_dataset

    cfg = _load(args)
    report = prepare_dataset(cfg.prepare, storage_options=cfg.data.storage_options)
    print(report)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.address:
        cfg.distributed.address = args.address
    if cfg.plan:
        if args.init:
            raise ConfigError("--init starts a single training run; a plan starts from its first stage")
        from stackrec_dist.scenarios.plan import run_plan

        result = run_plan(cfg)
    else:
        from stackrec_dist.train.job import train_job

        summary, test, label = train_job(cfg, init=args.init, resume=args.resume)
        print_metrics_table(f"{cfg.name}: test", {label: test}, cfg.eval.ks)
        result = {**{k: v for k, v in summary.items() if k != "history"}, **{f"test/{k}": v for k, v in test.items()}}
    emit_result(result)
    return 0


def _checkpoint_meets_dataset(args: argparse.Namespace, cfg: JobConfig):
    """Open ``--checkpoint`` and check its catalogue against the config's dataset, when one is given."""
    from stackrec_dist.train.checkpoint import check_catalogue, open_checkpoint

    checkpoint = open_checkpoint(args.checkpoint, cfg.data.storage_options)
    if args.config or any(o.startswith("data.path=") for o in args.overrides):
        from stackrec_dist.train.data_info import dataset_num_items

        check_catalogue(checkpoint, dataset_num_items(cfg.data), cfg.data.path)
    return checkpoint


def cmd_grow(args: argparse.Namespace) -> int:
    from stackrec_dist.growth.grow import grow_state
    from stackrec_dist.train.checkpoint import save_model_checkpoint

    cfg = _load(args)
    checkpoint = _checkpoint_meets_dataset(args, cfg)
    which, state = checkpoint.weights(args.weights)
    parent = checkpoint.model_config
    grown, grown_cfg = grow_state(state, parent, cfg.growth, seed=cfg.train.seed)
    save_model_checkpoint(args.output, grown, grown_cfg, {"parent": str(args.checkpoint), "parent_weights": which})
    print(f"stackrec: grew the {which} weights of {args.checkpoint}: {parent.num_blocks} -> "
          f"{grown_cfg.num_blocks} blocks ({cfg.growth.method}, alpha {cfg.growth.alpha_policy})")
    emit_result({"blocks": grown_cfg.num_blocks, "parent_blocks": parent.num_blocks, "output": str(args.output)})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from stackrec_dist.eval.evaluate import evaluate_split
    from stackrec_dist.train.device import resolve_device

    cfg = _load(args)
    device = resolve_device(cfg.train.device).torch_device()
    checkpoint = _checkpoint_meets_dataset(args, cfg)
    model, which = checkpoint.load_model(args.weights)
    metrics = evaluate_split(model, cfg.data, args.split, cfg.eval, device)
    print_metrics_table(f"{args.split}: {args.checkpoint} ({which} weights)",
                        {f"{model.cfg.backbone}-{model.cfg.num_blocks}": metrics}, cfg.eval.ks)
    emit_result({f"{args.split}/{k}": v for k, v in metrics.items()})
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from stackrec_dist.scenarios.quickstart import QUICKSTART_DEFAULTS, run_quickstart

    return run_quickstart(load_config(args.config, QUICKSTART_DEFAULTS + args.overrides))


def cmd_report(args: argparse.Namespace) -> int:
    from stackrec_dist.scenarios.report import main as report_main

    return report_main(args)


def cmd_submit(args: argparse.Namespace) -> int:
    from stackrec_dist.launch.submit import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stackrec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (always written to $STACKREC_ERROR_LOG or "
                             "~/.cache/stackrec/last-error.log)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare", help="raw interactions -> sharded sequence Parquet + manifest")
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (single process, Ray+DeepSpeed, or a growth plan)")
    _add_config_args(p)
    p.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS or embedded local Ray)")
    p.add_argument("--resume", action="store_true", help="continue from <train.checkpoint_dir>/last")
    p.add_argument("--init", default="", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights and model config (any run's checkpoint, local or s3://)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("grow", help="stack a checkpoint's k blocks into 2k")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory to grow (any run's, local or s3://)")
    p.add_argument("--output", required=True, help="where the grown checkpoint goes")
    p.add_argument("--weights", choices=("best", "final"), default="best",
                   help="grow the best validation weights (default, when recorded) or the final ones")
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("evaluate", help="full-ranking MRR/HR/NDCG@N of a checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="any run's checkpoint directory, local or s3://")
    p.add_argument("--split", default="test")
    p.add_argument("--weights", choices=("best", "final"), default="best",
                   help="evaluate the best validation weights (default, when recorded) or the final ones")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quickstart", help="prepare MovieLens-100K, train, grow, evaluate: the README's first command")
    _add_config_args(p)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("report", help="markdown table + plots from scenario runs")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--output", default="docs/results/report", help="output prefix (.md and .png are added)")
    p.add_argument("--baseline", default="", help="run directory name of the from-scratch baseline")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("submit", help="submit a job to a Ray cluster (ray job submit)")
    add_submit_arguments(p)
    p.set_defaults(func=cmd_submit)
    for p in sub.choices.values():  # `stackrec train --debug ...` works as well as `stackrec --debug train`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("stackrec: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line, bugs are re-raised
        err = unwrap_worker_error(exc)
        if not isinstance(err, StackrecError):
            raise
        return report_error(err, exc, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
