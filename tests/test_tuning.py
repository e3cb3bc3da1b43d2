"""The defaults chosen per CPU (fastvae/tuning.py): environment variables force each fast path,
the calibration keeps a path only where it measured faster, its results are cached per machine
and shape, explicit configs win, and `fastvae info` says what was chosen.

The calibration's timings are replaced by given numbers (no timing in tests); one test runs the
real calibration on a tiny model to check that it builds and times the variants it names.
"""

import json

import pytest

from fastvae import VAE, tuning
from fastvae.cli import main

SHAPE = tuning.mlp_shape((12,), 3, "bernoulli", 0, {"hidden": [8]}, {"hidden": [8]})


@pytest.fixture
def calibrating(tmp_path, monkeypatch):
    """Calibration on (tests/conftest.py turns it off), a private cache, no choice forced."""
    monkeypatch.setenv("FASTVAE_TUNING", "calibrate")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for choice in tuning.CHOICES.values():
        monkeypatch.delenv(choice.env, raising=False)
    monkeypatch.setattr(tuning, "_memory", {})
    return tmp_path


def fake_timings(monkeypatch, speedups, calls=None):
    """Every variant's step takes 1 s divided by the speed-up of each path it takes."""
    def measure(variants):
        if calls is not None:
            calls.append(variants)
        seconds = {}
        for name, choices in variants.items():
            t = 1.0
            for choice, on in choices.items():
                if on:
                    t /= speedups[choice]
            seconds[name] = t
        return seconds

    real = tuning.calibrate
    monkeypatch.setattr(tuning, "calibrate", lambda shape, fixed: real(shape, fixed, measure))


def build(**configs):
    return VAE((12,), 3, "mlp", encoder_config={"hidden": [8], **configs.get("enc", {})},
               decoder_config={"hidden": [8], **configs.get("dec", {})})


def test_the_fastest_combination_is_taken(calibrating, monkeypatch):
    fake_timings(monkeypatch, {"sparse_input": 0.8, "fused_head": 1.2, "fused_mlp": 0.99})
    model = build()
    assert not model.encoder.sparse_input  # slower
    assert model.decoder.fused_head        # 1.2x
    assert not model.decoder.fused_mlp and not model.encoder.fused_mlp


def test_the_plain_paths_stay_unless_the_gain_passes_the_margin(calibrating, monkeypatch):
    fake_timings(monkeypatch, {"sparse_input": 1.01, "fused_head": 1.01, "fused_mlp": 1.0})  # 1.02x together
    model = build()
    assert not model.encoder.sparse_input and not model.decoder.fused_head


def test_the_fused_stack_replaces_the_sparse_first_layer_when_it_wins(calibrating, monkeypatch):
    fake_timings(monkeypatch, {"sparse_input": 1.5, "fused_head": 1.5, "fused_mlp": 1.6})
    model = build()
    assert model.encoder.fused_mlp and not model.encoder.sparse_input and model.decoder.fused_head


def test_every_combination_is_timed_once(calibrating):
    calls = []
    results = tuning.calibrate(SHAPE, {}, lambda variants: calls.append(variants) or dict.fromkeys(variants, 1.0))
    (variants,) = calls
    assert len(variants) == 6 and not any(c["sparse_input"] and c["fused_mlp"] for c in variants.values())
    assert all(not r["value"] and r["ratio"] == 1.0 for r in results.values())  # a tie keeps the plain paths


def test_forced_and_given_choices_are_fixed_in_the_calibration(calibrating, monkeypatch):
    calls = []
    fake_timings(monkeypatch, {"sparse_input": 2.0, "fused_head": 2.0, "fused_mlp": 3.0}, calls)
    monkeypatch.setenv("FASTVAE_FUSED_MLP", "0")
    model = build(dec={"fused_head": False})
    (variants,) = calls
    assert all(not c["fused_mlp"] and not c["fused_head"] for c in variants.values())
    assert model.encoder.sparse_input and not model.decoder.fused_head and not model.encoder.fused_mlp


def test_results_are_cached_per_machine_and_shape(calibrating, monkeypatch):
    calls = []
    fake_timings(monkeypatch, {"sparse_input": 2.0, "fused_head": 2.0, "fused_mlp": 0.5}, calls)
    build()
    assert len(calls) == 1
    monkeypatch.setattr(tuning, "_memory", {})  # a new process: only the file remains
    build()
    assert len(calls) == 1
    (entry,) = json.loads((calibrating / "fastvae" / "tuning.json").read_text()).values()
    assert entry["choices"]["sparse_input"] == {"value": True, "ratio": 2.0}
    VAE((12,), 3, "mlp", encoder_config={"hidden": [9]}, decoder_config={"hidden": [8]})  # another shape
    assert len(calls) == 2


