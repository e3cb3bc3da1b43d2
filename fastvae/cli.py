"""The `fastvae` command line. Each subcommand is one small function; `main` dispatches.

Bad arguments give a one-line error and exit status 2 (argparse's convention): each count, size,
limit and index declares its range (fastvae.ranges) where it is declared, so it is checked when the
line is parsed and --help shows it. Errors users cause while a command runs (a value that does not fit
the model, data or machine, a file, a folder: UserError, ValueError, OSError) give one line and
status 1; `train`'s own options are TrainConfig's, checked by TrainConfig before any work, so they
are among these. Any other exception is a bug and keeps its traceback.
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

from .errors import UserError
from .ranges import SEED, CommaSeparated, Range, declared_check


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's allowed values where they are declared and its default, except where
    there is none to show (None, or an off switch): "number of samples, an integer >= 1 (default: 64)"."""

    def _get_help_string(self, action):
        check = declared_check(action.type)
        help = action.help if check is None else f"{action.help}, {check.describe()}"
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            return help
        return f"{help} (default: %(default)s)"


def cmd_info(args) -> int:
    from . import __version__, ops

    print(f"fastvae {__version__}")
    print(f"backend: {ops.backend()} (CUDA kernels built: {ops.cuda_kernels_built()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; GPU available: {torch.cuda.is_available()})")
    from .bench import machine_description

    print(machine_description())
    print(f"python {platform.python_version()}")
    # The fast paths fastvae.VAE takes by default here, for the MNIST model of the README.
    from . import tuning

    hidden = {"hidden": (200, 200)}
    for line in tuning.describe(tuning.mlp_shape((784,), 50, "bernoulli", 0, hidden, hidden)):
        print(line)
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


def typed_options(args, *dests: str) -> set[str]:
    """Which of `dests` the user typed on the command line (as opposed to left at their default)."""
    unset = object()
    namespace = argparse.Namespace(**dict.fromkeys(dests, unset))
    args.command_parser.parse_known_args(args.argv[1:], namespace)
    return {dest for dest in dests if getattr(namespace, dest) is not unset}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def cmd_train(args) -> int:
    from .training.config import ConfigError

    try:
        return _cmd_train(args)
    except ConfigError as exc:  # a TrainConfig check names the field; here the user typed its flag
        raise UserError(f"{train_flags()[exc.field_name]} {exc.detail}") from None


def _cmd_train(args) -> int:
    from .training import distributed, runlock
    from .training.config import TrainConfig

    config = config_from_args(args, TrainConfig)
    if args.hidden is not None:
        config.arch_config = {**config.arch_config, "hidden": args.hidden}
    config.validate()  # before a launch, so that a bad value is reported once, not by every process
    typed = explicit_train_options(args.argv)
    if "WORLD_SIZE" in os.environ and "nproc" in typed:
        raise UserError(f"--nproc does not apply under torchrun, which already started "
                        f"{os.environ['WORLD_SIZE']} processes: drop --nproc, or run `fastvae train --nproc N` "
                        "without torchrun")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        runlock.check_free(config.out_dir)  # refuse at once; the run's rank 0 then holds the lock
        return distributed.launch(args.nproc, _without_option(args.argv, "--nproc"))
    if args.resume:
        _check_resume_flags(config, typed)
    elif config.stochastic_layers > 1 and config.objective == "analytic" and os.environ.get("RANK", "0") == "0":
        print(f"stochastic layers {config.stochastic_layers}: the analytic objective's KL is analytic for the "
              "top layer only, Monte Carlo below it (docs/hierarchy.md)", file=sys.stderr)
    if not args.resume and config.prior == "vamp" and config.warmup_epochs == 0 and os.environ.get("RANK", "0") == "0":
        print("prior vamp without --warmup: measured on binarized MNIST, the posterior collapsed onto the prior "
              "within the first epoch (KL near 0, no recovery in 12 epochs); --warmup 100 trains (docs/priors.md)",
              file=sys.stderr)
    with distributed.process_group(config.device):
        epoch, out_dir = _train(config, args.resume, typed & set(train_flags()))
    print(f"trained to epoch {epoch}; checkpoint, metrics.csv and PNGs in {out_dir}")
    return 0


def train_flags() -> dict[str, str]:
    """TrainConfig's field names -> their `fastvae train` flags."""
    from .training.config import TrainConfig, flag

    return {f.name: flag(f) for f in dataclasses.fields(TrainConfig)}


def _train(config, resume: bool, chosen: set[str]):
    """Train and return (epoch, out_dir): the trainer, and with it the DDP model, is freed on return,
    before the process group is left."""
    from .training.trainer import train

    trainer, _ = train(config, resume=resume, chosen=chosen)
    return trainer.epoch, trainer.out_dir


