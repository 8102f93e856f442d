"""The one layer grammar every command accepts (--layers of neurons, eval --neurons, weights, study)."""

import pytest

from ggml_probe.errors import ProbeError
from ggml_probe.layerspec import parse_layer_spec, resolve_layers


def test_indices_negatives_and_ranges_mix():
    assert parse_layer_spec("0,3-5,-1") == [0, 3, 4, 5, -1]
    assert resolve_layers("0,3-5,-1", 30) == [0, 3, 4, 5, 29]
    assert resolve_layers(" 14 , -1 ,14", 30) == [14, 29]  # spaces and repeats
    assert resolve_layers((0, 14, -1), 30) == [0, 14, 29]
    assert resolve_layers(-2, 30) == [28]


def test_all_and_none_mean_every_layer():
    assert parse_layer_spec("all") is None and parse_layer_spec(None) is None and parse_layer_spec("") is None
    assert resolve_layers("ALL", 3) == [0, 1, 2]


@pytest.mark.parametrize("spec, message", [
    ("30", "out of range"), ("-31", "out of range"), ("1-a", "bad layer"), ("5-3", "5-3"), ("x", "bad layer"),
])
def test_bad_specs_get_one_line(spec, message):
    with pytest.raises(ProbeError, match=message) as err:
        resolve_layers(spec, 30)
    assert "\n" not in str(err.value)
