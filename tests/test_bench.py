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
    ratio = result["engine_img_s"] / result["seed_style_img_s"]
    assert abs(result["engine_vs_seed"] - ratio) < 0.01 * result["engine_vs_seed"]
    assert result["model"] == "exp3_cnn" and result["batch_size"] == 8 and result["device"] == "cpu"
    assert result["data"] == "synthetic" and result["precision"] in ("fp32", "bf16")
    # the peak and the fraction table cover --model and the fast recipe's model
    assert result["peak"]["precision"] == result["precision"] and result["peak"]["gflops"] > 0
    assert [row["model"] for row in result["flops"]] == ["exp3_cnn", "fernet_small"]
    assert result["flops"][0]["engine_img_s"] == result["engine_img_s"]


def test_forward_flops_of_a_tiny_conv_linear_model_is_the_hand_count():
    import torch
    from torch import nn

    from fer_lib.model_table import forward_flops

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 24 * 24, 7))
    conv = 4 * 48 * 48 * (1 * 3 * 3)  # outputs x multiply-adds per output
    linear = 4 * 24 * 24 * 7
    assert forward_flops(model) == 2 * (conv + linear) == 198_144
    assert bench.training_flops_per_image(model) == 3 * 198_144
    assert model.training  # the mode is restored
    # the model table counts with the same function: its MFLOPs are the bench's forward FLOPs
    from fer_lib.model_table import count_macs
    from fer_lib.models import create_model

    torch.manual_seed(0)
    net = create_model("fernet_small")
    assert forward_flops(net) == 2 * count_macs(net)


def test_peak_fraction_table_smoke():
    result = bench.peak_fraction(["exp3_cnn"], seconds=0.05, batch_size=4, rounds=1, peak_size=64,
                                 verbose=False)
    peak = result["peak"]
    assert peak["size"] == 64 and peak["gflops"] > 0 and peak["precision"] in ("fp32", "bf16")
    (row,) = result["rows"]
    assert row["model"] == "exp3_cnn" and row["engine_img_s"] > 0 and row["bare_img_s"] > 0
    expected = row["bare_img_s"] * row["train_mflop_per_image"] / 1e3  # img/s x MFLOP -> GFLOP/s
    assert abs(row["bare_gflops"] - expected) <= 0.05 * row["bare_gflops"] + 1e-3
    table = bench.peak_table(result)
    assert table.splitlines()[0].startswith("| model | path | img/s") and "fraction of peak" in table
    assert sum("| exp3_cnn |" in line for line in table.splitlines()) == 2
    # a deadline already passed skips the model with a note instead of timing it
    late = bench.peak_fraction(["exp3_cnn"], seconds=0.05, peak=peak, deadline=0.0, verbose=False)
    assert late["rows"] == [] and "exp3_cnn" in late["skipped"][0]


def test_compare_precision_runs_each_precision_on_the_same_start(fer2013_csv, monkeypatch, capsys):
    monkeypatch.setenv("FER2013_PATH", str(fer2013_csv((70, 21, 21))))
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


def test_inference_bench_times_both_memory_formats_and_they_agree(capsys):
    from fer_lib.bench import main

    result = main(["--inference", "--quick", "--peak-models", "fernet_small", "exp1_mlp", "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1]) == result
    assert [row["model"] for row in result["inference"]] == ["fernet_small", "exp1_mlp"]
    for row in result["inference"]:
        assert row["contiguous_img_s"] > 0 and row["channels_last_img_s"] > 0
        # same weights in fp32: only the kernels differ, so the logits nearly match
        assert row["same_predictions"] and row["max_logit_diff"] < 1e-3
    assert "fernet_small (fp32): contiguous" in printed
