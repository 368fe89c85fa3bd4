import re

import pytest

from hnclip.pipeline.grid import cell_path, control_cell, grid_cells, parse_cell, unregularised_cell


def test_cells_are_alpha_major_and_spelled_once():
    assert grid_cells({"alpha": [0, 5], "tau": [0.05], "seed": [0, 1]}) == [
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
    from hnclip.pipeline.grid import MODEL_WILDCARD, cell_in_path

    assert cell_in_path("results/demo/eval/alpha~5.0/tau~0.05/seed~1/hnc.json") == "alpha~5.0/tau~0.05/seed~1"
    assert cell_in_path("results/demo/vqa/baseline/vqav2/scores.json") is None
    with pytest.raises(ValueError, match="not a grid cell path"):
        cell_in_path("results/demo/eval/alpha~5.0/tau~0.05/seed~x/hnc.json")
    path = cell_path(1.0, 0.07, 2)
    assert re.fullmatch(MODEL_WILDCARD, path) and re.fullmatch(MODEL_WILDCARD, "baseline")
    assert not re.fullmatch(MODEL_WILDCARD, "alpha~1.0/tau~0.07")


def test_an_objective_axis_names_its_nonzero_values_only_so_existing_cells_keep_their_paths():
    grid = {"alpha": [0, 5], "tau": [0.05], "seed": [0], "feature_anchor_weight": [0, 1], "l2_sp_weight": [0.5]}
    assert grid_cells(grid) == [
        "l2_sp_weight~0.5/alpha~0.0/tau~0.05/seed~0",
        "l2_sp_weight~0.5/feature_anchor_weight~1.0/alpha~0.0/tau~0.05/seed~0",
        "l2_sp_weight~0.5/alpha~5.0/tau~0.05/seed~0",
        "l2_sp_weight~0.5/feature_anchor_weight~1.0/alpha~5.0/tau~0.05/seed~0",
    ]
    assert grid_cells({"alpha": [5], "tau": [0.05], "seed": [0], "feature_anchor_weight": [0]}) == [
        "alpha~5.0/tau~0.05/seed~0"]  # the axis at 0 only: the seed's cell, as before the axis existed
    with pytest.raises(ValueError, match="not an objective axis: dropout"):
        cell_path(1.0, 0.05, 0, dropout=0.1)


def test_an_objective_cell_round_trips_and_is_compared_with_its_control_and_twin():
    from hnclip.pipeline.grid import CELL_WILDCARD, MODEL_WILDCARD, cell_in_path, objectives_of

    cell = cell_path(5.0, 0.05, 1, feature_anchor_weight=2.0, preference_mix=0.5)
    assert cell == "feature_anchor_weight~2.0/preference_mix~0.5/alpha~5.0/tau~0.05/seed~1"
    assert parse_cell(cell) == {"alpha": 5.0, "tau": 0.05, "seed": 1, "feature_anchor_weight": 2.0,
                                "preference_mix": 0.5}
    assert objectives_of(cell) == {"feature_anchor_weight": 2.0, "preference_mix": 0.5}
    assert control_cell(cell) == "feature_anchor_weight~2.0/preference_mix~0.5/alpha~0.0/tau~0.05/seed~1"
    assert unregularised_cell(cell) == "alpha~5.0/tau~0.05/seed~1"
    assert unregularised_cell("alpha~5.0/tau~0.05/seed~1") is None and unregularised_cell("baseline") is None
    assert cell_in_path(f"results/demo/eval/{cell}/hnc.json") == cell
    assert re.fullmatch(CELL_WILDCARD, cell) and re.fullmatch(MODEL_WILDCARD, cell)
    assert not re.fullmatch(CELL_WILDCARD, "dropout~0.1/alpha~5.0/tau~0.05/seed~1")
    assert not re.fullmatch(CELL_WILDCARD, "baseline")


def test_a_cell_has_one_spelling_and_finite_values():
    for other in ("alpha~5/tau~0.05/seed~0", "feature_anchor_weight~0.0/alpha~5.0/tau~0.05/seed~0",
                  "preference_mix~0.5/l2_sp_weight~1.0/alpha~5.0/tau~0.05/seed~0",
                  "l2_sp_weight~1.0/l2_sp_weight~2.0/alpha~5.0/tau~0.05/seed~0"):
        with pytest.raises(ValueError, match="its values are spelled"):
            parse_cell(other)
    with pytest.raises(ValueError, match="must be a finite number, got feature_anchor_weight inf"):
        cell_path(1.0, 0.05, 0, feature_anchor_weight=float("inf"))


def test_an_objective_set_for_every_cell_is_named_in_every_path():
    from hnclip.pipeline.grid import effective_grid

    finetune = {"grid": {"alpha": [0.0, 5.0], "tau": [0.05], "seed": [0], "feature_anchor_weight": [0.0, 2.0]},
                "distillation_weight": 1.0, "l2_sp_weight": 0.0}
    assert grid_cells(effective_grid(finetune)) == [
        "distillation_weight~1.0/alpha~0.0/tau~0.05/seed~0",
        "distillation_weight~1.0/feature_anchor_weight~2.0/alpha~0.0/tau~0.05/seed~0",
        "distillation_weight~1.0/alpha~5.0/tau~0.05/seed~0",
        "distillation_weight~1.0/feature_anchor_weight~2.0/alpha~5.0/tau~0.05/seed~0",
    ]
