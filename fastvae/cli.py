"""The `fastvae` command line. Each subcommand is one small function; `main` dispatches.

Bad arguments give a one-line error and exit status 2 (argparse's convention); errors
the library raises on bad input (files, shapes, values) give one line and status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import torch


def cmd_info(args) -> int:
    from . import __version__, ops

    print(f"fastvae {__version__}")
    print(f"backend: {ops.backend()} (CUDA kernels built: {ops.cuda_kernels_built()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; GPU available: {torch.cuda.is_available()})")
    from .bench import machine_description

    print(machine_description())
    print(f"python {platform.python_version()}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    print("fastvae bench: fused ops vs eager PyTorch (forward+backward) and the latent forward vs Tensor.normal_, "
          "float32")
    print(bench.machine_description())
    print(bench.format_rows(bench.run(budget_per_case=args.seconds)))
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv minus `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def cmd_train(args) -> int:
    from . import distributed
    from .config import TrainConfig
    from .train import train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return distributed.launch(args.nproc, _without_option(args.argv, "--nproc"))

    config = config_from_args(args, TrainConfig)
    if args.hidden is not None:
        config.arch_config = {**config.arch_config, "hidden": args.hidden}
    try:
        trainer, _ = train(config, resume=args.resume)
    except BaseException:
        distributed.shutdown(wait_for_peers=False)
        raise
    epoch, out_dir = trainer.epoch, trainer.out_dir
    del trainer  # its DDP reducer holds gloo work objects: they must go before the process group
    distributed.shutdown()
    print(f"trained to epoch {epoch}; checkpoint, metrics.csv and PNGs in {out_dir}")
    return 0


def _binarizer(train_config: dict, seed: int):
    """Binarize evaluation data as the run's training data was."""
    from . import data as data_lib
    from .config import TrainConfig

    mode = TrainConfig.from_dict(train_config).binarize_mode
    generator = torch.Generator().manual_seed(seed)
    return lambda x: data_lib.binarize(x, mode, generator=generator)


def cmd_eval(args) -> int:
    from tqdm.auto import tqdm

    from . import data as data_lib
    from .evaluate import evaluate
    from .checkpoint import load_model

    model, state = load_model(args.checkpoint)
    dataset = data_lib.load_dataset(args.data or state["train_config"]["data"], args.split)
    images = dataset.images[: args.limit] if args.limit else dataset.images
    labels = dataset.labels[: len(images)] if dataset.labels is not None else None
    torch.manual_seed(args.seed)
    results = evaluate(model, images, labels, dataset.num_classes, batch_size=args.batch_size,
                       is_samples=args.is_samples, binarize=_binarizer(state["train_config"], args.seed),
                       generator=torch.Generator().manual_seed(args.seed),
                       progress=lambda batches: tqdm(batches, desc="eval", unit="batch", file=sys.stderr))
    print(json.dumps({"data": dataset.name, "split": args.split, "is_samples": args.is_samples, **results}, indent=2))
    return 0


def _condition_vector(text: str | None, model):
    from . import data as data_lib

    if text is None:
        if model.condition_dim:
            raise ValueError(f"this model is conditional: pass --condition (a class in 0..{model.condition_dim - 1} "
                             f"or {model.condition_dim} comma-separated attribute values)")
        return None
    if not model.condition_dim:
        raise ValueError("--condition given but this model is not conditional")
    values = [float(v) for v in text.split(",")]
    if len(values) == 1:
        label = int(values[0])
        if not 0 <= label < model.condition_dim:
            raise ValueError(f"--condition must be a class in 0..{model.condition_dim - 1}, got {text}")
        return data_lib.one_hot(torch.tensor(label), model.condition_dim)
    if len(values) != model.condition_dim:
        raise ValueError(f"--condition needs 1 class or {model.condition_dim} attribute values, got {len(values)}")
    return torch.tensor(values)


