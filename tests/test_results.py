"""Run folders: results.json written atomically, collected into the series table."""
import json

import pytest

from fer_lib.experiment import split_params
from fer_lib.results import REPORT_CLAIMS, RESULTS_MIMETYPE, claim_row, collect_results, read_results, write_results
from fer_lib.series import NOTEBOOKS, PROFILES, notebook_parameters


def test_write_and_read_results_round_trip(tmp_path):
    path = write_results(tmp_path / "02_mlp_baseline", {"val_accuracy": 0.3, "test_accuracy": float("nan"),
                                                       "history": [{"epoch": 1}]})
    assert path.name == "results.json"
    data = read_results(tmp_path / "02_mlp_baseline")
    assert data["val_accuracy"] == 0.3 and data["test_accuracy"] is None  # NaN -> null, valid JSON
    assert not list((tmp_path / "02_mlp_baseline").glob(".*.tmp"))  # no temp file left


def test_missing_and_broken_results_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results yet"):
        read_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json: not valid JSON"):
        read_results(tmp_path)


def test_collect_results_puts_claims_beside_ours(tmp_path):
    write_results(tmp_path / "03_cnn", {"model": "exp2_cnn", "val_accuracy": 0.5, "test_accuracy": 0.52,
                                        "test_macro_f1": 0.4, "seconds": 12.0})
    write_results(tmp_path / "05_resnet", {"model": "exp4_resnet", "val_accuracy": 0.55,
                                           "test_accuracy": 0.56, "test_macro_f1": 0.45})
    table = collect_results(tmp_path)
    assert list(table["notebook"]) == ["03_cnn", "05_resnet"]
    assert table.loc[0, "claim_accuracy"] == REPORT_CLAIMS["03_cnn"].accuracy == 54.37
    row = claim_row("03_cnn", read_results(tmp_path / "03_cnn"))
    assert row.frame.iloc[0]["ours: PrivateTest (test) %"] == pytest.approx(52.0)
    bundle = row._repr_mimebundle_()
    record = bundle[RESULTS_MIMETYPE]
    assert record["notebook"] == "03_cnn" and record["test_accuracy"] == pytest.approx(52.0)
    assert record["claim_accuracy"] == 54.37
    assert "54.37" in bundle["text/html"] and "52.0" in bundle["text/plain"]
    json.dumps(record)  # what the executed notebook stores must be plain JSON


def test_split_params_routes_sweep_names():
    config, model = split_params({"learning_rate": 0.01, "patience": 4, "dropout_rate": 0.3, "hidden_dim": 64})
    assert config == {"lr": 0.01, "early_stopping_patience": 4}
    assert model == {"dropout_rate": 0.3, "hidden_dim": 64}
    with pytest.raises(KeyError, match="momentumm"):
        split_params({"momentumm": 0.9})


def test_profiles_only_name_notebook_parameters_that_exist():
    import papermill as pm

    from fer_lib.series import notebook_path

    for profile, per_notebook in PROFILES.items():
        for name, overrides in per_notebook.items():
            known = set(pm.inspect_notebook(str(notebook_path(name))))
            unknown = set(overrides) - known
            if profile == "smoke":
                continue  # smoke sets a common superset; unknown names are filtered out
            assert not unknown, f"profile {profile} sets {unknown} that {name} does not define"
    params = notebook_parameters(NOTEBOOKS[0], "cpu", tmp := __import__("pathlib").Path("x/y"), None, None)
    assert params["run_dir"] == str(tmp) and params["profile"] == "cpu"


def test_cpu_and_report_profiles_run_no_sweep_and_no_model_zoo():
    """Both profiles meant for a CPU skip what multiplies the time: every notebook with a sweep
    gets sweep_count 0, and 08 trains no model zoo (25 models; the full profile runs it)."""
    import papermill as pm

    from fer_lib.series import notebook_path

    for name in NOTEBOOKS:
        defaults = pm.inspect_notebook(str(notebook_path(name)))
        for profile in ("cpu", "report"):
            params = PROFILES[profile].get(name, {})
            if "sweep_count" in defaults:
                assert params.get("sweep_count") == 0, f"{profile}/{name} runs its sweep"
            if "zoo_epochs" in defaults:
                assert params.get("zoo_epochs") == 0, f"{profile}/{name} trains the model zoo"
    assert PROFILES["full"]["08_final_model"] == {}  # the full profile keeps the notebook's zoo
