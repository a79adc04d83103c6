"""Recipes train under the standard protocol and the reproduce command prints mean +- std."""
import json

import pytest

from fer_lib.recipes import RECIPES, get_recipe, main
from fer_lib.models import list_models


def test_every_recipe_names_a_registered_model():
    for recipe in RECIPES.values():
        assert recipe.model in list_models()
    with pytest.raises(ValueError, match="fast_cpu"):
        get_recipe("nope")


@pytest.mark.slow
def test_reproduce_command_trains_each_seed_and_prints_the_table(tmp_path, capsys, monkeypatch):
    from fer_lib.synthetic import write_fer2013_csv

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("FER_LIB_CACHE", str(tmp_path / "cache"))
    csv = tmp_path / "fer2013.csv"
    write_fer2013_csv(csv, n_per_split=(140, 35, 35), seed=0)
    out = tmp_path / "runs"
    assert main(["--recipe", "fast_cpu", "--seeds", "0", "1", "--epochs", "1",
                 "--max-steps-per-epoch", "2", "--data", str(csv), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PrivateTest accuracy" in printed and "+-" in printed and "over 2 seeds" in printed
    saved = json.loads((out / "fast_cpu-fer2013" / "reproduce.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1]
    assert 0 <= saved["summary"]["test_accuracy"]["mean"] <= 100
    assert (out / "fast_cpu-fer2013" / "seed1" / "results.json").exists()
