"""Config validation: defaults fill every key, and each kind of bad value stops with a message naming the key."""

import copy

import pytest

from hnclip.pipeline.config import REPO_ROOT, ConfigError, load_schema, load_yaml, validate_config


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def test_both_shipped_configs_validate(schema):
    for name in ["config.yaml", "config.demo.yaml"]:
        validate_config(load_yaml(REPO_ROOT / name), schema, base_dir=REPO_ROOT)


def test_defaults_fill_every_described_key(schema):
    completed = validate_config({"run_name": "mine"}, schema)
    assert completed["finetune"]["grid"] == {"alpha": [0.0, 1.0, 5.0], "tau": [0.05, 0.1], "seed": [0, 1, 2],
                                             "l2_sp_weight": [0.0], "distillation_weight": [0.0],
                                             "feature_anchor_weight": [0.0], "preference_mix": [0.0]}
    assert completed["resources"]["finetune"] == {"threads": 1, "mem_mb": 2000, "runtime": 30, "gpu": 0}


def _walk_properties(node, root, path=""):
    from hnclip.pipeline.config import _resolve_ref

    for key, sub in node.get("properties", {}).items():
        sub = _resolve_ref(sub, root)
        yield f"{path}{key}", sub
        yield from _walk_properties(sub, root, f"{path}{key}.")


def test_schema_types_describes_and_defaults_every_key(schema):
    for key, sub in _walk_properties(schema, schema):
        alternatives = sub.get("oneOf", [])  # a number or "auto" (llava.chunks, resources.*.mem_mb)
        assert "type" in sub or (alternatives and all("type" in a or "const" in a for a in alternatives)), key
        assert "default" in sub or key in schema["required"], key
        if sub.get("type") == "object":
            assert sub.get("additionalProperties") is False, key
        else:
            assert sub.get("description"), key


def test_run_name_is_required_and_names_a_directory(schema):
    with pytest.raises(ConfigError, match="'run_name' is a required property"):
        validate_config({}, schema)
    for bad in ["../thesis", "a b", "", "baseline"]:
        with pytest.raises(ConfigError, match="config key run_name"):
            validate_config({"run_name": bad}, schema)
    assert validate_config({"run_name": "thesis-lr1e-5.b_2"}, schema)["run_name"] == "thesis-lr1e-5.b_2"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"bogus": 1}, "'bogus' was unexpected"),
        ({"finetune": {"bogus": 1}}, "config key finetune: Additional properties"),
        ({"finetune": {"grid": {"alpha": [0.0, -1.0]}}}, "config key finetune.grid.alpha[1]: -1.0 is less than the minimum of 0"),
        ({"finetune": {"grid": {"tau": [0.0]}}}, "config key finetune.grid.tau[0]: 0.0 is less than or equal to the minimum of 0"),
        ({"finetune": {"grid": {"seed": []}}}, "config key finetune.grid.seed: must not be empty"),
        ({"finetune": {"grid": {"tau": [0.05, 0.05]}}}, "config key finetune.grid.tau: duplicate grid values"),
        ({"finetune": {"lr": "fast"}}, "config key finetune.lr: 'fast' is not of type 'number'"),
        ({"paths": {"hnc_test": "no/such/file.json"}}, "config key paths.hnc_test: no/such/file.json does not exist"),
        ({"data_source": "web"}, "config key data_source: 'web' is not one of"),
    ],
)
def test_bad_values_name_the_key(schema, override, message):
    with pytest.raises(ConfigError) as error:
        validate_config({"run_name": "t", **copy.deepcopy(override)}, schema)
    assert message in str(error.value)


def test_command_line_strings_take_the_schema_type(schema):
    """Snakemake's --config reads nested values as strings: report={from_existing: true} gives 'true'."""
    completed = validate_config({"run_name": "t", "report": {"from_existing": "true"},
                                 "finetune": {"steps": "12", "lr": "1e-4"}}, schema)
    assert completed["report"]["from_existing"] is True
    assert completed["finetune"]["steps"] == 12 and completed["finetune"]["lr"] == 1e-4
    with pytest.raises(ConfigError, match="config key finetune.steps: 'many' is not of type 'integer'"):
        validate_config({"run_name": "t", "finetune": {"steps": "many"}}, schema)


def test_config_strings_become_numbers_through_one_of_branches():
    """`--config llava={"chunks": 2}` reaches the workflow as the string "2"; "auto" stays a string."""
    base = load_yaml(REPO_ROOT / "config.yaml")
    def completed(**overrides):
        return validate_config({**base, **overrides}, base_dir=REPO_ROOT)

    assert completed(llava={"chunks": "2"})["llava"]["chunks"] == 2
    assert completed(llava={"chunks": "auto"})["llava"]["chunks"] == "auto"
    assert completed(resources={"vqa": {"mem_mb": "12000"}})["resources"]["vqa"]["mem_mb"] == 12000


def test_an_objective_is_set_in_the_grid_or_in_finetune_not_both(schema):
    from hnclip.pipeline.grid import grid_cells

    grid = {"alpha": [1.0], "tau": [0.05], "seed": [0]}
    fixed = validate_config({"run_name": "r", "finetune": {"grid": grid, "l2_sp_weight": 0.5}}, schema)
    assert grid_cells(fixed["finetune"]["grid"]) == ["alpha~1.0/tau~0.05/seed~0"]  # the default [0.0] sweeps nothing
    with pytest.raises(ConfigError, match="finetune.l2_sp_weight: is 0.5 and also swept by finetune.grid.l2_sp_weight"):
        validate_config({"run_name": "r", "finetune": {"grid": {**grid, "l2_sp_weight": [0.0, 1.0]},
                                                      "l2_sp_weight": 0.5}}, schema)


def test_a_preference_loss_alone_warns_that_alpha_trains_identical_cells(schema):
    from hnclip.pipeline.config import objective_warnings

    grid = {"alpha": [0.0, 5.0], "tau": [0.05], "seed": [0]}
    alone = validate_config({"run_name": "r", "finetune": {"grid": {**grid, "preference_mix": [0.0, 1.0]}}}, schema)
    assert objective_warnings(alone) == ["finetune: preference_mix 1 gives the contrastive loss, and with it alpha, no "
                                         "weight: the cells with preference_mix 1 and alpha in [0.0, 5.0] train to the "
                                         "same weights"]
    mixed = validate_config({"run_name": "r", "finetune": {"grid": grid, "preference_mix": 0.5}}, schema)
    assert objective_warnings(mixed) == []
    assert objective_warnings(validate_config({"run_name": "r", "finetune": {"grid": grid, "preference_mix": 1.0}},
                                              schema))


def test_an_anchor_on_features_nothing_trains_warns(schema):
    from hnclip.pipeline.config import objective_warnings

    grid = {"alpha": [5.0], "tau": [0.05], "seed": [0], "feature_anchor_weight": [0.0, 1.0]}
    for frozen in ({"train_towers": "text"}, {"train_last_n": 1}):
        config = validate_config({"run_name": "r", "finetune": {"grid": grid, **frozen}}, schema)
        assert any("feature anchor holds penultimate features that cannot move" in w
                   for w in objective_warnings(config)), frozen
    assert objective_warnings(validate_config({"run_name": "r", "finetune": {"grid": grid}}, schema)) == []
