"""The architecture registry: registration, lookup errors, listing, and entry-point plugins."""

import shutil
import sys

import pytest
import torch
from torch import nn

from plugin_helpers import install, install_toy_plugin

from fastvae.models import plugins, registry
from fastvae.models.registry import (
    Decoder,
    DuplicateArchitectureError,
    Encoder,
    UnknownArchitectureError,
    build_decoder,
    build_encoder,
    register_decoder,
    register_encoder,
)


@pytest.fixture(autouse=True)
def scratch(scratch_registries):
    """Every test here runs on copies of the registries (see conftest.py)."""


def make_pair(name: str, **options):
    """Register a trivial encoder/decoder pair under name; returns the classes."""

    @register_encoder(name, **options)
    class PairEncoder(Encoder):
        """A test encoder.

        More text that the listing must not show.
        """

        def forward(self, x, condition=None):
            return x.flatten(1)[:, : self.latent_dim], x.flatten(1)[:, : self.latent_dim]

    @register_decoder(name, **options)
    class PairDecoder(Decoder):
        def forward(self, z, condition=None):
            return self.to_output(z.new_zeros(len(z), self.params_per_element * self.output_numel))

    return PairEncoder, PairDecoder


# ------------------------------------------------------------------ registration and lookup
def test_builtins_are_registered_for_both_kinds():
    for kind in ("encoder", "decoder"):
        names = {info.name for info in registry.available(kind)}
        assert {"mlp", "conv", "resnet"} <= names
        assert all(info.kind == kind for info in registry.available(kind))
    assert {info.source for info in registry.available() if info.name in ("mlp", "conv", "resnet")} == {"builtin"}


def test_unknown_name_lists_known_names_and_suggests_the_closest():
    with pytest.raises(UnknownArchitectureError, match="did you mean 'mlp'") as caught:
        build_encoder("mpl", input_shape=(4,), latent_dim=2)
    assert "conv" in str(caught.value) and "resnet" in str(caught.value)
    with pytest.raises(LookupError, match="unknown decoder 'zzz'. Known decoders:"):
        build_decoder("zzz", output_shape=(4,), latent_dim=2)


def test_a_miss_is_reported_by_the_shared_table_lookup_as_for_likelihoods():
    with pytest.raises(plugins.UnknownNameError) as caught:
        build_encoder("mpl", input_shape=(4,), latent_dim=2)
    assert caught.traceback[-1].path.name == "plugins.py"  # raised by PluginTable.get, not a copy of it
    with pytest.raises(plugins.UnknownNameError) as direct:
        registry.ENCODERS.get("mpl")
    assert str(caught.value) == str(direct.value)
    with pytest.raises(ValueError, match="kind must be one of"):
        registry.unregister("prior", "mlp")


def test_the_old_error_names_are_the_shared_classes():
    import fastvae.registry as old_name  # the flat layout's module name, as plugins import it

    assert UnknownArchitectureError is old_name.UnknownArchitectureError is plugins.UnknownNameError
    assert DuplicateArchitectureError is old_name.DuplicateArchitectureError is plugins.DuplicateNameError
    assert issubclass(UnknownArchitectureError, LookupError)  # what `except` clauses caught before
    assert isinstance(registry.ENCODERS, plugins.PluginTable) and isinstance(registry.DECODERS, plugins.PluginTable)


def test_registering_a_taken_name_is_an_error_unless_override():
    make_pair("twice")
    with pytest.raises(DuplicateArchitectureError, match="encoder 'twice' is already registered.*override=True"):

        @register_encoder("twice")
        class Other(Encoder):
            pass

    replacement, _ = make_pair("mlp", override=True, description="replaced mlp")
    assert isinstance(build_encoder("mlp", input_shape=(4,), latent_dim=2), replacement)
    assert [i.description for i in registry.available("encoder") if i.name == "mlp"] == ["replaced mlp"]


def test_only_encoder_and_decoder_subclasses_register():
    with pytest.raises(TypeError, match="subclass of fastvae.models.registry.Encoder"):
        register_encoder("plain")(nn.Linear)
    with pytest.raises(TypeError, match="subclass of fastvae.models.registry.Decoder"):
        register_decoder("swapped")(make_pair("pair")[0])
    with pytest.raises(ValueError, match="non-empty string"):
        register_encoder("")


def test_unexpected_config_names_the_architecture_and_its_parameters():
    with pytest.raises(TypeError, match=r"encoder 'mlp': .*'widths'.*accepts .*hidden"):
        build_encoder("mlp", input_shape=(4,), latent_dim=2, widths=(3,))


def test_unregister_forgets_a_name():
    make_pair("gone")
    registry.unregister("encoder", "gone")
    with pytest.raises(UnknownArchitectureError):
        build_encoder("gone", input_shape=(4,), latent_dim=2)
    build_decoder("gone", output_shape=(4,), latent_dim=2)


def test_available_describes_config_and_source():
    make_pair("described")
    info = {i.kind: i for i in registry.available() if i.name == "described"}
    assert info["encoder"].description == "A test encoder."
    assert info["decoder"].description == ""
    assert info["encoder"].config == {"input_shape": "required", "latent_dim": "required", "condition_dim": 0}
    assert info["decoder"].config["likelihood"] == "bernoulli"
    assert info["encoder"].source == __name__
    mlp = next(i for i in registry.available("encoder") if i.name == "mlp")
    assert mlp.config["hidden"] == (500,) and mlp.config["activation"] == "tanh"


