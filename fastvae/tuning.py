"""Defaults that win on the CPU at hand: which optional fast paths the built-in mlp model takes.

Three paths of the mlp architecture compute the same numbers as the plain layers (up to the
order of float additions) and are faster on some CPUs and slower on others (measured: both
the sparse first layer and the fused head cost time on an Intel Xeon with AMX, where oneDNN's
dense GEMMs are fast; both pay on AMD EPYC):
    sparse_input  the encoder's first layer from the input's nonzeros (fastvae.sparse_input_linear)
    fused_head    the decoder's output layer folded into the likelihood op
    fused_mlp     each Linear/activation stack as one op (fastvae.nn.FusedMLP)
By default (FASTVAE_TUNING=rules) each path a config leaves unset follows RULES: the sparse
first layer and the fused head on unless the CPU has AMX, the fused stack off. Measured on AMD
EPYC (AVX2), 2 threads, the user-loop step (benchmarks/user_loop.py), first in separate runs per
combination: the rules' paths 1.18-1.24x the plain PyTorch VAE, all three off 1.13x, the fused
stack alone 1.13-1.18x; then all combinations in one interleaved run (--paths, sixteen runs):
the fused stack alone ahead of the rules' paths by 7% on average, with the fused head as well
by 3%. The rules keep the fused head because it keeps the IWAE step's (k B, pixels) logits out
of the saved tensors (benchmarks/README.md). On the Intel Xeon with AMX the sparse layer and
the head each cost time.

FASTVAE_TUNING=calibrate instead decides per model shape on this CPU: a short calibration
(about a second) times the model's training step, forward and backward, on a batch of 100, in
every combination of the paths, interleaved, and takes the fastest where it beats the one with
the paths off by at least MARGIN. The results are cached per CPU model, instruction-set level,
torch version, thread count and shape in $XDG_CACHE_HOME/fastvae/tuning.json (~/.cache when
unset), so a machine decides once and a resumed run takes the same paths as before. It is not
the default: on the AVX2 machine above, the differences between the combinations (a few percent)
are within what a one-second calibration can tell apart, and it chose the fused stack alone
where the longer interleaved runs put the rules' paths ahead.

Environment variables:
    FASTVAE_SPARSE_INPUT, FASTVAE_FUSED_HEAD, FASTVAE_FUSED_MLP = 1 or 0: force that path on
        or off, for every model (an explicit config value still wins).
    FASTVAE_TUNING = rules (default) or calibrate.
`fastvae info` prints the choices and what made them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

MODE_ENV = "FASTVAE_TUNING"
MODES = ("rules", "calibrate")
# The fastest combination is taken only where the plain one (the open paths off) is this much
# slower (a ratio of medians): timing noise below it must not turn a path on.
MARGIN = 1.03
CALIBRATION_BATCH = 100
WARMUP_STEPS = 3
ROUNDS = 10          # interleaved rounds; each variant's time is its median round
STEPS_PER_ROUND = 3


@dataclass(frozen=True)
class Choice:
    name: str         # the mlp config key
    env: str          # the environment variable that forces it
    description: str


CHOICES: dict[str, Choice] = {c.name: c for c in (
    Choice("sparse_input", "FASTVAE_SPARSE_INPUT", "encoder's first layer from the input's nonzeros"),
    Choice("fused_head", "FASTVAE_FUSED_HEAD", "decoder's output layer inside the likelihood op"),
    Choice("fused_mlp", "FASTVAE_FUSED_MLP", "each Linear/activation stack as one op (FusedMLP)"),
)}
ORDER = ("sparse_input", "fused_head", "fused_mlp")
# Every combination a model can take (the fused stack computes its first layer dense).
CONFIGS = tuple({"sparse_input": sparse, "fused_head": head, "fused_mlp": fused}
                for fused in (False, True) for sparse in ((False,) if fused else (False, True))
                for head in (False, True))


@dataclass(frozen=True)
class Decision:
    value: bool
    source: str  # what decided it, for `fastvae info` and error messages

    def describe(self) -> str:
        return f"{'on ' if self.value else 'off'}  {self.source}"


# ----------------------------------------------------------------------------- environment
def forced(name: str) -> bool | None:
    """The value the choice's environment variable forces, None where it is unset or empty."""
    env = CHOICES[name].env
    raw = os.environ.get(env, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{env} must be 0 or 1, got {raw!r}")
    return None if raw == "" else raw == "1"


def mode() -> str:
    raw = os.environ.get(MODE_ENV, "").strip().lower() or "rules"
    if raw not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {raw!r}")
    return raw


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:  # read once: every mlp module built asks
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_tile" in line.split() for line in f)
    except OSError:
        return False


def rule(name: str) -> Decision:
    """The default without a calibration: the paths on, except where the CPU has AMX (there the
    dense GEMMs beat both the sparse first layer and the fused head: measured on an Intel Xeon,
    Sapphire Rapids class); the fused stack off (it gains little where GEMMs dominate and gives
    up the sparse first layer)."""
    forced_value = forced(name)
    if forced_value is not None:
        return Decision(forced_value, f"{CHOICES[name].env}={int(forced_value)}")
    if name == "fused_mlp":
        return Decision(False, "rule: off unless calibrated")
    if cpu_has_amx():
        return Decision(False, "rule: off on CPUs with AMX")
    return Decision(True, "rule: on on CPUs without AMX")


# ----------------------------------------------------------------------------- cache
def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fastvae" / "tuning.json"


_memory: dict[str, dict] = {}
_warned_unwritable = False


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, entry: dict) -> None:
    global _warned_unwritable
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        # A whole new file renamed into place: processes calibrating at once never read half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        if not _warned_unwritable:
            _warned_unwritable = True
            warnings.warn(f"fastvae: cannot cache the calibrated defaults in {path} ({exc}); "
                          "each process calibrates again", RuntimeWarning, stacklevel=3)