def explicit_train_options(argv: list[str]) -> set[str]:
    """The destinations of the `fastvae train` options the user typed (defaults left out)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_train_options(parser, defaults=False)
    return set(vars(parser.parse_known_args(argv[1:])[0]))


def _check_resume_flags(config, explicit: set[str]) -> None:
    """Refuse a --resume whose flags contradict the run's checkpoint; say what applies."""
    from .training.trainer import RESUMABLE_FIELDS, resume_conflicts, resumed_config

    run = resumed_config(config)
    flags = train_flags()
    differ = [f"{flags[name]} {getattr(config, name)} (the run has {getattr(run, name)})"
              for name in resume_conflicts(config, run, explicit & set(flags))]
    if "hidden" in explicit and config.arch_config.get("hidden") != run.arch_config.get("hidden"):
        differ.append(f"--hidden {config.arch_config.get('hidden')} (the run has {run.arch_config.get('hidden')})")
    if differ:
        allowed = ", ".join(flags[name] for name in RESUMABLE_FIELDS if name != "out_dir")
        raise ValueError(f"--resume continues the run in {config.out_dir} as it was trained, but these flags "
                         f"differ from its checkpoint: {'; '.join(differ)}. Drop them (only {allowed} may change "
                         "on resume), or start a new run with another --out")
    changed = [f"{flags[name]} {getattr(config, name)}" for name in RESUMABLE_FIELDS
               if name in explicit and name != "out_dir"]
    if changed and os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
        print(f"resuming {config.out_dir} with {', '.join(changed)}", file=sys.stderr)


def _binarizer(model, train_config: dict | None, seed: int):
    """Binarize evaluation data as the run's training data was (a model without its training
    configuration: as `fastvae train` would for its likelihood)."""
    from .io import data as data_lib
    from .training.config import TrainConfig

    mode = TrainConfig.from_dict({"likelihood": model.likelihood, **(train_config or {})}).binarize_mode
    generator = torch.Generator().manual_seed(seed)
    return lambda x: data_lib.binarize(x, mode, generator=generator)


def cmd_eval(args) -> int:
    from tqdm.auto import tqdm

    from .io import data as data_lib
    from .training.evaluate import evaluate
    from .io.export import load_any

    model, train_config = load_any(args.model)
    dataset = _dataset(args, train_config)
    images = dataset.images[: args.limit] if args.limit is not None else dataset.images
    labels = dataset.labels[: len(images)] if dataset.labels is not None else None
    torch.manual_seed(args.seed)
    results = evaluate(model, images, labels, dataset.num_classes, batch_size=args.batch_size,
                       is_samples=args.is_samples, binarize=_binarizer(model, train_config, args.seed),
                       generator=torch.Generator().manual_seed(args.seed),
                       progress=lambda batches: tqdm(batches, desc="eval", unit="batch", file=sys.stderr))
    print(json.dumps({"data": dataset.name, "split": args.split, "is_samples": args.is_samples, **results}, indent=2))
    return 0


def _dataset(args, train_config: dict | None):
    """--data, else the data set the model was trained on."""
    from .io import data as data_lib

    source = args.data or (train_config or {}).get("data")
    if source is None:
        raise ValueError(f"{args.model} does not record its training data: pass --data")
    return data_lib.load_dataset(source, args.split)


def _condition(text: str) -> int | list[float]:
    """--condition: a class index (an integer), or an attribute vector (comma-separated numbers)."""
    parts = text.split(",")
    try:
        return int(text) if len(parts) == 1 else [float(v) for v in parts]
    except ValueError:
        expected = "a class index is an integer, e.g. 7" if len(parts) == 1 else "attribute values are numbers"
        raise argparse.ArgumentTypeError(f"{expected}; got {text!r}") from None


def _condition_vector(condition: int | list[float] | None, model):
    from .io import data as data_lib

    if condition is None:
        if model.condition_dim:
            raise ValueError(f"this model is conditional: pass --condition (a class in 0..{model.condition_dim - 1} "
                             f"or {model.condition_dim} comma-separated attribute values)")
        return None
    if not model.condition_dim:
        raise ValueError("--condition given but this model is not conditional")
    if isinstance(condition, int):
        if not 0 <= condition < model.condition_dim:
            raise ValueError(f"--condition must be a class in 0..{model.condition_dim - 1}, got {condition}")
        return data_lib.one_hot(torch.tensor(condition), model.condition_dim)
    if len(condition) != model.condition_dim:
        raise ValueError(f"--condition needs 1 class or {model.condition_dim} attribute values, got {len(condition)}")
    return torch.tensor(condition)


