import re

import pytest

from hnclip.pipeline.grid import cell_path, control_cell, grid_cells, parse_cell


def test_cells_are_alpha_major_and_spelled_once():
    assert grid_cells([0, 5], [0.05], [0, 1]) == [
        "alpha~0.0/tau~0.05/seed~0",
        "alpha~0.0/tau~0.05/seed~1",
        "alpha~5.0/tau~0.05/seed~0",
        "alpha~5.0/tau~0.05/seed~1",
    ]


def test_parse_round_trips_and_control_has_same_tau_and_seed():
    cell = cell_path(2.5, 0.1, 3)
    assert parse_cell(cell) == {"alpha": 2.5, "tau": 0.1, "seed": 3}
    assert control_cell(cell) == "alpha~0.0/tau~0.1/seed~3"
    assert control_cell("baseline") is None


def test_parse_rejects_other_names():
    with pytest.raises(ValueError, match="not a grid cell path: 'alpha~1/seed~0'"):
        parse_cell("alpha~1/seed~0")


def test_the_cell_a_result_path_names_is_found_and_checked():
    from hnclip.pipeline.grid import CELL_WILDCARDS, MODEL_WILDCARD, cell_in_path

    assert cell_in_path("results/demo/eval/alpha~5.0/tau~0.05/seed~1/hnc.json") == "alpha~5.0/tau~0.05/seed~1"
    assert cell_in_path("results/demo/vqa/baseline/vqav2/scores.json") is None
    with pytest.raises(ValueError, match="not a grid cell path"):
        cell_in_path("results/demo/eval/alpha~5.0/tau~0.05/seed~x/hnc.json")
    path = CELL_WILDCARDS.format(alpha="1.0", tau="0.07", seed=2)
    assert path == cell_path(1.0, 0.07, 2)
    assert re.fullmatch(MODEL_WILDCARD, path) and re.fullmatch(MODEL_WILDCARD, "baseline")
    assert not re.fullmatch(MODEL_WILDCARD, "alpha~1.0/tau~0.07")
