"""Method configs validate on construction and name the bad value."""

import dataclasses
import importlib
import pkgutil

import pytest
import torch

import dit_sparse
from dit_sparse import RadialConfig, VideoLayout, make_config, patterns
from dit_sparse.config import DynamicConfig, MethodConfig
from dit_sparse.patterns import RandomBlocksConfig, ReorderConfig, radial, random_blocks, reorder_cluster
from dit_sparse.patterns.reorder import axis_order
from dit_sparse.patterns.vdit import resolve_tile


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
        ("radial", {"variant": "flux"}, r"variant must be one of \('wan', 'hunyuan', 'wan-2025-06'\), got 'flux'"),
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


def test_every_pattern_modules_config_is_registered_once_under_its_method_name():
    """A config class defined in a pattern module but missing from the registry (or sharing a method name) is caught."""
    defined = set()
    for info in pkgutil.iter_modules(patterns.__path__):
        module = importlib.import_module(f"{patterns.__name__}.{info.name}")
        defined |= {cls for cls in vars(module).values() if isinstance(cls, type) and issubclass(cls, MethodConfig)
                    and cls.__module__ == module.__name__}
    assert defined == set(patterns.PATTERNS)
    assert {name: cls for name, cls in patterns.CONFIGS.items()} == {cls.method: cls for cls in defined}
    assert len(patterns.CONFIGS) == len(defined)
    assert all(entry.depends_on in ("layout", "layer", "qk") for entry in patterns.PATTERNS.values())
    assert dit_sparse.CONFIGS is patterns.CONFIGS and dit_sparse.make_config is patterns.make_config


def test_a_subclass_of_a_registered_config_is_built_as_its_base():
    @dataclasses.dataclass(frozen=True)
    class TunedRadial(RadialConfig):
        pass

    layout = VideoLayout(6, 4, 8)
    config = make_config(TunedRadial(block_size=16), decay_factor=0.5)
    assert type(config) is TunedRadial and patterns.is_static(config)
    expected = radial(layout, block_size=16, decay_factor=0.5)  # the pattern function itself
    assert torch.equal(patterns.build_mask(layout, config).to_block_dense(), expected.to_block_dense())


@pytest.mark.parametrize("config", [MethodConfig(), DynamicConfig()])
def test_a_config_of_no_registered_pattern_is_refused_by_name(config):
    message = rf"{type(config).__name__} is not a registered pattern config; allowed: \['DenseConfig', "
    with pytest.raises(TypeError, match=message):
        make_config(config)
    with pytest.raises(TypeError, match=message):
        patterns.build_mask(VideoLayout(2, 4, 8), config)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda layout: radial(layout, variant="flux"), r"^variant must be one of \('wan', 'hunyuan', 'wan-2025-06'\), got 'flux'$"),
        (lambda layout: random_blocks(layout, density=0), r"^density must be in \(0, 1\], got 0$"),
        (lambda layout: random_blocks(layout, density="half"), r"^density must be in \(0, 1\], got 'half'$"),
        (lambda layout: axis_order(layout, "fxy"), r"^axes must be one of \('fhw', .*\), got 'fxy'$"),
        (lambda layout: reorder_cluster(layout, torch.zeros(1, 1, 64, 8), torch.zeros(1, 1, 64, 8), block_size=16,
                                        kmeans_iters=0), r"^kmeans_iters must be an int >= 1, got 0$"),
        (lambda layout: resolve_tile(16, (1, 4)), r"^vdit.tile must be three positive ints \(frames, rows, columns\)"),
        (lambda layout: RandomBlocksConfig(density=0), r"^RandomBlocksConfig.density must be in \(0, 1\], got 0$"),
        (lambda layout: ReorderConfig(strategy="kmeans"), r"^ReorderConfig.strategy must be one of \('axes', "),
    ],
)
def test_pattern_functions_and_configs_share_the_validators_naming_argument_or_field(call, message):
    with pytest.raises(ValueError, match=message):
        call(VideoLayout(2, 4, 8))
