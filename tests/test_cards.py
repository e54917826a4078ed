"""Tests of saebench.cards: feature cards from one streaming pass, each against a brute-force
computation over every activation held at once, and their section of the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tolerances import EPS32, F64_RECOMPUTE, f32_sum

from saebench import loading
from saebench.cards import feature_cards
from saebench.engine import special_token_ids
from saebench.report import render_report
from saebench.results import append_rows, row
from saebench.splice import as_dictionary

K = 5
HOOK = "blocks.2.hook_resid_pre"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny model runs faster so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return loading.load_heldout_tokens()[:32]


@pytest.fixture(scope="module")
def sae():
    return loading.load_zoo_dictionary("resid-L2-topk16")


def brute_force(model, tokens: torch.Tensor, sae, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(every feature activation [n_seq, seq_len, d_sae] in float64, the evaluated-position
    mask), from full passes and the SAE's own encode over the cards' batches of 16 rows: the
    same arithmetic as the cards' stream, so the activations are bitwise the same."""
    with torch.no_grad():
        acts = torch.cat([
            sae.encode(model.run_with_cache(batch, names_filter=[hook])[1][hook]).double()
            for batch in tokens.split(16)])
    keep = ~torch.isin(tokens, torch.tensor(special_token_ids(model)))
    return acts, keep


@pytest.fixture(scope="module")
def resid(zoo_model, tokens, sae) -> tuple[torch.Tensor, torch.Tensor]:
    return brute_force(zoo_model, tokens, sae, HOOK)


def top_contexts(acts: torch.Tensor, keep: torch.Tensor, f: int, k: int = K) -> list[tuple]:
    """The k (activation, row, position) with the largest nonzero activation of feature f,
    ties to the earliest (row, position), by sorting every position."""
    values = acts[..., f]
    found = [(float(values[r, p]), r, p) for r, p in (keep & (values != 0)).nonzero().tolist()]
    return sorted(found, key=lambda c: (-c[0], c[1], c[2]))[:k]


def features_to_check(acts: torch.Tensor, keep: torch.Tensor) -> list[int]:
    """The three densest features and two rare ones (fewer than K firing positions)."""
    counts = ((acts != 0) & keep.unsqueeze(-1)).sum((0, 1))
    dense = counts.argsort(descending=True)[:3].tolist()
    rare = [f for f in range(len(counts)) if 0 < counts[f] < K][:2]
    assert len(rare) == 2
    return dense + rare


def by_feature(rows: list[dict]) -> dict[int, dict]:
    return {r["feature"]: r for r in rows}


@pytest.fixture(scope="module")
def checked(resid) -> list[int]:
    return features_to_check(*resid)


@pytest.fixture(scope="module")
def cards(zoo_model, tokens, sae, checked) -> list[dict]:
    """The cards of the features checked, in one streaming pass."""
    return feature_cards(zoo_model, tokens, as_dictionary(sae), checked, k=K, window=4)


def test_statistics_equal_brute_force(resid, checked, cards) -> None:
    acts, keep = resid
    assert (~keep).any()  # BOS positions are left out
    assert [c["feature"] for c in cards] == checked
    kept = acts[keep]
    # The same activations (see `brute_force`); a float64 total streamed by batch against a
    # mean of all ≤ 4,064 positions, every term ≥ 0: `F64_RECOMPUTE`. The largest is exact.
    for f, card in by_feature(cards).items():
        assert card["table"] == "card"
        assert card["active_share"] == pytest.approx(float((kept[:, f] != 0).double().mean()),
                                                     rel=F64_RECOMPUTE, abs=0)
        assert card["mean_activation"] == pytest.approx(float(kept[:, f].mean()),
                                                        rel=F64_RECOMPUTE, abs=0)
        assert card["max_activation"] == float(kept[:, f].max())


def test_contexts_equal_brute_force_top_k(zoo_model, tokens, resid, cards) -> None:
    acts, keep = resid
    for f, card in by_feature(cards).items():
        contexts = json.loads(card["contexts"])
        assert [(c["activation"], c["row"], c["position"]) for c in contexts] == \
            top_contexts(acts, keep, f)
        for c in contexts:
            start = max(c["position"] - 4, 0)
            ids = tokens[c["row"], start: c["position"] + 3].tolist()
            assert c["tokens"] == [zoo_model.to_single_str_token(i) for i in ids]
            assert c["at"] == c["position"] - start


class Rounded:
    """A dictionary whose activations are rounded to halves (many ties) and whose feature
    `dead` (if any) never fires."""

    def __init__(self, sae, dead: int | None = None) -> None:
        self.sae, self.dead = sae, dead

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.round(self.sae.encode(x) * 2) / 2
        if self.dead is not None:
            feats[..., self.dead] = 0
        return feats

    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(feats)


def test_ties_go_to_the_earliest_position_whatever_the_batch_size(zoo_model, tokens, sae,
                                                                  resid, checked) -> None:
    acts, keep = (t[:8] for t in resid)
    d = as_dictionary(Rounded(sae), hook=HOOK, d_sae=sae.cfg.d_sae)
    tied = torch.round(acts * 2) / 2
    runs = [feature_cards(zoo_model, tokens[:8], d, checked, k=K, batch_size=b)
            for b in (1, 3, 16)]
    assert runs[-1]
    for f, card in by_feature(runs[-1]).items():
        contexts = json.loads(card["contexts"])
        assert [(c["activation"], c["row"], c["position"]) for c in contexts] == \
            top_contexts(tied, keep, f)
    dense = json.loads(runs[-1][0]["contexts"])
    assert len({c["activation"] for c in dense}) < len(dense)  # there are ties to break
    # Exact: activations rounded to halves are the same whatever the batch (a rounding
    # difference would have to straddle a quarter), and multiples of 1/2 sum exactly in
    # float64, in any order
    for other in runs[:-1]:
        for a, b in zip(other, runs[-1], strict=True):
            assert a == b


