"""`figure_formats`: which files the run's figures are saved as, checked before any stage runs."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from pipeline.__main__ import figure_formats
from pipeline.orchestration.validation import ConfigError


@pytest.mark.parametrize(
    "value, expected",
    [(["png"], ["png"]), (["png", "pdf"], ["png", "pdf"]), ("pdf", ["pdf"]), (None, ["png"])],
)
def test_figure_formats(value, expected):
    assert figure_formats(OmegaConf.create({"figure_formats": value})) == expected


def test_an_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError, match=r"figure_formats \['svg'\] unknown; choose from \['png', 'pdf'\]"):
        figure_formats(OmegaConf.create({"figure_formats": ["png", "svg"]}))
