"""fer_lib.bench: a smoke run with tiny sizes (the numbers themselves are not checked)."""
import json

from fer_lib import bench


def test_bench_quick_prints_one_json_line_with_all_three_paths(capsys):
    result = bench.main(["--quick", "--seconds", "0.1", "--images", "64", "--batch-size", "8",
                         "--workers", "0", "--json"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    for key in ("seed_style_img_s", "engine_img_s", "bare_img_s"):
        assert result[key] > 0
    assert abs(result["engine_vs_seed"] - result["engine_img_s"] / result["seed_style_img_s"]) < 0.01 * result["engine_vs_seed"]
    assert result["model"] == "exp3_cnn" and result["batch_size"] == 8 and result["device"] == "cpu"
    assert result["data"] == "synthetic" and result["precision"] in ("fp32", "bf16")


def test_compare_precision_runs_each_precision_on_the_same_start(tmp_path, monkeypatch, capsys):
    from fer_lib.synthetic import write_fer2013_csv

    csv = tmp_path / "fer2013.csv"
    write_fer2013_csv(csv, n_per_split=(70, 21, 21), seed=0)
    monkeypatch.setenv("FER2013_PATH", str(csv))
    monkeypatch.setenv("FER_LIB_CACHE", str(tmp_path / "cache"))
    result = bench.main(["--compare-precision", "--epochs", "1", "--max-steps-per-epoch", "2",
                         "--images", "64", "--batch-size", "8", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert [r["precision"] for r in result["runs"]] == ["fp32", "bf16"]
    assert result["train_images"] == 64 and "accuracy_delta" in result
    # like for like: the same precision twice gives the same run, so a delta is the precision's
    twice = bench.compare_precision(precisions=("fp32", "fp32"), epochs=1, n_images=64, batch_size=8,
                                    max_steps_per_epoch=2, verbose=False)
    first, second = twice["runs"]
    assert (first["val_accuracy"], first["last_train_loss"]) == (second["val_accuracy"], second["last_train_loss"])
