"""End to end on the real MNIST (the official IDX files); skipped where they are absent."""

import cnnlab


def test_fast_preset_one_epoch_reaches_98_8(real_data, tmp_path):
    summary = cnnlab.train("lenet5", "mnist", data_dir=str(real_data), epochs=1,
                           out=tmp_path / "run", progress=False)
    assert summary["final_test_acc"] >= 98.8, summary