def cmd_sample(args) -> int:
    from . import images
    from .checkpoint import load_model
    from .images import image_scale

    model, _ = load_model(args.checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    if args.per_class:
        if not model.condition_dim:
            raise ValueError("--per-class needs a conditional model")
        samples = model.sample_per_class(args.per_class, generator=generator)
        path = images.save_image_grid(samples, args.out, nrow=args.per_class, scale=image_scale(model.input_shape))
        print(f"wrote {args.per_class} samples of each of {model.condition_dim} classes (one row each) to {path}")
        return 0
    condition = _condition_vector(args.condition, model)
    batch_condition = None if condition is None else condition.expand(args.num, -1)
    samples = model.sample(args.num, batch_condition, generator=generator)
    path = images.save_image_grid(samples, args.out, scale=image_scale(model.input_shape))
    print(f"wrote {args.num} samples to {path}")
    return 0


def cmd_reconstruct(args) -> int:
    from . import data as data_lib
    from . import images
    from .checkpoint import load_model
    from .images import image_scale

    model, state = load_model(args.checkpoint)
    dataset = data_lib.load_dataset(args.data or state["train_config"]["data"], args.split)
    x = dataset.images[: args.num]
    condition = data_lib.one_hot(dataset.labels[: args.num], model.condition_dim) if model.condition_dim else None
    path = images.save_reconstruction_grid(x, model.reconstruct(x, condition), args.out,
                                           scale=image_scale(model.input_shape))
    print(f"wrote {len(x)} inputs and their reconstructions to {path}")
    return 0


def cmd_list(args) -> int:
    from . import likelihoods, objectives, registry

    print("\n\n".join([registry.format_table(), likelihoods.format_table(), objectives.format_table()]))
    return 0


def add_config_options(parser, config_class) -> None:
    """One option per field of a configuration dataclass, with its help, choices and default."""
    parsers = {"json": _json_object}
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs = {"dest": f.name, "default": None if default == {} else default, "help": meta.get("help", "")}
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            parse = meta.get("parse")
            kwargs["type"] = parsers.get(parse, parse) or (type(default) if default is not None else str)
            choices = meta.get("choices")
            if choices is not None:  # argparse then shows {a,b,c} in the usage and the help
                kwargs["choices"] = choices() if callable(choices) else choices
            else:
                kwargs["metavar"] = flag[2:].replace("-", "_").upper()
        parser.add_argument(flag, **kwargs)


def config_from_args(args, config_class):
    """The configuration the parsed options describe (options left out keep the dataclass defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in values.items() if v is not None})


def add_train_parser(sub) -> None:
    from .config import TrainConfig

    p = sub.add_parser("train", help="train a VAE (default: the embedded 8x8 digits, under a minute)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_options(p, TrainConfig)
    p.add_argument("--hidden", type=_int_list, default=None,
                   help="hidden widths for mlp, e.g. 200,200 (sets arch_config's hidden)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (runs this command under torchrun)")
    p.set_defaults(func=cmd_train)


def add_model_parsers(sub) -> None:
    p = sub.add_parser("eval", help="test-set ELBO and importance-sampled log-likelihood of a checkpoint")
    p.add_argument("checkpoint", type=Path, help="checkpoint file or run folder")
    p.add_argument("--data", default=None, help="data source (default: the one the model was trained on)")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--is-samples", type=int, default=0, help="importance samples for log p(x) (5000 for papers)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="PNG grid of samples from the prior")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--condition", default=None, help="class index (e.g. 7) or comma-separated attribute vector")
    p.add_argument("--per-class", type=int, default=0, metavar="N",
                   help="conditional models: N samples of every class, one row per class")
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reconstruct", help="PNG of test inputs beside their reconstructions")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", default=None)
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("reconstructions.png"))
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("list", help="registered architectures, likelihoods and objectives, plugins included")
    p.set_defaults(func=cmd_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae", description="Variational autoencoders on fused C++/CUDA ops.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_model_parsers(sub)

    info = sub.add_parser("info", help="version, active backend and build configuration")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="time the fused ops against eager PyTorch on this machine (< 1 minute)")
    bench.add_argument("--seconds", type=float, default=1.5, help="time budget per case (default 1.5)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `fastvae list | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except (ValueError, TypeError, LookupError, FileNotFoundError, RuntimeError) as exc:
        print(f"fastvae {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
