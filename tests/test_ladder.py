"""fer_lib.ladder: experiment 8 as a ladder of one-change steps on one budget."""
import json

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from fer_lib import experiment, ladder  # noqa: E402
from fer_lib.data import load_fer2013  # noqa: E402
from fer_lib.synthetic import write_fer2013_csv  # noqa: E402
from fer_lib.training import evaluate  # noqa: E402

FAST = {"epochs": 1, "max_steps_per_epoch": 2, "wandb_mode": "disabled", "workers": 0, "seed": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ladder-data")
    csv = folder / "fer2013.csv"
    # 280 training images: two full batches of the ladder's 128 (the reports' DataLoader drops
    # the partial one)
    write_fer2013_csv(csv, n_per_split=(280, 21, 21), seed=0)
    return load_fer2013(csv, cache=False)


@pytest.fixture
def fit_calls(monkeypatch):
    """Counts the engine's fit calls (run_experiment, train_recipe) and which model each trained."""
    calls = []
    real_fit = experiment.fit

    def counting_fit(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(experiment, "fit", counting_fit)
    return calls


@pytest.fixture(scope="module")
def full_ladder(data, tmp_path_factory):
    """The default ladder (no ensemble), run once for the tests that only read it."""
    return ladder.run_ladder(data, run_dir=tmp_path_factory.mktemp("ladder"), **FAST)


def test_default_ladder_has_one_row_per_step_in_order(full_ladder):
    table = full_ladder.table
    expected = [s.label for s in ladder.STEPS if s.how != "ensemble"]
    assert table["step"].tolist() == expected
    assert list(table.columns) == ladder.COLUMNS
    assert table["model"].tolist() == ["exp3_cnn"] * 4 + ["fernet_small"]
    assert (table["epochs"] == 1).all()
    assert table["params"].iloc[0] == table["params"].iloc[1] != table["params"].iloc[4]
    for col in ("val_accuracy %", "test_accuracy %", "macro_f1 %"):
        assert table[col].between(0, 100).all(), col
    assert (table["wall_seconds"] > 0).all() and (table["img_per_s"] > 0).all()
    # the history of each trained step is the budget: one epoch each
    assert {k: len(h) for k, h in full_ladder.histories.items()} == {
        "reports": 1, "engine": 1, "onecycle": 1, "tta": 1, "fernet": 1}


def test_each_trained_step_writes_its_own_run_folder(full_ladder):
    for key in ("reports", "engine", "onecycle", "fernet"):
        results = json.loads((ladder.Path(full_ladder.info[key]["run_dir"]) / "results.json").read_text())
        row = full_ladder.table.loc[full_ladder.table["step"] == ladder._BY_KEY[key].label].iloc[0]
        assert results["test_accuracy"] * 100 == pytest.approx(row["test_accuracy %"])
    reports = json.loads((ladder.Path(full_ladder.info["reports"]["run_dir"]) / "results.json").read_text())
    assert reports["pipeline"] == "seed_style" and reports["config"]["lr"] == 1e-3
    assert reports["model_kwargs"] == {"hidden_dim": 64, "dropout_rate": 0.2}


def test_steps_train_what_they_say(full_ladder):
    engine = full_ladder.runs["engine"].results["config"]
    assert (engine["optimizer"], engine["scheduler"], engine["batch_size"], engine["augment"]) == (
        "adam", "plateau", 128, "exp3")
    onecycle = full_ladder.runs["onecycle"].results["config"]
    assert (onecycle["optimizer"], onecycle["nesterov"], onecycle["scheduler"], onecycle["label_smoothing"]) == (
        "sgd", True, "onecycle", 0.1)
    assert full_ladder.runs["fernet"].results["recipe"] == "fast_cpu"
    assert full_ladder.runs["fernet"].results["tta"] == "flip"


def test_tta_step_reuses_step_3_without_training(data, tmp_path, fit_calls, monkeypatch):
    import fer_lib.training

    evaluated = []  # (model, split size, tta) of every evaluate call outside the engine's runs
    real_evaluate = fer_lib.training.evaluate

    def recording_evaluate(model, split, **kwargs):
        evaluated.append((model, len(split), kwargs.get("tta", "none")))
        return real_evaluate(model, split, **kwargs)

    monkeypatch.setattr(fer_lib.training, "evaluate", recording_evaluate)
    result = ladder.run_ladder(data, run_dir=tmp_path, steps=["engine", "onecycle", "tta"], **FAST)
    assert len(fit_calls) == 2  # engine and onecycle; the TTA step trains nothing
    step3_model = result.runs["onecycle"].model
    assert [(m is step3_model, n, tta) for m, n, tta in evaluated] == [
        (True, len(data.val), "flip"), (True, len(data.test), "flip")]
    rows = result.table.set_index("step")
    tta, onecycle = rows.loc["+ flip TTA"], rows.loc["+ one-cycle Nesterov SGD + label smoothing 0.1"]
    assert tta["wall_seconds"] == onecycle["wall_seconds"]
    assert tta["params"] == onecycle["params"] and tta["img_per_s"] == onecycle["img_per_s"]
    # its numbers are step 3's model under flip TTA
    flipped = evaluate(result.runs["onecycle"].model, data.test, tta="flip")
    assert tta["test_accuracy %"] == pytest.approx(100 * flipped["accuracy"])


def test_passing_final_skips_training_step_5(data, tmp_path, fit_calls):
    from fer_lib.recipes import train_recipe

    final = train_recipe("fast_cpu", data, run_dir=tmp_path / "final", seed=0, wandb_mode="disabled",
                         epochs=1, max_steps_per_epoch=2)
    assert len(fit_calls) == 1
    result = ladder.run_ladder(data, run_dir=tmp_path / "ladder", steps=["engine", "fernet"], final=final, **FAST)
    assert len(fit_calls) == 2  # only step 2 trained here
    assert fit_calls[1] == type(result.runs["engine"].model).__name__
    assert result.runs["fernet"] is final
    row = result.table.iloc[-1]
    assert row["test_accuracy %"] == pytest.approx(100 * final.test["accuracy"])
    assert row["wall_seconds"] == final.results["seconds"]
    assert not (tmp_path / "ladder" / "fernet").exists()
    # a final run on another budget is refused rather than compared unfairly
    with pytest.raises(ValueError, match="for 2 epochs"):
        ladder.run_ladder(data, run_dir=tmp_path / "ladder2", steps=["fernet"], final=final,
                          **{**FAST, "epochs": 2})


def test_ensemble_step_only_with_metrics(data, tmp_path, fit_calls):
    from fer_lib.recipes import train_recipe

    members = [train_recipe("fast_cpu", data, run_dir=tmp_path / f"seed{s}", seed=s, wandb_mode="disabled",
                            epochs=1, max_steps_per_epoch=2) for s in (0, 1)]
    metrics = experiment.ensemble_metrics(members, data)
    result = ladder.run_ladder(data, run_dir=tmp_path / "ladder", steps=["fernet", "ensemble"],
                               final=members[0], ensemble=metrics, ensemble_members=2, **FAST)
    assert len(fit_calls) == 2  # the members; the ladder trained nothing
    assert result.table["step"].tolist() == ["+ a model shaped for 48x48", "+ ensemble of seeds"]
    ens = result.table.iloc[-1]
    assert ens["test_accuracy %"] == pytest.approx(100 * metrics["test"]["accuracy"])
    assert ens["params"] == 2 * result.table.iloc[0]["params"]
    assert ens["wall_seconds"] == pytest.approx(2 * members[0].results["seconds"], abs=0.11)
    with pytest.raises(ValueError, match="needs ensemble"):
        ladder.run_ladder(data, run_dir=tmp_path / "x", steps=["ensemble"], **FAST)


def test_step_order_and_names_are_checked(data, tmp_path):
    with pytest.raises(ValueError, match="must come before"):
        ladder.run_ladder(data, run_dir=tmp_path, steps=["tta", "onecycle"], **FAST)
    with pytest.raises(ValueError, match="unknown ladder step"):
        ladder.run_ladder(data, run_dir=tmp_path, steps=["warp-drive"], **FAST)


def test_plot_has_one_bar_per_step(full_ladder):
    fig = ladder.plot_ladder(full_ladder)
    try:
        accuracy_axis, wall_axis = fig.axes[:2]
        n = len(full_ladder.table)
        assert len(accuracy_axis.patches) == n and len(wall_axis.patches) == n
        widths = [bar.get_width() for bar in accuracy_axis.patches]
        assert widths == pytest.approx(full_ladder.table["test_accuracy %"].tolist())
        assert [bar.get_width() for bar in wall_axis.patches] == pytest.approx(
            full_ladder.table["wall_seconds"].tolist())
        assert "buys" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