def test_format_table_lists_every_architecture_with_its_config():
    table = registry.format_table()
    for name in ("mlp", "conv", "resnet"):
        assert name in table
    assert "hidden=(500,)" in table and "channels=(32, 64)" in table
    assert "input_shape" not in table  # shared arguments are not repeated per row


# ------------------------------------------------------------------ plugins
def test_a_third_party_distribution_registers_through_its_entry_point(site):
    install_toy_plugin(site)
    registry.reload_plugins()
    encoder = build_encoder("toy_mlp", input_shape=(1, 8, 8), latent_dim=3, scale=0.5)
    decoder = build_decoder("toy_mlp", output_shape=(1, 8, 8), latent_dim=3, likelihood="gaussian_learned")
    mu, logvar = encoder(torch.rand(5, 1, 8, 8))
    mean, out_logvar = decoder(mu)
    assert mu.shape == logvar.shape == (5, 3) and mean.shape == out_logvar.shape == (5, 1, 8, 8)
    infos = [i for i in registry.available() if i.name == "toy_mlp"]
    assert [(i.kind, i.source) for i in infos] == [("encoder", "fastvae-toy-plugin"), ("decoder", "fastvae-toy-plugin")]
    assert "fastvae-toy-plugin" in registry.format_table()


def test_reload_plugins_forgets_uninstalled_plugins_and_reloads_installed_ones(site):
    install_toy_plugin(site)
    registry.reload_plugins()
    registry.reload_plugins()  # the module is imported already: its registrations must come back
    assert "toy_mlp" in {i.name for i in registry.available("encoder")}
    shutil.rmtree(site / "fastvae_toy_plugin-0.1.dist-info")
    registry.reload_plugins()
    with pytest.raises(UnknownArchitectureError):
        build_encoder("toy_mlp", input_shape=(4,), latent_dim=2)


def test_an_entry_point_may_be_a_registering_callable(site):
    source = (
        "from fastvae.models.registry import Encoder, register_encoder\n"
        "def register():\n"
        "    @register_encoder('called')\n"
        "    class Called(Encoder):\n"
        "        'Registered by a callable.'\n"
    )
    install(site, "fastvae-callable-plugin", {"called": "callable_plugin:register"}, {"callable_plugin.py": source})
    registry.reload_plugins()
    [info] = [i for i in registry.available() if i.name == "called"]
    assert (info.kind, info.source) == ("encoder", "fastvae-callable-plugin")
    assert info.description == "Registered by a callable."


def test_one_entry_point_loads_once_for_the_encoder_and_decoder_tables(site):
    source = (
        "import run_log\n"
        "from fastvae.registry import Decoder, Encoder, register_decoder, register_encoder\n"
        "run_log.runs.append(__name__)\n"
        "@register_encoder('both')\n"
        "class BothEncoder(Encoder):\n"
        "    pass\n"
        "@register_decoder('both')\n"
        "class BothDecoder(Decoder):\n"
        "    pass\n"
    )
    modules = {"both_plugin.py": source, "run_log.py": "runs = []\n"}
    install(site, "fastvae-both-plugin", {"both": "both_plugin"}, modules)
    registry.reload_plugins()
    assert sys.modules["run_log"].runs == ["both_plugin"]  # not once per table
    assert registry.ENCODERS.group is registry.DECODERS.group
    assert [(i.kind, i.source) for i in registry.available() if i.name == "both"] == \
        [("encoder", "fastvae-both-plugin"), ("decoder", "fastvae-both-plugin")]


def test_an_entry_point_naming_neither_module_nor_callable_is_skipped_with_a_warning(site):
    install(site, "fastvae-value-plugin", {"value": "value_plugin:VALUE"}, {"value_plugin.py": "VALUE = 3\n"})
    with pytest.warns(RuntimeWarning, match="'value'.*TypeError: entry point names int, not a module or a callable"):
        registry.reload_plugins()
    assert "value" not in registry.ENCODERS.names()


def test_plugins_are_discovered_lazily_on_first_lookup(site, monkeypatch):
    install_toy_plugin(site)
    monkeypatch.setattr(registry.ARCHITECTURES, "loaded", False)
    assert "fastvae_toy_plugin.architecture" not in sys.modules
    build_encoder("toy_mlp", input_shape=(4,), latent_dim=2)


def test_a_broken_plugin_warns_once_and_everything_else_works(site):
    install(site, "fastvae-broken-plugin", {"broken": "broken_plugin"},
            {"broken_plugin.py": "raise ImportError('needs a library that is not installed')"})
    install_toy_plugin(site)
    with pytest.warns(RuntimeWarning, match="'broken'.*fastvae-broken-plugin.*ImportError: needs a library") as caught:
        registry.reload_plugins()
    assert len(caught) == 1
    build_encoder("mlp", input_shape=(4,), latent_dim=2)
    build_encoder("toy_mlp", input_shape=(4,), latent_dim=2)


def test_a_plugin_cannot_silently_replace_a_builtin(site):
    source = (
        "from fastvae.models.registry import Encoder, register_encoder\n"
        "@register_encoder('mlp')\n"
        "class Impostor(Encoder):\n"
        "    pass\n"
    )
    install(site, "fastvae-impostor", {"impostor": "impostor_plugin"}, {"impostor_plugin.py": source})
    clash = r"DuplicateNameError: encoder 'mlp' is already registered by builtin \(MLPEncoder\)"
    with pytest.warns(RuntimeWarning, match="fastvae-impostor.*" + clash):
        registry.reload_plugins()
    assert next(i for i in registry.available("encoder") if i.name == "mlp").source == "builtin"