def machine_key() -> str:
    from .bench import cpu_model, kernel_cpu_level

    return f"{cpu_model()} | {kernel_cpu_level()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class MLPShape:
    """What a calibration depends on besides the machine."""
    input_shape: tuple[int, ...]
    latent_dim: int
    likelihood: str
    condition_dim: int
    encoder_config: tuple   # sorted (key, value) pairs, the choices left out
    decoder_config: tuple

    def key(self) -> str:
        return json.dumps([list(self.input_shape), self.latent_dim, self.likelihood, self.condition_dim,
                           [list(p) for p in self.encoder_config], [list(p) for p in self.decoder_config]],
                          default=str)

    def describe(self) -> str:
        enc = dict(self.encoder_config)
        width = lambda cfg: "-".join(str(w) for w in cfg.get("hidden", (500,)))  # noqa: E731
        return (f"mlp {'x'.join(map(str, self.input_shape))}-{width(enc)}-{self.latent_dim}, "
                f"{self.likelihood}, batch {CALIBRATION_BATCH}")


def _plain(config: dict | None) -> tuple:
    items = {k: tuple(v) if isinstance(v, list) else v for k, v in (config or {}).items() if k not in CHOICES}
    return tuple(sorted(items.items()))


def mlp_shape(input_shape, latent_dim, likelihood, condition_dim, encoder_config, decoder_config) -> MLPShape:
    return MLPShape(tuple(input_shape), latent_dim, likelihood, condition_dim, _plain(encoder_config),
                    _plain(decoder_config))


