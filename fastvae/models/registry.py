"""Named, pluggable encoder/decoder architectures.

An architecture is a pair of classes, an Encoder and a Decoder subclass, registered
under the same name with the decorators below. The VAE builds them by name, so a new
architecture needs no change to fastvae: define the classes, decorate them, and either
import the module yourself or ship it as a distribution that declares an entry point in
the ENTRY_POINT_GROUP group. Encoders and decoders are two PluginTables (fastvae/models/
plugins.py, as likelihoods and objectives are) sharing that group: one entry point registers
both. Plugins are discovered lazily, on the first lookup or listing, so importing fastvae
stays cheap and a broken plugin cannot break the import.

Stochastic layers above the first (fastvae.models.hierarchy.HierarchicalVAE, `fastvae train
--stochastic-layers N`): each q(z_i+1 | z_i) and p(z_i | z_i+1) is a Gaussian layer between flat
vectors, built from a registered *encoder*, since an Encoder's contract is exactly that of such a
layer: build_encoder(name, input_shape=(D_in,), latent_dim=D_out, condition_dim=C, **layer_config)
maps (N, D_in) (and the condition) to (mu, logvar), each (N, D_out). An architecture provides these
layers by registering an encoder that accepts input_shape=(D,) and is named as the model's
layer_architecture (--layer-architecture; default "mlp", whose hidden widths --upper-hidden sets;
from the command line layer_config is {"hidden": [...]}, so such an encoder takes `hidden`). Its
encoder and decoder for x stay the first layer's (q(z1|x), p(x|z1)). An encoder that cannot take
flat vectors (conv, resnet) fails at build time, naming the layer and the architecture.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import UserError
from . import likelihoods, objectives, priors
from .plugins import BUILTIN  # noqa: F401  (registry.BUILTIN, the source of fastvae's own architectures)
from .plugins import DuplicateNameError, PluginGroup, PluginTable, UnknownNameError, column_lines

ENTRY_POINT_GROUP = "fastvae.architectures"
KINDS = ("encoder", "decoder")
# Constructor arguments every architecture shares; the listing shows only the others.
_CONTRACT_PARAMS = {"input_shape", "output_shape", "latent_dim", "condition_dim", "likelihood"}

# The names architecture code has always caught; the same classes as every table's.
UnknownArchitectureError = UnknownNameError
DuplicateArchitectureError = DuplicateNameError


def _check_shape(arg: str, shape) -> tuple[int, ...]:
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"{arg} must be a tuple of positive ints, got {shape!r}") from None
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{arg} must be a non-empty tuple of positive ints, got {shape!r}")
    return shape


def _check_dims(latent_dim, condition_dim) -> None:
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
    if isinstance(condition_dim, bool) or not isinstance(condition_dim, int) or condition_dim < 0:
        raise ValueError(f"condition_dim must be an int >= 0, got {condition_dim!r}")


def _check_condition(who: str, condition: Tensor | None, batch: int, condition_dim: int) -> None:
    if condition_dim == 0:
        if condition is not None:
            raise ValueError(f"{who} has condition_dim=0 but a condition was given")
        return
    if condition is None or tuple(condition.shape) != (batch, condition_dim):
        got = None if condition is None else tuple(condition.shape)
        raise ValueError(f"{who} expects a condition of shape ({batch}, {condition_dim}), got {got}")


class Encoder(nn.Module):
    """Base class of encoders: x (B, *input_shape) -> (mu, logvar), each (B, latent_dim).

    Subclasses call super().__init__(input_shape, latent_dim, condition_dim), which
    validates the shared arguments, and start forward with self.check_input(x, condition)
    so a wrong shape fails with a clear message instead of deep inside a layer.
    """

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, condition_dim: int = 0):
        super().__init__()
        self.input_shape = _check_shape("input_shape", input_shape)
        _check_dims(latent_dim, condition_dim)
        self.latent_dim = latent_dim
        self.condition_dim = condition_dim

    def check_input(self, x: Tensor, condition: Tensor | None) -> None:
        who = type(self).__name__
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{who} expects x of shape (batch, *{self.input_shape}), got {tuple(x.shape)}")
        _check_condition(who, condition, x.shape[0], self.condition_dim)


class Decoder(nn.Module):
    """Base class of decoders: z (N, latent_dim) -> parameters of p(x|z) over output_shape.

    The likelihood's declaration (fastvae/models/likelihoods.py) names the parameters: one gives a
    tensor ("bernoulli" logits, "gaussian" means), several a tuple ("gaussian_learned"
    (mean, logvar)), each (N, *output_shape). Subclasses produce self.params_per_element
    values per output element, parameter-major (e.g. (N, params_per_element * C, H, W)), and
    finish with self.to_output(raw), so the likelihood handling lives here once.

    Fused head (optional): a decoder whose last layer is an nn.Linear may expose
    `hidden(z, condition) -> h` (N, H), the input of that layer, and `output_layer`, the layer,
    such that forward(z, condition) == self.to_output(self.output_layer(self.hidden(z, condition))).
    When the likelihood declares a fused head (Likelihood.fused_head: every built-in one does),
    the VAE then computes log p(x|z) from h with the fused head op (Likelihood.fused_head_log_prob),
    never holding the (L, B, P) logits or their gradient. Setting
    `fused_head = False` on the decoder turns that off; see fused_output_layer.
    """

    fused_head = True

    def __init__(
        self,
        output_shape: tuple[int, ...],
        latent_dim: int,
        condition_dim: int = 0,
        likelihood: str = "bernoulli",
    ):
        super().__init__()
        self.output_shape = _check_shape("output_shape", output_shape)
        _check_dims(latent_dim, condition_dim)
        spec = likelihoods.get(likelihood)
        self.latent_dim = latent_dim
        self.condition_dim = condition_dim
        self.likelihood = likelihood
        self.params_per_element = spec.params_per_element

    @property
    def output_numel(self) -> int:
        return math.prod(self.output_shape)

    def check_input(self, z: Tensor, condition: Tensor | None) -> None:
        who = type(self).__name__
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{who} expects z of shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        _check_condition(who, condition, z.shape[0], self.condition_dim)

    def to_output(self, raw: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        params = raw.reshape(raw.shape[0], self.params_per_element, *self.output_shape)
        if self.params_per_element > 1:
            return params.unbind(1)
        return params[:, 0]


def fused_output_layer(decoder: nn.Module) -> nn.Linear | None:
    """The decoder's output layer when it takes the fused head (Decoder's "Fused head"), else None.

    Any module qualifies, a Decoder subclass or not: a method `hidden`, an nn.Linear
    `output_layer`, and `fused_head` not set to False. Everything else goes through its forward.
    A submodule named `hidden` (say an nn.Sequential) does not count: that name is too common
    for a layer whose output forward may still transform.
    """
    layer = getattr(decoder, "output_layer", None)
    hidden = getattr(decoder, "hidden", None)
    if not getattr(decoder, "fused_head", True) or not callable(hidden) or isinstance(hidden, nn.Module):
        return None
    return layer if isinstance(layer, nn.Linear) else None


@dataclass(frozen=True)
class ArchitectureInfo:
    kind: str           # "encoder" or "decoder"
    name: str
    description: str    # one line
    config: dict        # constructor parameter -> default, or "required"
    source: str         # "builtin", the plugin's distribution name, or the registering module


@dataclass(frozen=True)
class _Architecture:
    """What the tables hold: a class under its name, with the one line the listing shows."""

    name: str
    cls: type
    description: str


ARCHITECTURES = PluginGroup(ENTRY_POINT_GROUP, "architecture", builtin_module="fastvae.models.architectures")
# item_type None: the decorators below check the classes and build the entries.
_TABLES = {kind: PluginTable(kind, ARCHITECTURES, None, code_of=lambda entry: entry.cls) for kind in KINDS}
ENCODERS, DECODERS = _TABLES["encoder"], _TABLES["decoder"]
_BASES = {"encoder": Encoder, "decoder": Decoder}


def _table(kind: str) -> PluginTable[_Architecture]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return _TABLES[kind]


def _register(kind: str, name: str, description: str | None, override: bool):
    def decorator(cls):
        base = _BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"register_{kind}({name!r}) needs a subclass of fastvae.models.registry.{base.__name__}, "
                            f"got {cls!r}")
        doc = (cls.__doc__ or "").strip().splitlines()  # its own docstring, not a base class's
        _TABLES[kind].register(_Architecture(name, cls, description or (doc[0] if doc else "")), override=override)
        return cls

    if not isinstance(name, str) or not name:
        raise ValueError(f"an architecture name must be a non-empty string, got {name!r}")
    return decorator


def register_encoder(name: str, *, description: str | None = None, override: bool = False):
    """Class decorator: make an Encoder subclass buildable as build_encoder(name, ...)."""
    return _register("encoder", name, description, override)


def register_decoder(name: str, *, description: str | None = None, override: bool = False):
    """Class decorator: make a Decoder subclass buildable as build_decoder(name, ...)."""
    return _register("decoder", name, description, override)


def unregister(kind: str, name: str) -> None:
    """Forget a registration (tests and interactive sessions); unknown names raise."""
    _table(kind).unregister(name)


def reload_plugins() -> None:
    """Forget what plugins registered and scan the entry points again (after an install, in tests):
    architectures, likelihoods, objectives and priors."""
    ARCHITECTURES.reload()
    likelihoods.reload_plugins()
    objectives.reload_plugins()
    priors.reload_plugins()


# ----------------------------------------------------------------------------- lookup
class ArchitectureConfigError(UserError, TypeError):
    """An architecture configuration (arch_config, --hidden) names a keyword the architecture does not take."""


def _build(kind: str, name: str, config: dict) -> nn.Module:
    cls = _table(kind).get(name).cls
    signature = inspect.signature(cls)
    try:
        signature.bind(**config)
    except TypeError as exc:  # name the architecture and what it accepts, not just "__init__()"
        raise ArchitectureConfigError(f"{kind} {name!r}: {exc}; it accepts {', '.join(signature.parameters)}") \
            from None
    return cls(**config)


def build_encoder(name: str, **config) -> Encoder:
    """Instantiate the encoder registered as name with keyword configuration config."""
    return _build("encoder", name, config)


def build_decoder(name: str, **config) -> Decoder:
    """Instantiate the decoder registered as name with keyword configuration config."""
    return _build("decoder", name, config)


def _config_of(cls: type) -> dict:
    return {
        param.name: "required" if param.default is param.empty else param.default
        for param in inspect.signature(cls).parameters.values()
        if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
    }


def available(kind: str | None = None) -> list[ArchitectureInfo]:
    """Every registered architecture of kind (or of both kinds), plugins included, sorted by name."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    infos = [
        ArchitectureInfo(k, entry.item.name, entry.item.description, _config_of(entry.item.cls), entry.source)
        for k in KINDS
        if kind in (None, k)
        for entry in _TABLES[k].entries()
    ]
    return sorted(infos, key=lambda info: (info.name, KINDS.index(info.kind)))


def format_table() -> str:
    """The listing `fastvae list` prints: one row per architecture, its own config below it."""
    infos = available()
    header = ("NAME", "KIND", "SOURCE", "DESCRIPTION")
    rows = column_lines([header] + [(i.name, i.kind, i.source, i.description) for i in infos])
    indent = " " * (len(rows[0]) - len("DESCRIPTION"))  # the config lines start under the descriptions
    lines = rows[:1]
    for row, info in zip(rows[1:], infos):
        config = {k: v for k, v in info.config.items() if k not in _CONTRACT_PARAMS}
        lines += [row, indent + ", ".join(f"{k}={v!r}" for k, v in config.items())] if config else [row]
    return "\n".join(lines)
