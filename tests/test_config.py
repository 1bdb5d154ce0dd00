"""Method configs validate on construction and name the bad value."""

import pytest

from dit_sparse import RadialConfig, make_config


def test_make_config_applies_overrides():
    config = make_config("radial", dense_steps=12, dense_layers=1, block_size=64)
    assert isinstance(config, RadialConfig)
    assert (config.dense_steps, config.dense_layers, config.block_size) == (12, 1, 64)
    assert make_config(config, decay_factor=0.5).decay_factor == 0.5
    assert config.options()["block_size"] == 64


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("sparse-magic", {}, r"unknown method 'sparse-magic'.*'radial'"),
        ("random", {"density": 0.0}, r"density must be in \(0, 1\], got 0.0"),
        ("random", {"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
        ("radial", {"dense_steps": -1}, r"dense_steps must be an int >= 0, got -1"),
        ("radial", {"dense_layers": 1.5}, r"dense_layers must be an int >= 0, got 1.5"),
        ("radial", {"block_size": 100}, r"block_size must be a power of two >= 16, got 100"),
        ("radial", {"variant": "flux"}, r"variant must be one of \('wan', 'hunyuan'\), got 'flux'"),
        ("radial", {"backend": "cuda"}, r"backend must be one of .*got 'cuda'"),
        ("radial", {"densty": 0.5}, r"unknown option\(s\) \['densty'\] for method 'radial'"),
    ],
)
def test_bad_options_raise_value_error_naming_the_value(method, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(method, **options)


def test_method_must_be_name_or_config():
    with pytest.raises(TypeError, match="MethodConfig"):
        make_config(3)
