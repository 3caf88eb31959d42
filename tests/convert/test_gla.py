"""Attention → gla on a real teacher: calibration fits each layer's per-head output scale."""

import yaml

from mixerswap.convert import convert
from mixerswap.demo import demo_text


def test_calibrated_gla_layers_move_closer_to_the_teacher(stories_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(demo_text())
    convert(stories_dir, tmp_path / "s", to="gla", keep_attention=0.4, calibration=text, calibration_tokens=256,
            progress=False)
    report = yaml.safe_load((tmp_path / "s" / "mixerswap.yaml").read_text())["calibration"]
    assert report["layers"]
    for layer in report["layers"].values():
        assert layer["after"]["rel_error"] <= layer["before"]["rel_error"] + 1e-6
        assert layer["after"]["rel_error"] <= 1.0 + 1e-6