def test_a_feature_that_never_fires_has_no_card(zoo_model, tokens, sae, resid, checked) -> None:
    acts, keep = (t[:8] for t in resid)
    alive = checked[:2]
    d = as_dictionary(Rounded(sae, dead=alive[0]), hook=HOOK, d_sae=sae.cfg.d_sae)
    assert [c["feature"] for c in feature_cards(zoo_model, tokens[:8], d, alive)] == alive[1:]
    never = ((acts != 0) & keep.unsqueeze(-1)).sum((0, 1)) == 0
    dead = never.nonzero().flatten()[:3].tolist()
    if dead:  # naturally dead features get no card either
        assert feature_cards(zoo_model, tokens[:8], as_dictionary(sae), dead) == []


def assert_lens(card: dict, expected: torch.Tensor, model, tol: float) -> None:
    """The card's logit-lens tokens are the top and bottom 5 of `expected` [d_vocab], their
    values within `tol`."""
    for column, largest in (("logit_top", True), ("logit_bottom", False)):
        pairs = json.loads(card[column])
        values = expected.topk(5, largest=largest).values.tolist()
        assert [v for _, v in pairs] == pytest.approx(values, rel=0, abs=tol)
        for token, value in pairs:
            assert value == pytest.approx(float(expected[model.to_single_token(token)]),
                                          rel=0, abs=tol)


def lens_tolerance(sae, feature: int, w_u: torch.Tensor, w_out: torch.Tensor | None = None
                   ) -> float:
    """How far the card's lens may be from W_dec[f] (@ W_out) @ W_U in float64: the card
    decodes e_f and 0 in float32 and subtracts, rounding each element of w_f + b_dec − b_dec
    by at most EPS32·(|w_f| + 2|b_dec|); a write-out through W_out is a float32 sum of
    d_mlp products, off by at most f32_sum(d_mlp + 1) of its terms; W_U then carries each
    element's error with |W_U|, and the float64 products add `F64_RECOMPUTE`. A wrong
    direction (another feature's, or without W_out) moves the values by O(1)."""
    w_f, b_dec = sae.W_dec[feature].detach().double().abs(), sae.b_dec.detach().double().abs()
    err, size = EPS32 * (w_f + 2 * b_dec), w_f
    if w_out is not None:
        err = err @ w_out.abs() + f32_sum(len(w_out) + 1) * (w_f @ w_out.abs())
        size = w_f @ w_out.abs()
    return float((err @ w_u.abs()).max() + F64_RECOMPUTE * (size @ w_u.abs()).max())


def test_logit_lens_of_a_residual_sae(zoo_model, sae, cards) -> None:
    w_u = zoo_model.W_U.detach().double()
    for card in cards:
        f = card["feature"]
        assert_lens(card, sae.W_dec[f].detach().double() @ w_u, zoo_model,
                    lens_tolerance(sae, f, w_u))


def test_logit_lens_through_w_out_at_mlp_post(zoo_model, tokens) -> None:
    sae = loading.load_zoo_dictionary("mlp_post-L3-topk32")
    d = as_dictionary(sae)
    assert d.write_hook == "blocks.3.mlp.hook_post"
    cards = feature_cards(zoo_model, tokens[:8], d, [0, 1, 2])
    assert cards
    w_out = zoo_model.blocks[3].mlp.W_out.detach().double()
    w_u = zoo_model.W_U.detach().double()
    for card in cards:
        f = card["feature"]
        assert_lens(card, sae.W_dec[f].detach().double() @ w_out @ w_u, zoo_model,
                    lens_tolerance(sae, f, w_u, w_out))


def test_no_lens_without_a_write_out_map(zoo_model, tokens, sae, checked) -> None:
    d = as_dictionary(sae, hook="blocks.2.ln1.hook_normalized")
    cards = feature_cards(zoo_model, tokens[:4], d, checked[:1])
    assert cards and cards[0]["logit_top"] == cards[0]["logit_bottom"] == "[]"


def test_report_shows_the_cards(cards, tmp_path: Path) -> None:
    cards = cards[:2]
    ids = {"run_id": "r", "suite": "toy", "check_id": "resid-L2-topk16::feature_cards",
           "dictionary": "resid-L2-topk16"}
    odd = {**cards[0], "feature": 999, "contexts": json.dumps([
        {"row": 0, "position": 2, "activation": 1.5, "tokens": ["a|b", "\n", "*x*"], "at": 2}])}
    append_rows(tmp_path / "results.csv", [row(**ids, metric="feature_cards", value=1.0,
                                               verdict="pass")])
    append_rows(tmp_path / "features.csv", [{**ids, **c} for c in [*cards, odd]])
    text = render_report(tmp_path)
    section = text.split("## Feature cards\n", 1)[1]
    assert "<details><summary><b>resid-L2-topk16</b> · 3 feature cards</summary>" in section
    assert f"#### feature {cards[0]['feature']} of resid-L2-topk16" in section
    top = json.loads(cards[0]["contexts"])[0]
    assert f"**{top['tokens'][top['at']]}**" in section
    assert "a\\|b ⏎ **\\*x\\***" in section  # escaped, the newline shown, the token in bold
    assert "logit lens: promotes `" in section and "· suppresses `" in section
    assert "## Feature ablations" not in text  # card rows are not an ablation table
