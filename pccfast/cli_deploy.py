"""``pccfast bench`` and ``pccfast export``: measured speed and deployment files of a run.

    pccfast bench --out DIR                       # original vs pruned, batch 1 and 64, CPU
    pccfast bench --model-file FILE --input-size 3,32,32 [--baseline-file FILE]
    pccfast export --out DIR --format onnx        # DIR/export/<model>.onnx, checked in onnxruntime

In a run folder the original is the pretrained model and the pruned one the fine-tuned model
(else the pruned one); the input size comes from the run's plan (else its data).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .deploy import FORMATS, SUFFIXES


def _input_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}")
    return size


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes such as 1,64, got {text!r}")
    return sizes


def add_commands(commands, common) -> None:
    """Adds ``bench`` and ``export`` to the CLI's subcommands (``common``: the shared flags)."""
    text = ("measured forward latency: the run's pruned model against its original (or "
            "--model-file against --baseline-file), alternating, median and quartiles")
    bench = commands.add_parser("bench", help=text, description=text, parents=[common])
    _model_flags(bench)
    bench.add_argument("--baseline-file", metavar="FILE",
                       help="the model to compare with (default with --out: the pretrained one)")
    bench.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 64), metavar="N,N",
                       help="batch sizes to time (default 1,64)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="torch CPU threads while timing (default: torch's)")
    bench.add_argument("--rounds", type=int, default=20, metavar="N",
                       help="timed rounds per batch size, each running both models (default 20)")
    bench.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                       help="wall clock (latency, default) or process CPU time (steadier on a "
                            "shared machine; latency on one thread)")
    bench.add_argument("--onnx", action="store_true",
                       help="also time both models exported to ONNX in onnxruntime")
    bench.set_defaults(run=_bench)
    text = "write the run's latest model (or --model-file) as ONNX, TorchScript or torch.export"
    export = commands.add_parser("export", help=text, description=text, parents=[common])
    _model_flags(export)
    export.add_argument("--format", choices=FORMATS, default="onnx",
                        help="onnx (checked in onnxruntime when installed), torchscript or "
                             "exported (torch.export.save)")
    export.add_argument("--path", metavar="FILE",
                        help="where to write (default: DIR/export/<model><suffix>)")
    export.set_defaults(run=_export)


def _model_flags(parser) -> None:
    parser.add_argument("--model-file", metavar="FILE",
                        help="a model saved by pccfast (default: the run's latest)")
    parser.add_argument("--input-size", type=_input_size, metavar="C,H,W",
                        help="one input's shape (default: the run's)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="let model files hold a pickled module (trusted files only)")


class _Models:
    """Finds and loads a run's models and input size (or the files named on the line)."""

    def __init__(self, args):
        from .cli import resolve_config
        from .pipeline import Pipeline

        self.args = args
        if not args.out and not args.model_file:
            raise ValueError(f"pccfast {args.command} needs --out DIR (a run folder) or "
                             f"--model-file FILE")
        self.pipe = None
        if args.out:
            self.pipe = Pipeline(resolve_config(args, inherit=True), args.out, progress=False)

    def load(self, path: Path, user_file: bool):
        from .io import load

        trusted = user_file and self.args.trust_pickle
        if self.pipe is not None:
            return self.pipe._load(Path(path), allow_pickle=trusted).cpu().eval()
        return load(path, allow_pickle=trusted).cpu().eval()

    def stage_file(self, stages) -> Path:
        for stage in stages:
            path = self.pipe.folder.model_path(stage)
            if path.is_file():
                return path
        raise ValueError(f"{self.pipe.folder.out} holds no {' or '.join(stages)} model yet")

    def input_size(self) -> tuple[int, ...]:
        if self.args.input_size:
            return self.args.input_size
        if self.pipe is None:
            raise ValueError("--model-file without a run folder needs --input-size C,H,W")
        plan = self.pipe.folder.path("plan.json")
        if plan.is_file():
            size = json.loads(plan.read_text()).get("input_size")
            if size:
                return tuple(size[1:])
        return tuple(self.pipe.data.input_size[1:])


def _bench(args) -> int:
    from .atomic import atomic_write_json
    from .speed import benchmark

    models = _Models(args)
    if args.model_file:
        model_path = Path(args.model_file)
        base_path = Path(args.baseline_file) if args.baseline_file else None
    else:
        model_path = models.stage_file(("finetune", "prune"))
        base_path = (Path(args.baseline_file) if args.baseline_file
                     else models.stage_file(("pretrain",)))
    size = models.input_size()
    model = models.load(model_path, user_file=bool(args.model_file))
    baseline = None if base_path is None else models.load(base_path,
                                                          user_file=bool(args.baseline_file))
    results = {"pytorch": benchmark(model, size, baseline=baseline, batch_sizes=args.batch_sizes,
                                    device="cpu", threads=args.threads, rounds=args.rounds,
                                    clock=args.clock)}
    if args.onnx:
        results["onnxruntime"] = _bench_onnx(model, baseline, size, args)
    print(f"model {model_path}" + (f" against {base_path}" if base_path else ""))
    for name, result in results.items():
        print(f"\n{name}: {result.table()}")
    if args.out:
        path = Path(args.out) / "bench.json"
        atomic_write_json(path, {"model": str(model_path),
                                 "baseline": str(base_path) if base_path else None,
                                 **{k: v.to_dict() for k, v in results.items()}})
        print(f"\nbench  {path}")
    return 0


def _bench_onnx(model, baseline, size, args):
    import tempfile

    from .deploy import export, load_onnx_session
    from .speed import benchmark

    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, m in enumerate((model, baseline)):
            if m is None:
                sessions.append(None)
                continue
            path = export(m, Path(tmp) / f"m{i}.onnx", size, format="onnx")
            sessions.append(load_onnx_session(path, threads=args.threads))
        result = benchmark(sessions[0], size, baseline=sessions[1],
                           batch_sizes=args.batch_sizes, device="cpu", rounds=args.rounds,
                           clock=args.clock)
    result.extra["threads_note"] = "onnxruntime intra-op threads: " + (
        str(args.threads) if args.threads else "its default")
    return result


def _export(args) -> int:
    import torch

    from .deploy import export

    models = _Models(args)
    if args.model_file:
        source = Path(args.model_file)
    else:
        source = models.stage_file(("finetune", "prune", "pretrain"))
    model = models.load(source, user_file=bool(args.model_file))
    size = models.input_size()
    if args.path:
        path = Path(args.path)
    elif args.out:
        path = Path(args.out) / "export" / (source.stem + SUFFIXES[args.format])
    else:
        path = source.with_suffix(SUFFIXES[args.format])
    path.parent.mkdir(parents=True, exist_ok=True)
    export(model, path, size, format=args.format)
    print(f"export {source} -> {path} ({args.format}, input (batch, {', '.join(map(str, size))}))")
    if args.format == "onnx":
        try:
            from .deploy import load_onnx_session

            session = load_onnx_session(path)
        except ImportError:
            print("(onnxruntime is not installed: the file is not checked)")
            return 0
        x = torch.randn(3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        difference = float((got - expected).abs().max())
        scale = float(expected.abs().max())
        print(f"onnxruntime: max |difference| {difference:.3g} at output scale {scale:.3g} "
              f"(batch 3)")
    return 0
