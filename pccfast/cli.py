"""The ``pccfast`` command.

    pccfast demo                                   # the whole method on the bundled digits
    pccfast run --data npz:FILE --model vgg16_cifar --width 0.25 --epochs 3 \\
                --finetune-epochs 2 --target-flops 0.5 --out DIR
    pccfast train|scores|prune|finetune|eval|report --out DIR [same flags]
    pccfast study --config FILE --out DIR          # arms x criteria x targets over seeds
    pccfast bench --out DIR                        # measured speed-up: pruned vs original
    pccfast export --out DIR --format onnx         # onnx, torchscript or exported (torch.export)
    pccfast info

Settings come from defaults < DIR/config.json (stage commands, and run --resume) < --config
FILE < flags < --set SECTION.KEY=VALUE. Under torchrun every command runs data-parallel. Errors
in the input print one line and exit with status 2 (PCCFAST_DEBUG=1 shows the traceback
instead).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .prune.criteria import CRITERIA, get_criterion
from .regularizer import MODES


def _criterion(text: str) -> str:
    """--criterion: a registered name or package.module:Class, checked while parsing."""
    try:
        get_criterion(text, "the value")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _criteria_help() -> str:
    names = ", ".join(f"{name} ({cls.summary})" if cls.summary else name
                      for name, cls in CRITERIA.items())
    return (f"what the scores stage ranks channels by: {names}, or package.module:Class (a "
            "pccfast.prune.Criterion subclass)")


# (flag, config paths it sets, argparse keywords)
FLAGS = [
    ("--data", ["data.spec"],
     dict(metavar="SPEC", help="dataset: digits, cifar10:DIR, npz:FILE or imagefolder:DIR")),
    ("--train-limit", ["data.train_limit"],
     dict(type=int, metavar="N", help="train on a seeded random subset of N images")),
    ("--test-limit", ["data.test_limit"],
     dict(type=int, metavar="N", help="test on a seeded random subset of N images")),
    ("--download", ["data.download"],
     dict(action="store_const", const=True,
          help="download CIFAR-10 into the cifar10:DIR folder if it lacks it")),
    ("--augment", ["data.augment"],
     dict(choices=("auto", "none", "crop", "crop+flip"),
          help="training augmentation (auto: the dataset's usual)")),
    ("--workers", ["data.workers"],
     dict(type=int, metavar="N", help="data-loading worker processes (imagefolder)")),
    ("--model", ["model.name"],
     dict(metavar="NAME", help="vgg16_cifar, resnet56_cifar, resnet50, or package.module:factory")),
    ("--width", ["model.width"],
     dict(type=float, metavar="W", help="channel-width multiplier of the model")),
    ("--epochs", ["pretrain.epochs"], dict(type=int, metavar="N", help="pre-training epochs")),
    ("--batch-size", ["pretrain.batch_size", "finetune.batch_size"],
     dict(type=int, metavar="N", help="global batch size of pre-training and fine-tuning")),
    ("--lr", ["pretrain.lr"],
     dict(type=float, metavar="LR",
          help="pre-training learning rate (peak, before any batch scaling)")),
    ("--warmup-epochs", ["pretrain.warmup_epochs"],
     dict(type=float, metavar="E", help="pre-training linear warm-up epochs")),
    ("--label-smoothing", ["pretrain.label_smoothing", "finetune.label_smoothing"],
     dict(type=float, metavar="EPS", help="label smoothing of the cross-entropy")),
    ("--amp", ["pretrain.amp", "finetune.amp"],
     dict(choices=("none", "bf16", "fp16"), help="autocast precision")),
    ("--channels-last", ["pretrain.channels_last", "finetune.channels_last"],
     dict(action="store_const", const=True, help="channels_last memory format")),
    ("--compile", ["pretrain.compile", "finetune.compile"],
     dict(action="store_const", const=True, help="torch.compile the model for training")),
    ("--pcc-weight", ["pcc.weight"],
     dict(type=float, metavar="W", help="weight of the PCC term in pre-training (0: none)")),
    ("--pcc-mode", ["pcc.mode"],
     dict(choices=tuple(MODES), help="promote (reward correlation, default) or suppress")),
    ("--no-pcc", ["pcc.weight"],
     dict(action="store_const", const=0.0, help="pre-train without the PCC term")),
    ("--calib-images", ["ci.images"],
     dict(type=int, metavar="N",
          help="calibration images for CI (640 unless the config says otherwise)")),
    ("--criterion", ["ci.criterion"], dict(type=_criterion, metavar="NAME")),  # help: the registry
    ("--bn-images", ["prune.bn_images"],
     dict(type=int, metavar="N",
          help="also report the pruned accuracy with BatchNorm statistics re-estimated on N "
               "training images (pruned_bn_acc; 0: off; the saved model is unchanged)")),
    ("--round-to", ["prune.round_to"],
     dict(type=int, metavar="N",
          help="every pruned layer keeps a multiple of N channels (at least N), counts fast "
               "kernels prefer")),
    ("--no-speed", ["prune.speed"],
     dict(action="store_const", const=False,
          help="skip measuring the pruned model's CPU speed-up (summary.json, report.md)")),
    ("--finetune-epochs", ["finetune.epochs"],
     dict(type=int, metavar="N", help="fine-tuning epochs")),
    ("--finetune-lr", ["finetune.lr"],
     dict(type=float, metavar="LR", help="fine-tuning learning rate")),
    ("--baseline", ["run.baseline"],
     dict(action="store_const", const=True, help="also pre-train without PCC (baseline_acc)")),
    ("--device", ["run.device"],
     dict(metavar="DEV", help="auto (GPU when present), cpu, cuda, cuda:1, ...")),
    ("--seed", ["run.seed", "pretrain.seed", "finetune.seed"],
     dict(type=int, metavar="N", help="seed of weights, subsets and batch order")),
]
PRUNE_FLAGS = [
    ("--rates", ["prune.rates"],
     dict(metavar="LIST", help="CHIP-style per-layer rates, e.g. '[0.21]*7+[0.75]*5'")),
    ("--tau", ["prune.tau"],
     dict(type=float, metavar="T",
          help="adaptive threshold: keep channels holding this share of each layer's CI")),
    ("--target-flops", ["prune.target_flops"],
     dict(type=float, metavar="F", help="remove this fraction of the FLOPs")),
    ("--target-params", ["prune.target_params"],
     dict(type=float, metavar="F", help="remove this fraction of the params")),
]


def _dest(flag: str) -> str:
    return "opt_" + flag.lstrip("-").replace("-", "_")


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", metavar="DIR", help="run folder (created if needed)")
    common.add_argument("--config", metavar="FILE", help="TOML recipe (configs/*.toml)")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config value, e.g. --set finetune.weight_decay=0.005")
    common.add_argument("--resume", action="store_true",
                        help="continue an interrupted run with its own settings: finished stages "
                             "are skipped, an interrupted one continues from its checkpoint; "
                             "outputs made with other settings are refused (without --resume, "
                             "run replaces the folder's results and a stage command redoes its "
                             "stage and removes what read from it)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = common.add_argument_group("settings (override the config)")
    for flag, _, kw in FLAGS:
        if flag == "--criterion":  # the registry as it is now, registered criteria included
            kw = {**kw, "help": _criteria_help()}
        group.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, **kw)
    prune = group.add_mutually_exclusive_group()
    for flag, _, kw in PRUNE_FLAGS:
        prune.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, **kw)
    return common


def flag_overrides(args) -> dict:
    """The config tree set by the flags given on the command line."""
    tree: dict = {}
    for flag, paths, _ in FLAGS + PRUNE_FLAGS:
        dest = _dest(flag)
        if hasattr(args, dest):
            for path in paths:
                section, key = path.split(".")
                tree.setdefault(section, {})[key] = getattr(args, dest)
    return tree


def resolve_config(args, inherit: bool):
    """defaults (or the demo's) < DIR/config.json (when ``inherit``) < --config < flags < --set."""
    from .pipeline.config import RunConfig, demo_config, load_toml, parse_assignment
    from .pipeline.folder import RunFolder

    cfg = demo_config() if args.command == "demo" else RunConfig()
    if inherit and args.out:
        folder = RunFolder(args.out)
        folder.refuse_foreign(("config.json",))  # a project's own config.json is not ours
        saved = folder.read_config()
        if saved is not None:
            try:
                cfg = RunConfig.from_dict(saved, cfg)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{folder.config_path}: {exc}") from exc
    if args.config:
        cfg = RunConfig.from_dict(load_toml(args.config), cfg)
    cfg = RunConfig.from_dict(flag_overrides(args), cfg)
    for text in args.set:
        cfg = RunConfig.from_dict(parse_assignment(text), cfg)
    return cfg


def _study(args) -> int:
    from .pipeline.config import load_toml, parse_assignment
    from .study import Study, StudyConfig

    tree = load_toml(args.config)
    for text in args.set:
        (section, values), = parse_assignment(text).items()
        if section == "arms":
            raise ValueError("--set changes the base settings and [study]; edit [arms.NAME] "
                             "tables in the study file")
        tree.setdefault(section, {}).update(values)
    config = StudyConfig.from_dict(tree)
    only = [a for a in args.arms.split(",") if a] if args.arms is not None else None
    study = Study(config, args.out, device=args.device, progress=not args.no_progress,
                  only=only)
    if args.report:
        print(f"study  {study.write_report()}")
        return 0
    if args.dry_run:
        study.check()
        print(study.describe())
        return 0
    try:
        path = study.run()
    except KeyboardInterrupt:
        print(f"pccfast study: interrupted; every finished cell is in {study.csv_path}: run the "
              "same command again to resume", file=sys.stderr)
        return 130
    print(f"study  {path}, {Path(args.out) / 'study.md'}")
    return 0


def prepare_out(out) -> None:
    """Creates the run folder and proves it writable, as one-line errors naming --out."""
    import tempfile

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise ValueError(f"--out {out}: cannot write the run folder "
                         f"({exc.strerror or exc}{where})") from exc


def _info(args) -> int:
    from .info import format_info

    print(format_info())
    return 0


def _stage(args) -> int:
    from .pipeline import Pipeline
    from .pipeline.folder import RunFolder
    from .report import format_table
    from .train import distributed

    args.command = {alias: name for name, aliases in ALIASES.items()
                    for alias in aliases}.get(args.command, args.command)
    if args.command == "demo" and not args.out:
        args.out = str(Path("runs") / "demo")
    if not args.out:
        raise ValueError(f"pccfast {args.command} needs --out DIR (the run folder)")
    fresh = args.command in ("run", "demo") and not args.resume
    if args.command not in ("eval", "report"):  # (report checks the files it writes)
        RunFolder(args.out).refuse_foreign()  # the user's files of pccfast's names stay theirs
    cfg = resolve_config(args, inherit=not fresh)
    env = distributed.setup(cfg.run.device)
    try:
        pipe = Pipeline(cfg, args.out, env=env, progress=not args.no_progress)
        for note in pipe.check(args.command, args.resume):  # before anything is written
            pipe.echo(note)
        if args.command not in ("eval", "report"):  # read-only commands write no config.json
            if env.is_main:
                prepare_out(args.out)
                pipe.folder.claim()
            distributed.barrier()
            pipe.prepare(args.command, resume=args.resume)  # refusals before anything is written
            if env.is_main:
                pipe.folder.write_config(cfg.to_dict())
        distributed.barrier()
        command = args.command
        if command in ("run", "demo"):
            pipe.echo(f"run folder {args.out} on {env.device}"
                      + (f" x{env.world_size} processes" if env.distributed else ""))
            summary = pipe.run(resume=args.resume)
            pipe.echo("")
            pipe.echo(format_table(summary))
            pipe.echo(f"details: {Path(args.out) / 'report.md'}, {Path(args.out) / 'summary.json'}")
        elif command == "train":
            pipe.pretrain(resume=args.resume)
        elif command == "scores":
            pipe.scores()
        elif command == "prune":
            pipe.prune()
        elif command == "finetune":
            pipe.finetune(resume=args.resume)
        elif command == "eval":
            pipe.evaluate(Path(args.model_file) if args.model_file else None,
                          trusted=args.trust_pickle)
        elif command == "report":
            pipe.report()
    finally:
        distributed.teardown()
    return 0


STAGES = {
    "demo": "the whole method on the bundled digits in a few CPU minutes (default --out runs/demo)",
    "run": "every stage: pretrain (PCC) -> scores (by --criterion) -> prune -> finetune -> report",
    "train": "pre-train with the PCC regulariser (and the baseline with --baseline)",
    "scores": ("score every scored layer's channels by --criterion (channel independence by "
               "default)"),
    "prune": "plan from the scores (--rates/--tau/--target-*) and remove the channels",
    "finetune": "fine-tune the pruned model",
    "eval": "test accuracy, params and FLOPs of the latest model (or --model-file)",
    "report": "write DIR/report.md with plots",
}

ALIASES = {"scores": ["ci"]}  # the scores stage's name before it scored by any criterion


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pccfast",
        description=("PCC pre-training and channel-independence pruning of CNNs, with fused "
                     "kernels."),
        epilog="Settings: defaults < DIR/config.json (stage commands and run --resume) < "
               "--config FILE < flags < --set. Data-parallel under torchrun (NCCL on GPUs, "
               "gloo on CPUs).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    common = _common_parser()
    for name, text in STAGES.items():
        sub = commands.add_parser(name, help=text, description=text, parents=[common],
                                  aliases=ALIASES.get(name, []))
        if name == "eval":
            sub.add_argument("--model-file", metavar="FILE",
                             help="a model saved by pccfast (default: the run's latest)")
            sub.add_argument("--trust-pickle", action="store_true",
                             help="let --model-file hold a pickled module (a model outside the "
                                  "zoo); unpickling runs code, so trusted files only")
        sub.set_defaults(run=_stage)
    from .cli_deploy import add_commands

    add_commands(commands, common, resolve_config)
    text = ("compare pre-training arms x pruning criteria x FLOPs targets over seeds: every "
            "cell its own folder, resumable; writes study.csv, study.md and plots")
    study = commands.add_parser("study", help=text, description=text)
    study.add_argument("--config", metavar="FILE", required=True,
                       help="study TOML: a run config plus [study] and [arms.NAME] tables "
                            "(benchmarks/accuracy/study_cpu.toml)")
    study.add_argument("--out", metavar="DIR", required=True,
                       help="study folder; run again to resume (finished cells are never redone)")
    study.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a base setting or a [study] key, e.g. --set "
                            "pretrain.epochs=5 --set study.seeds=[0] (arms still override "
                            "the base)")
    study.add_argument("--device", metavar="DEV", help="override run.device")
    study.add_argument("--arms", metavar="NAME[,NAME]",
                       help="run only these arms' pairs now (e.g. the baseline while another "
                            "arm is still being chosen); the report covers every arm")
    study.add_argument("--dry-run", action="store_true",
                       help="print the cells, what is done, the work left (pre-training "
                            "epochs done, the process running each pair), and exit")
    study.add_argument("--report", action="store_true",
                       help="rewrite study.md and the plots from study.csv and exit (e.g. while "
                            "the study runs in another process)")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.set_defaults(run=_study)
    info = commands.add_parser("info", help="versions, compiled extension, available backends")
    info.set_defaults(run=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import StageError

    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, StageError, ImportError) as exc:
        if os.environ.get("PCCFAST_DEBUG"):
            raise
        kind = "" if isinstance(exc, (ValueError, StageError)) else f"{type(exc).__name__}: "
        text = " ".join(str(exc).split("\n"))  # one line, whatever the message
        print(f"pccfast {args.command}: error: {kind}{text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
