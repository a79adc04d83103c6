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