def test_a_damaged_cache_is_calibrated_again(calibrating, monkeypatch):
    (calibrating / "fastvae").mkdir()
    (calibrating / "fastvae" / "tuning.json").write_text("{not json")
    calls = []
    fake_timings(monkeypatch, {"sparse_input": 2.0, "fused_head": 2.0, "fused_mlp": 0.5}, calls)
    assert build().encoder.sparse_input and len(calls) == 1


@pytest.mark.parametrize("env, value", [("1", True), ("0", False)])
def test_environment_variables_force_each_path(calibrating, monkeypatch, env, value):
    fake_timings(monkeypatch, {"sparse_input": 2.0, "fused_head": 0.5, "fused_mlp": 0.5})
    monkeypatch.setenv("FASTVAE_FUSED_HEAD", env)
    assert build().decoder.fused_head is value
    monkeypatch.setenv("FASTVAE_SPARSE_INPUT", env)
    assert build().encoder.sparse_input is value


def test_explicit_configs_win(calibrating, monkeypatch):
    fake_timings(monkeypatch, {"sparse_input": 2.0, "fused_head": 2.0, "fused_mlp": 0.5})
    monkeypatch.setenv("FASTVAE_FUSED_HEAD", "1")
    model = build(enc={"sparse_input": False}, dec={"fused_head": False})
    assert not model.encoder.sparse_input and not model.decoder.fused_head
    assert model.config["encoder_config"] == {"hidden": [8], "sparse_input": False}  # the user's config, as given


def test_bad_environment_values_name_the_variable(calibrating, monkeypatch):
    monkeypatch.setenv("FASTVAE_SPARSE_INPUT", "yes")
    with pytest.raises(ValueError, match="FASTVAE_SPARSE_INPUT must be 0 or 1, got 'yes'"):
        build()
    monkeypatch.delenv("FASTVAE_SPARSE_INPUT")
    monkeypatch.setenv("FASTVAE_TUNING", "fast")
    with pytest.raises(ValueError, match="FASTVAE_TUNING must be one of rules, calibrate, got 'fast'"):
        build()


@pytest.mark.parametrize("amx", [True, False])
def test_rules_without_a_calibration(calibrating, monkeypatch, amx):
    monkeypatch.setenv("FASTVAE_TUNING", "rules")
    monkeypatch.setattr(tuning, "cpu_has_amx", lambda: amx)
    model = build()
    assert model.encoder.sparse_input is not amx and model.decoder.fused_head is not amx
    assert not model.decoder.fused_mlp
    assert not (calibrating / "fastvae").exists()  # nothing timed, nothing cached


def test_the_rules_are_the_default(calibrating, monkeypatch):
    monkeypatch.delenv("FASTVAE_TUNING")
    assert tuning.mode() == "rules"
    model = build()
    assert model.encoder.sparse_input == tuning.rule("sparse_input").value
    assert not (calibrating / "fastvae").exists()


def test_modules_built_on_their_own_take_the_rules(calibrating, monkeypatch):
    from fastvae.models.architectures.mlp import MLPDecoder

    monkeypatch.setattr(tuning, "cpu_has_amx", lambda: True)
    assert not MLPDecoder((12,), 3, hidden=[8]).fused_head
    assert not (calibrating / "fastvae").exists()


def test_the_real_calibration_times_a_training_step(calibrating):
    results = tuning.calibrate(SHAPE)
    assert set(results) == set(tuning.ORDER)
    assert all(isinstance(r["value"], bool) and r["ratio"] > 0 for r in results.values())
    assert {name: r["value"] for name, r in results.items()} in tuning.CONFIGS  # a combination a model can take


def test_info_says_what_was_chosen_and_why(calibrating, monkeypatch, capsys):
    fake_timings(monkeypatch, {"sparse_input": 2.0, "fused_head": 0.5, "fused_mlp": 0.5})
    monkeypatch.setenv("FASTVAE_FUSED_MLP", "0")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "sparse_input  on   calibrated: the step 2.00x as fast with it (mlp 784-200-200-50" in out
    assert "fused_head    off  calibrated: the step 0.50x" in out
    assert "fused_mlp     off  FASTVAE_FUSED_MLP=0" in out


def test_models_built_for_another_device_take_the_rules(calibrating):
    # The trainer builds a model for a GPU (or for torchrun's processes) under rules_only.
    with tuning.rules_only():
        model = build()
    assert model.decoder.fused_head == tuning.rule("fused_head").value
    assert not (calibrating / "fastvae").exists()