def cmd_sample(args) -> int:
    from .io import images
    from .io.export import load_any
    from .io.images import image_scale

    model, _ = load_any(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    if args.per_class:
        if not model.condition_dim:
            raise ValueError("--per-class needs a conditional model")
        ignored = [f"--{dest}" for dest in ("num", "condition") if dest in typed_options(args, "num", "condition")]
        if ignored:
            raise UserError(f"{' and '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply with "
                            f"--per-class, which draws {args.per_class} samples of every class: drop one or the other")
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
    from .io import data as data_lib
    from .io import images
    from .io.export import load_any
    from .io.images import image_scale

    model, train_config = load_any(args.model)
    dataset = _dataset(args, train_config)
    x = dataset.images[: args.num]
    condition = data_lib.one_hot(dataset.labels[: args.num], model.condition_dim) if model.condition_dim else None
    path = images.save_reconstruction_grid(x, model.reconstruct(x, condition), args.out,
                                           scale=image_scale(model.input_shape))
    print(f"wrote {len(x)} inputs and their reconstructions to {path}")
    return 0


def cmd_interpolate(args) -> int:
    from .io.export import load_any
    from .io.images import save_interpolation_grid

    model, train_config = load_any(args.model)
    dataset = _dataset(args, train_config)
    if len(dataset) < 2:
        raise ValueError(f"{dataset.name} has {len(dataset)} images; interpolation needs 2")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[: 2 * args.pairs]
    labels = dataset.labels[order] if dataset.labels is not None else None
    path = save_interpolation_grid(model, dataset.images[order], args.out, steps=args.steps, labels=labels)
    print(f"wrote {len(order) // 2} interpolations of {args.steps} steps (one row each) to {path}")
    return 0


def cmd_traverse(args) -> int:
    from .io.export import load_any
    from .io.images import save_traversal_grid

    model, train_config = load_any(args.model)
    dataset = _dataset(args, train_config)
    if not 0 <= args.index < len(dataset):
        raise ValueError(f"--index must be in 0..{len(dataset) - 1} for {dataset.name} ({args.split}), got {args.index}")
    label = dataset.labels[args.index] if dataset.labels is not None else None
    path = save_traversal_grid(model, dataset.images[args.index], args.out, steps=args.steps, span=args.span,
                               dims=args.dims, label=label)
    rows = len(args.dims) if args.dims else min(model.latent_dim, 16)
    print(f"wrote a traversal of {rows} latent dimensions (one row each, {args.steps} steps over "
          f"+-{args.span}) around image {args.index} to {path}")
    return 0


def cmd_export(args) -> int:
    from .io.export import export_run

    path = export_run(args.model, args.out)
    print(f"wrote {path / 'model.safetensors'} and {path / 'config.json'}; load with fastvae.load({str(path)!r})")
    return 0


def cmd_list(args) -> int:
    from .models import likelihoods, objectives, priors, registry

    print("\n\n".join([registry.format_table(), likelihoods.format_table(), objectives.format_table(),
                       priors.format_table()]))
    return 0


def add_config_options(parser, config_class, defaults: bool = True) -> None:
    """One option per field of a configuration dataclass, with its help, choices and default.

    defaults=False: options left out are absent from the parsed namespace (to tell what was typed).
    """
    from .training.config import flag as field_flag

    parsers = {"json": _json_object}
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        flag = field_flag(f)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs = {"dest": f.name, "default": None if default == {} else default, "help": meta.get("help", "")}
        if not defaults:
            kwargs["default"] = argparse.SUPPRESS
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            parse = meta.get("parse")
            kwargs["type"] = parsers.get(parse, parse) or (type(default) if default is not None else str)
            if meta.get("check") is not None:  # parsed here, checked by validate(); --help shows the range
                kwargs["type"] = meta["check"].parse
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
    p = sub.add_parser("train", help="train a VAE (default: the embedded 8x8 digits, under a minute)",
                       formatter_class=DefaultsHelpFormatter)
    add_train_options(p)
    p.set_defaults(func=cmd_train)


def add_train_options(p, defaults: bool = True) -> None:
    from .training.config import TrainConfig

    unset = {} if defaults else {"default": argparse.SUPPRESS}
    add_config_options(p, TrainConfig, defaults)
    p.add_argument("--hidden", type=CommaSeparated(Range(ge=1, integer=True)), **({"default": None} | unset),
                   help="hidden widths for mlp, e.g. 200,200 (sets arch_config's hidden)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint", **unset)
    p.add_argument("--nproc", type=Range(ge=1, integer=True), **({"default": 1} | unset),
                   help="data-parallel processes on this machine (runs this command under torchrun)")


MODEL_HELP = "run folder, checkpoint file, or folder written by `fastvae export`"


def _model_parser(sub, name: str, help: str):
    p = sub.add_parser(name, help=help, formatter_class=DefaultsHelpFormatter)
    p.add_argument("model", type=Path, help=MODEL_HELP)
    p.set_defaults(command_parser=p)
    return p


def _data_options(p) -> None:
    from .io.data import SPLITS

    p.add_argument("--data", default=None, help="data source (default: the one the model was trained on)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split of the data")


def add_model_parsers(sub) -> None:
    p = _model_parser(sub, "eval", "test-set ELBO and importance-sampled log-likelihood of a model")
    _data_options(p)
    p.add_argument("--is-samples", type=Range(ge=0, integer=True), default=0,
                   help="importance samples for log p(x), 5000 for papers; 0: the ELBO only")
    p.add_argument("--batch-size", type=Range(ge=1, integer=True), default=500, help="examples per batch")
    p.add_argument("--limit", type=Range(ge=1, integer=True), default=None, help="evaluate only the first N examples")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the noise and the binarization")
    p.set_defaults(func=cmd_eval)

    p = _model_parser(sub, "sample", "PNG grid of samples from the prior")
    p.add_argument("--num", type=Range(ge=1, integer=True), default=64, help="number of samples")
    p.add_argument("--condition", type=_condition, default=None,
                   help="class index (e.g. 7) or comma-separated attribute vector")
    p.add_argument("--per-class", type=Range(ge=0, integer=True), default=0, metavar="N",
                   help="conditional models: N samples of every class, one row per class; 0: off")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the prior draws")
    p.set_defaults(func=cmd_sample)

    p = _model_parser(sub, "reconstruct", "PNG of test inputs beside their reconstructions")
    _data_options(p)
    p.add_argument("--num", type=Range(ge=1, integer=True), default=32, help="number of inputs")
    p.add_argument("--out", type=Path, default=Path("reconstructions.png"), help="PNG to write")
    p.set_defaults(func=cmd_reconstruct)

    p = _model_parser(sub, "interpolate", "PNG grid: one row per pair of images, decoded along the line "
                                          "between their latent codes")
    _data_options(p)
    p.add_argument("--pairs", type=Range(ge=1, integer=True), default=8,
                   help="pairs of images (rows), drawn at random from the data")
    p.add_argument("--steps", type=Range(ge=2, integer=True), default=10, help="images per row, both ends included")
    p.add_argument("--out", type=Path, default=Path("interpolations.png"), help="PNG to write")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the choice of pairs")
    p.set_defaults(func=cmd_interpolate)

    p = _model_parser(sub, "traverse", "PNG grid: one row per latent dimension, swept around one image's code")
    _data_options(p)
    p.add_argument("--index", type=Range(ge=0, integer=True), default=0, help="which image of the data to start from")
    p.add_argument("--dims", type=CommaSeparated(Range(ge=0, integer=True)), default=None,
                   help="latent dimensions to sweep, e.g. 0,3,5; all (up to 16) when not given")
    p.add_argument("--steps", type=Range(ge=2, integer=True), default=9, help="images per row")
    p.add_argument("--span", type=Range(gt=0, finite=True), default=3.0,
                   help="sweep mu-span .. mu+span (prior standard deviations)")
    p.add_argument("--out", type=Path, default=Path("traversal.png"), help="PNG to write")
    p.set_defaults(func=cmd_traverse)

    p = _model_parser(sub, "export", "write model.safetensors and config.json to share a model (no pickle)")
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("list", help="registered architectures, likelihoods, objectives and priors, plugins included")
    p.set_defaults(func=cmd_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvae", description="Variational autoencoders on fused C++/CUDA ops.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_model_parsers(sub)

    info = sub.add_parser("info", help="version, active backend and build configuration")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="time the fused ops against eager PyTorch on this machine (< 1 minute)",
                           formatter_class=DefaultsHelpFormatter)
    bench.add_argument("--seconds", type=Range(gt=0, finite=True), default=1.5, help="time budget per case")
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
    except USER_ERRORS as exc:
        # One write with its newline: ranks of a torchrun share stderr, and print's two writes interleave.
        sys.stderr.write(f"fastvae {args.command}: error: {one_line(exc)}\n")
        sys.stderr.flush()
        return 1


# What users cause: the library's UserErrors, bad values and files, a missing optional package, a
# device out of memory. Anything else (TypeError, KeyError, a RuntimeError from inside torch) is a bug
# and keeps its traceback.
USER_ERRORS = (UserError, ValueError, OSError, ImportError, torch.cuda.OutOfMemoryError)


def one_line(exc: BaseException) -> str:
    """The error's message on one line (torch's and the OS's messages can span several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
