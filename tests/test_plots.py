"""saebench.plots: the Pareto set, layer and family names, and each plot drawn and not blank."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from test_report import imported_modules

from saebench import plots
from saebench.plots import (
    family_of,
    frontier_plot,
    interval_bars,
    layer_curves,
    layer_of,
    pareto_front,
)

WIDTH = round(plots.SIZE[0] * plots.DPI)


def distinct_colours(path: Path) -> int:
    """How many distinct RGB colours a PNG holds (8 bits per channel)."""
    rgb = (imread(path)[..., :3] * 255).round().astype(np.uint32)
    return len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]))


def assert_drawn(path: Path, height: int | None = None) -> None:
    """The PNG exists at the configured width (and `height`) and holds a real drawing."""
    image = imread(path)
    assert image.shape[1] == WIDTH
    assert height is None or image.shape[0] == height
    assert distinct_colours(path) > 20


# --------------------------------------------------------------------------- Pareto set


def test_pareto_front_with_ties_and_nan() -> None:
    table = pd.DataFrame({
        "l0": [4, 8, 8, 16, 16, math.nan, 2, 32],
        "ce": [0.70, 0.90, 0.80, 0.95, 0.95, 1.00, math.nan, 0.95],
    }, index=list("abcdefgh"))
    front = pareto_front(table, "l0", "ce")
    # c is beaten by b (same L0, better CE); d and e tie, so both stay; h is beaten by d;
    # f and g have a missing coordinate: never on the front, and they beat nothing.
    assert front.index.equals(table.index) and front.dtype == bool
    assert list(front[front].index) == ["a", "b", "d", "e"]


def test_pareto_front_directions() -> None:
    table = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [3.0, 2.0, 1.0]})
    assert pareto_front(table, "x", "y").tolist() == [True, False, False]
    assert pareto_front(table, "x", "y", y_higher_better=False).tolist() == [True, True, True]
    assert pareto_front(table, "x", "y", x_lower_better=False).tolist() == [True, True, True]
    both = pareto_front(table, "x", "y", x_lower_better=False, y_higher_better=False)
    assert both.tolist() == [False, False, True]


def test_pareto_front_of_nothing() -> None:
    empty = pd.DataFrame({"x": [], "y": []})
    assert pareto_front(empty, "x", "y").empty
    missing = pd.DataFrame({"x": [math.nan, 1.0], "y": [1.0, math.nan]})
    assert not pareto_front(missing, "x", "y").any()


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(("hook", "layer"), [
    ("blocks.3.hook_resid_pre", 3),
    ("blocks.12.attn.hook_z", 12),
    ("blocks.0.mlp.hook_post", 0),
    ("hook_embed", None),
    ("ln_final.hook_normalized", None),
    ("blocks.0.hook_resid_pre,blocks.3.hook_resid_pre", None),
    ("", None),
])
def test_layer_of(hook: str, layer: int | None) -> None:
    assert layer_of(hook) == layer


@pytest.mark.parametrize(("dictionary", "hook", "family"), [
    ("resid-L2-topk16", "blocks.2.hook_resid_pre", "resid-topk16"),
    ("resid-L12-topk16", "blocks.12.hook_resid_pre", "resid-topk16"),
    ("resid-L2", "blocks.2.hook_resid_pre", "resid"),
    ("L3-transcoder", "blocks.3.hook_mlp_out", "transcoder"),
    ("blocks.5.hook_resid_pre", "blocks.5.hook_resid_pre", "hook_resid_pre"),
    ("gpt2-small-res-jb/blocks.5.hook_resid_pre", "blocks.5.hook_resid_pre",
     "gpt2-small-res-jb/hook_resid_pre"),
    ("gemma-scope-2b-pt-res/layer_12/width_16k", "blocks.12.hook_resid_post",
     "gemma-scope-2b-pt-res/width_16k"),
    ("L1", "blocks.1.attn.hook_z", "attn.hook_z"),
    # the layer part must name the hook's layer, between separators
    ("resid-L12-topk16", "blocks.1.hook_resid_pre", "resid-L12-topk16"),
    ("resid-L2-topk16", "blocks.3.hook_resid_pre", "resid-L2-topk16"),
    ("gpt2-topk16", "blocks.2.hook_resid_pre", "gpt2-topk16"),
    # outside the blocks, and spliced sets, keep their name
    ("resid-L2-topk16", "hook_embed", "resid-L2-topk16"),
    ("a-L0+b-L3", "blocks.0.hook_resid_pre,blocks.3.hook_resid_pre", "a-L0+b-L3"),
])
def test_family_of(dictionary: str, hook: str, family: str) -> None:
    assert family_of(dictionary, hook) == family


def test_family_joins_one_family_across_layers() -> None:
    names = {family_of(f"resid-L{n}-topk16", f"blocks.{n}.hook_resid_pre") for n in range(12)}
    assert names == {"resid-topk16"}


# --------------------------------------------------------------------------- plots


@pytest.fixture
def frontier_table() -> pd.DataFrame:
    """Two hooks with four dictionaries each, L0 from 4 to 128 (log axis), intervals."""
    rows = []
    for hook, shift in (("blocks.2.hook_resid_pre", 0.0), ("blocks.3.hook_resid_pre", -0.05)):
        for l0, ce in ((4, 0.80), (16, 0.90), (64, 0.88), (128, 0.97)):
            value = ce + shift
            rows.append({"dictionary": f"d-{hook[7]}-{l0}", "hook": hook, "l0": l0,
                         "ce": value, "ce_ci_low": value - 0.02, "ce_ci_high": value + 0.02})
    return pd.DataFrame(rows)


def test_frontier_plot(tmp_path: Path, frontier_table: pd.DataFrame) -> None:
    path = frontier_plot(frontier_table, "l0", "ce", tmp_path / "sub" / "front.png",
                         title="L0 vs CE", y_label="CE loss recovered")
    assert path == tmp_path / "sub" / "front.png"
    assert_drawn(path, height=round(plots.SIZE[1] * plots.DPI))


def test_frontier_plot_variants(tmp_path: Path, frontier_table: pd.DataFrame) -> None:
    """No groups, no intervals, a lower-is-better y, NaN rows, and nothing to draw."""
    table = frontier_table.drop(columns=["ce_ci_low", "ce_ci_high"])
    table.loc[0, "ce"] = math.nan
    assert_drawn(frontier_plot(table, "l0", "ce", tmp_path / "a.png", group=None,
                               y_higher_better=False))
    nothing = frontier_table.assign(ce=math.nan)
    assert imread(frontier_plot(nothing, "l0", "ce", tmp_path / "b.png")).shape[1] == WIDTH


def test_layer_curves(tmp_path: Path) -> None:
    rows = [{"family": family, "layer": layer, "kl": 0.9 + 0.02 * layer - offset,
             "kl_ci_low": 0.88 + 0.02 * layer - offset, "kl_ci_high": 0.92 + 0.02 * layer - offset}
            for family, offset in (("resid-topk16", 0.0), ("resid-topk32", 0.1))
            for layer in (3, 0, 2, 1)]
    table = pd.DataFrame(rows).astype({"layer": "Int64"})
    assert_drawn(layer_curves(table, tmp_path / "layers.png", metric="kl", title="KL score"))
    bare = table.drop(columns=["kl_ci_low", "kl_ci_high"])
    assert_drawn(layer_curves(bare, tmp_path / "bare.png", metric="kl"))


def test_interval_bars(tmp_path: Path) -> None:
    rows = [{"dictionary": d, "task": task, "value": v, "low": v - 0.05, "high": v + 0.05}
            for d, base in (("resid-L2-topk16", 0.95), ("resid-L2-poor", 0.1))
            for task, v in (("ioi", base), ("agreement", base + 0.02))]
    table = pd.DataFrame(rows)
    path = interval_bars(table, tmp_path / "bars.png", label="dictionary", value="value",
                         low="low", high="high", group="task", title="recovered",
                         reference=1.0)
    assert_drawn(path)
    single = interval_bars(table[table["task"] == "ioi"], tmp_path / "single.png",
                           label="dictionary", value="value", low="low", high="high")
    assert_drawn(single)


def test_plots_use_neither_pyplot_nor_torch() -> None:
    imported = imported_modules(plots)
    assert not {m for m in imported if m.split(".")[0] == "torch" or m == "matplotlib.pyplot"}
