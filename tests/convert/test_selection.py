import pytest

from mixerswap.convert.selection import LayerSelectionError, parse_layer_list, select_attention_layers


@pytest.mark.parametrize(
    "layers, ratio, want",
    [(12, 0.25, [2, 6, 10]), (12, 0.5, [1, 3, 5, 7, 9, 11]), (5, 1.0, [0, 1, 2, 3, 4]), (5, 0.0, []),
     (32, 0.25, [2, 6, 10, 14, 18, 22, 26, 30]), (3, 0.34, [1]), (16, 0.2, [2, 8, 13]),
     (5, 0.1, [2]), (32, 0.001, [16])],  # above 0 keeps at least one layer
)
def test_ratio_is_evenly_spaced(layers, ratio, want):
    assert select_attention_layers(layers, keep_attention=ratio) == want


def test_explicit_indices_and_negative():
    assert select_attention_layers(10, attention_layers=[8, 0, -1]) == [0, 8, 9]
    assert select_attention_layers(10) == []
    assert parse_layer_list("0, 8,16") == [0, 8, 16] and parse_layer_list("") == []


@pytest.mark.parametrize("kwargs", [dict(attention_layers=[10]), dict(attention_layers=[1, 1]),
                                    dict(keep_attention=1.01), dict(keep_attention=0.5, attention_layers=[1])])
def test_errors(kwargs):
    with pytest.raises(LayerSelectionError):
        select_attention_layers(10, **kwargs)
