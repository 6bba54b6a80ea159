"""`mmformer demo` end to end with a couple of steps: it trains, saves a loadable model, scores the
held-out family against the right chance level, and writes the search grid."""

import json

import pytest
from PIL import Image

from mmformer.cli import main
from mmformer.demo import demo_recipe
from mmformer.model import MMFormer


def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("lightning")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--batch-size", "16", "--query", "red apple"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # the demo's screen: its own lines and the progress bar, no Lightning banner or tip
    screen = captured.out + captured.err
    assert not [b for b in ("GPU available", "TPU available", "Tip:", "logging interval", "Seed set") if b in screen]
    assert "text->image" in printed and "'red apple'" in printed
    results = json.loads((out / "results.json").read_text())
    m = results["test_metrics"]
    assert m["n_images"] == 1906 and m["t2i_chance_R@1"] == pytest.approx(100 / 1906)
    assert results["steps"] == 2  # --steps trains exactly that many
    # --precision auto (the default) timed both candidates and says which it kept and why
    assert results["precision"] in ("32-true", "bf16-mixed")
    assert f"precision auto -> {results['precision']}: fastest training step on this CPU" in printed
    assert len(results["queries"]["red apple"]) == 5
    model = MMFormer.from_pretrained(out / "model")
    assert model.tokenizer is not None and model.config.patch_size > 0
    # the shipped recipe's model settings reach the saved model (tiny, 2 blocks deep)
    assert model.config.depth == demo_recipe()["model_config"]["depth"] == 2
    assert "the tiny preset, 128 wide x 2 blocks" in printed
    grid = Image.open(out / "search.png")
    assert grid.size[0] > 5 * 64 and grid.size[1] >= 96
