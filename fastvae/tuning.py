"""Defaults that win on the CPU at hand: which optional fast paths the built-in mlp model takes.

Three paths of the mlp architecture compute the same numbers as the plain layers (up to the
order of float additions) and are faster on some CPUs and slower on others (measured: both
the sparse first layer and the fused head cost time on an Intel Xeon with AMX, where oneDNN's
dense GEMMs are fast; both pay on AMD EPYC):
    sparse_input  the encoder's first layer from the input's nonzeros (fastvae.sparse_input_linear)
    fused_head    the decoder's output layer folded into the likelihood op
    fused_mlp     each Linear/activation stack as one op (fastvae.nn.FusedMLP)
A VAE built with both networks "mlp" (fastvae.VAE, `fastvae train`) takes each path that its
config leaves unset only where it measured faster than going without it, for that model's
shape on this CPU: a short calibration (a few tenths of a second) times the model's training
step, forward and backward, on a batch of 100, with and without each path in turn, the
variants interleaved, and keeps a path when its median step is at least MARGIN faster. The
results are cached per CPU model, instruction-set level, torch version, thread count and
shape in $XDG_CACHE_HOME/fastvae/tuning.json (~/.cache when unset), so a machine decides once
and a resumed run takes the same paths as before.

Environment variables:
    FASTVAE_SPARSE_INPUT, FASTVAE_FUSED_HEAD, FASTVAE_FUSED_MLP = 1 or 0: force that path on
        or off, for every model (an explicit config value still wins).
    FASTVAE_TUNING = calibrate (default) or rules: rules skips the calibration and uses
        RULES (on unless the CPU has AMX; fused_mlp off), as the mlp modules built on their
        own always do.
`fastvae info` prints the choices and what made them.
"""

from __future__ import annotations

import contextlib
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
MODES = ("calibrate", "rules")
# A path is taken when the step without it is this much slower (a median ratio): timing noise
# below it must not flip a default.
MARGIN = 1.03
CALIBRATION_BATCH = 100
WARMUP_STEPS = 3
TIMED_STEPS = 12


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
# The order of the calibration: each path is tried on top of the ones already kept.
ORDER = ("sparse_input", "fused_head", "fused_mlp")
ENCODER_KEYS = ("sparse_input", "fused_mlp")
DECODER_KEYS = ("fused_head", "fused_mlp")


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
    raw = os.environ.get(MODE_ENV, "").strip().lower() or "calibrate"
    if raw not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {raw!r}")
    return raw


def cpu_has_amx() -> bool:
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
    """Median seconds of each step, the steps interleaved (noise then hits every variant alike)."""
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(TIMED_STEPS):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
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


def calibrate(shape: MLPShape, measure: Callable[[dict], dict] | None = None) -> dict:
    """{choice: {"value", "ratio"}}: each path in ORDER tried on top of those already kept,
    ratio = the step without it / the step with it. `measure` maps {variant: choices} to
    {variant: seconds} (step_seconds of training steps by default; tests pass their own)."""
    if measure is None:
        def measure(variants):
            return step_seconds({name: _training_step(shape, c) for name, c in variants.items()})
    kept = {name: False for name in ORDER}
    results = {}
    for name in ORDER:
        seconds = measure({"without": dict(kept), "with": {**kept, name: True}})
        ratio = seconds["without"] / seconds["with"]
        kept[name] = ratio >= MARGIN
        results[name] = {"value": kept[name], "ratio": round(ratio, 4)}
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


def mlp_defaults(shape: MLPShape, explicit: set[str] = frozenset()) -> dict[str, Decision]:
    """The decision for each choice of a VAE with mlp networks; `explicit`: the choices its
    configs set (their values are the caller's, so nothing is calibrated for them alone)."""
    decisions = {name: rule(name) for name in CHOICES}
    open_choices = [n for n in CHOICES if n not in explicit and forced(n) is None]
    if not open_choices or mode() == "rules":
        return decisions
    key = f"{machine_key()} | {shape.key()}"
    entry = _memory.get(key) or _read_cache().get(key)
    if not _valid_entry(entry):
        entry = {"shape": shape.describe(), "choices": calibrate(shape)}
        _write_cache(key, entry)
    _memory[key] = entry
    for name in open_choices:
        result = entry["choices"][name]
        decisions[name] = Decision(bool(result["value"]),
                                   f"calibrated: the step {result['ratio']:.2f}x as fast with it ({entry['shape']})")
    return decisions


def _valid_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("choices"), dict)
            and all(isinstance(entry["choices"].get(n), dict) and "value" in entry["choices"][n]
                    and "ratio" in entry["choices"][n] for n in ORDER))


def fill_mlp_configs(shape: MLPShape, encoder_config: dict | None, decoder_config: dict | None) -> tuple[dict, dict]:
    """The encoder and decoder configs with the choices they leave unset decided (mlp_defaults)."""
    encoder_config, decoder_config = dict(encoder_config or {}), dict(decoder_config or {})
    if _rules_only:
        return encoder_config, decoder_config  # the mlp modules apply the rules themselves
    explicit = {k for k in ENCODER_KEYS if k in encoder_config} | {k for k in DECODER_KEYS if k in decoder_config}
    decisions = mlp_defaults(shape, explicit)
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