def step_seconds(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Median seconds per step of each variant, the variants taking turns round by round (a change
    in the machine's speed then hits every variant alike)."""
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(STEPS_PER_ROUND):
                step()
            times[name].append((time.perf_counter() - start) / STEPS_PER_ROUND)
    return {name: statistics.median(t) for name, t in times.items()}


def _training_step(shape: MLPShape, choices: dict[str, bool]) -> Callable[[], None]:
    from .models.vae import VAE

    encoder_config = dict(shape.encoder_config)
    decoder_config = dict(shape.decoder_config)
    encoder_config.update(sparse_input=choices["sparse_input"] and not choices["fused_mlp"],
                          fused_mlp=choices["fused_mlp"])
    decoder_config.update(fused_head=choices["fused_head"], fused_mlp=choices["fused_mlp"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VAE(shape.input_shape, shape.latent_dim, "mlp", "mlp", shape.likelihood,
                    encoder_config=encoder_config, decoder_config=decoder_config, condition_dim=shape.condition_dim)
        # Binarized digits have about 13% ones; other data is dense.
        x = torch.rand(CALIBRATION_BATCH, *shape.input_shape)
        if shape.likelihood == "bernoulli":
            x = (x < 0.13).float()
        condition = torch.zeros(CALIBRATION_BATCH, shape.condition_dim) if shape.condition_dim else None
    noise = torch.Generator().manual_seed(0)

    def step():
        model.zero_grad(set_to_none=True)
        model(x, condition, generator=noise).loss.backward()

    return step


def config_name(choices: dict) -> str:
    return "+".join(name for name in ORDER if choices[name]) or "dense"


def calibrate(shape: MLPShape, fixed: dict[str, bool] | None = None,
              measure: Callable[[dict], dict] | None = None) -> dict:
    """{choice: {"value", "ratio"}} for the choices not in `fixed`: every combination of CONFIGS
    that agrees with `fixed` timed, interleaved; the fastest is taken if it beats the one with all
    the open paths off by MARGIN, else that one. ratio: the fastest step without the path / the
    fastest with it. `measure` maps {name: choices} to {name: seconds} (step_seconds of training
    steps by default; tests pass their own)."""
    fixed = fixed or {}
    if measure is None:
        def measure(variants):
            return step_seconds({name: _training_step(shape, c) for name, c in variants.items()})
    configs = [c for c in CONFIGS if all(c[k] == v for k, v in fixed.items())]
    if not configs:  # sparse_input and fused_mlp both fixed on: the modules refuse it
        return {}
    seconds = measure({config_name(c): c for c in configs})
    time_of = lambda c: seconds[config_name(c)]  # noqa: E731
    plain = min(configs, key=lambda c: sum(c.values()))
    best = min(configs, key=time_of)
    if time_of(plain) < MARGIN * time_of(best):
        best = plain
    results = {}
    for name in ORDER:
        if name in fixed:
            continue
        with_it = [time_of(c) for c in configs if c[name]]
        without = [time_of(c) for c in configs if not c[name]]
        # No ratio where the fixed choices leave the path one way only (the sparse first layer
        # beside a fused stack).
        ratio = round(min(without) / min(with_it), 4) if with_it and without else None
        results[name] = {"value": best[name], "ratio": ratio}
    return results


_rules_only = False


@contextlib.contextmanager
def rules_only():
    """Models built inside take the rules, not a CPU calibration (a model trained on a GPU)."""
    global _rules_only
    before, _rules_only = _rules_only, True
    try:
        yield
    finally:
        _rules_only = before


def mlp_defaults(shape: MLPShape, given: dict[str, bool] | None = None) -> dict[str, Decision]:
    """The decision for each choice of a VAE with mlp networks. given: the choices its configs
    set; those and the forced ones (environment) are fixed, the calibration picks the rest."""
    decisions = {name: rule(name) for name in CHOICES}
    fixed = {n: value for n in CHOICES if (value := forced(n)) is not None}
    fixed.update(given or {})
    open_choices = [n for n in CHOICES if n not in fixed]
    if not open_choices or mode() == "rules":
        return decisions
    key = f"{machine_key()} | {shape.key()}" + (f" | fixed {json.dumps(fixed, sort_keys=True)}" if fixed else "")
    entry = _memory.get(key) or _read_cache().get(key)
    if not _valid_entry(entry, open_choices):
        entry = {"shape": shape.describe(), "choices": calibrate(shape, fixed)}
        _write_cache(key, entry)
    _memory[key] = entry
    for name in open_choices:
        result = entry["choices"][name]
        how = "off with the fixed choices" if result["ratio"] is None else \
            f"the step {result['ratio']:.2f}x as fast with it"
        decisions[name] = Decision(bool(result["value"]), f"calibrated: {how} ({entry['shape']})")
    return decisions


def _valid_entry(entry, names) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("choices"), dict)
            and all(isinstance(entry["choices"].get(n), dict) and "value" in entry["choices"][n]
                    and "ratio" in entry["choices"][n] for n in names))


def fill_mlp_configs(shape: MLPShape, encoder_config: dict | None, decoder_config: dict | None) -> tuple[dict, dict]:
    """The encoder and decoder configs with the choices they leave unset decided (mlp_defaults)."""
    encoder_config, decoder_config = dict(encoder_config or {}), dict(decoder_config or {})
    if _rules_only:
        return encoder_config, decoder_config  # the mlp modules apply the rules themselves
    given = {k: v for k, v in (("sparse_input", encoder_config.get("sparse_input")),
                               ("fused_head", decoder_config.get("fused_head"))) if isinstance(v, bool)}
    fused_given = {cfg["fused_mlp"] for cfg in (encoder_config, decoder_config) if isinstance(cfg.get("fused_mlp"), bool)}
    if len(fused_given) == 1:
        given["fused_mlp"] = fused_given.pop()
    decisions = mlp_defaults(shape, given)
    fused = {"encoder": encoder_config.get("fused_mlp", decisions["fused_mlp"].value),
             "decoder": decoder_config.get("fused_mlp", decisions["fused_mlp"].value)}
    encoder_config.setdefault("fused_mlp", fused["encoder"])
    if not fused["encoder"]:  # the fused stack computes its first layer dense
        encoder_config.setdefault("sparse_input", decisions["sparse_input"].value)
    decoder_config.setdefault("fused_mlp", fused["decoder"])
    decoder_config.setdefault("fused_head", decisions["fused_head"].value)
    return encoder_config, decoder_config


def describe(shape: MLPShape) -> list[str]:
    """`fastvae info`'s lines: each choice for `shape`, and what decided it."""
    decisions = mlp_defaults(shape)
    lines = [f"defaults ({MODE_ENV}={mode()}; cache {cache_path()}):"]
    for name, decision in decisions.items():
        lines.append(f"  {name:13s} {decision.describe()}  [{CHOICES[name].env}]")
    return lines
