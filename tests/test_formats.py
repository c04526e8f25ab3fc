"""Every checkpoint format implements one typed protocol, and reads a bad quantization_config as a
CheckpointError naming the key, never as a TypeError or a traceback."""
import inspect

import pytest

from llmquant.formats import FORMATS, CheckpointFormat


def _parameters(function):
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_implements_the_protocol_with_its_signatures(name):
    fmt = FORMATS[name]
    assert isinstance(fmt, CheckpointFormat) and fmt.name == name
    for method in ("reads", "check_config", "grid_min_zero", "check_layer", "pack", "quantization_config",
                   "build_linear"):
        assert _parameters(getattr(fmt, method)) == _parameters(getattr(CheckpointFormat, method)), method
    assert all(isinstance(b, int) for b in fmt.bits) and fmt.marker_suffix in fmt.tensor_suffixes
