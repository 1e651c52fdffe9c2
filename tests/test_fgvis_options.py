"""--fgvis-setting parsing, shared by evaluate diaretdb1 / faithfulness / defense."""
from __future__ import annotations

import pytest
import typer

from retina_fgvis.commands.fgvis_options import parse_fgvis_settings


def test_values_are_json_when_they_parse_and_strings_otherwise():
    got = parse_fgvis_settings(["goal=fraction", "goal_fraction=0.3", "prune_levels=[]", "autocast=true",
                                " lr =1e-2", "goal_fraction=0.5"])
    assert got == {"goal": "fraction", "goal_fraction": 0.5, "prune_levels": [], "autocast": True, "lr": 0.01}


@pytest.mark.parametrize("item", ["goal", "=0.3", " =x"])
def test_malformed_item_is_a_usage_error_naming_the_option(item):
    with pytest.raises(typer.BadParameter) as err:
        parse_fgvis_settings([item])
    assert "KEY=VALUE" in str(err.value) and err.value.param_hint == "--fgvis-setting"
