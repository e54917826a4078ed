"""Task-level faithfulness: logit differences, remainder DLA and feature ablation per prompt.

References are independent of `saebench.tasks`: hooks written here with `run_with_hooks`
on one unpadded prompt at a time, and TransformerLens' own `ActivationCache.logit_attrs`.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import F64_RECOMPUTE, f32_error, ratio
from toys import HOOKS, Identity, Scaled, Zero, lossy, tiny_config, width
from transformer_lens import HookedTransformer

from saebench import loading
from saebench.engine import EngineOptions
from saebench.loading import TaskPrompt
from saebench.metrics import get_metric
from saebench.splice import as_dictionary
from saebench.stats import summarize
from saebench.tasks import TaskRequest, encode_prompts, run_task

OPTIONS = EngineOptions(batch_size=4, progress=False)
pytestmark = pytest.mark.usefixtures("no_grad_one_thread")


@functools.cache
def tokenizer():
    return loading.load_zoo_tokenizer()


@functools.cache
def prompts() -> list[TaskPrompt]:
    """Prompts of all three zoo tasks: different lengths, so batches are padded."""
    return [*loading.load_task("ioi")[:3], *loading.load_task("closing_quote")[:2],
            *loading.load_task("agreement")[:2]]


def tiny_model(seed: int = 0, norm: str = "LN") -> HookedTransformer:
    """A random model that reads the zoo's vocabulary (so the task prompts tokenize)."""
    cfg = tiny_config(seed=seed, n_ctx=48, d_vocab=len(tokenizer()), normalization_type=norm)
    return HookedTransformer(cfg, tokenizer=tokenizer()).eval()


class WithDead(Identity):
    """Identity plus two features that never fire (always 0, decoded with weight 0)."""

    def encode(self, x):
        return torch.cat([x, torch.zeros(*x.shape[:-1], 2, dtype=x.dtype)], -1)

    def decode(self, f):
        return f[..., :-2]


def wrap(obj, model, hook, extra: int = 0):
    return as_dictionary(obj, hook=hook, name=hook, d_in=width(model, hook),
                         d_sae=width(model, hook) + extra)


def ids(model, p: TaskPrompt) -> tuple[torch.Tensor, int, int, int]:
    toks = model.to_tokens(p.prompt)
    n = toks.shape[1]
    pos = n - 1 if p.pos is None else p.pos % n
    return toks, pos, model.to_single_token(p.answer), model.to_single_token(p.distractor)


def manual_ld(model, p: TaskPrompt, fwd_hooks=()) -> float:
    """LD at the answer position of one unpadded prompt, with hooks written by the test."""
    toks, pos, a, b = ids(model, p)
    logits = model.run_with_hooks(toks, fwd_hooks=list(fwd_hooks))[0, pos]
    return float(logits[a] - logits[b])


def replace_hook(fn, where=slice(1, None)):
    """Replace the activation by `fn` of it (per-head activations flattened) at `where`."""

    def hook_fn(act, hook):
        flat = act.flatten(2) if act.dim() == 4 else act
        new = act.clone()
        new[:, where] = fn(flat).reshape(act.shape)[:, where]
        return new

    return hook_fn


def value(metric: str, terms, **options) -> float:
    return summarize(get_metric(metric), terms, options, n_boot=0).value


def ld_tolerance(model, ps: list[TaskPrompt]) -> float:
    """How far a logit difference may move between the task runner's padded batches and a
    pass over one unpadded prompt: two logits, each within `f32_error`. A DLA, part of the
    same logit difference made of a subset of its terms on the same path, moves less. A
    splice at the wrong position or a wrong write-out moves them by more than 0.1."""
    return 2 * f32_error(model, model.to_tokens([p.prompt for p in ps]))


def task_term_tolerance(name: str, tol: float) -> float:
    """`tol` for the logit-difference-sized terms (LDs, DLAs, feature effects); the rest
    (counts, sign agreement) are exact."""
    return tol if name.startswith(("ld_", "dla_", "abs_dla_", "feature_effect")) else 0.0


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post",
                                  "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"])
def test_logit_diffs_match_hand_written_hooks(hook):
    model = tiny_model(seed=1)
    ps = prompts()
    req = TaskRequest("d", (wrap(Scaled(), model, hook),), ablations=("zero", "mean"))
    terms = run_task(model, ps, [req], OPTIONS).terms["d"]
    acts = []
    for p in ps:
        _, cache = model.run_with_cache(model.to_tokens(p.prompt), names_filter=[hook])
        act = cache[hook][0, 1:]
        acts.append(act.flatten(1) if act.dim() == 3 else act)
    mean = torch.cat(acts).double().mean(0).float()
    expected = {
        "ld_clean": [manual_ld(model, p) for p in ps],
        "ld_spliced": [manual_ld(model, p, [(hook, replace_hook(lossy))]) for p in ps],
        "ld_zero": [manual_ld(model, p, [(hook, replace_hook(torch.zeros_like))]) for p in ps],
        "ld_mean": [manual_ld(model, p, [(hook, replace_hook(lambda a: mean.expand_as(a)))])
                    for p in ps],
    }
    tol = ld_tolerance(model, ps)
    for name, want in expected.items():
        torch.testing.assert_close(terms[name], torch.tensor(want, dtype=torch.float64),
                                   atol=tol, rtol=0, msg=name)
    assert (terms["ld_spliced"] - terms["ld_clean"]).abs().max() > 10 * tol
    sign = (terms["ld_spliced"].sign() == terms["ld_clean"].sign()).double()
    assert torch.equal(terms["sign_agree"], sign)  # the same comparison of the same terms
    # a ratio of sums of len(ps) LDs, each within tol of the hand-written one
    clean = sum(expected["ld_clean"])
    want = sum(expected["ld_spliced"]) / clean
    assert value("logit_diff_recovered", terms) == pytest.approx(
        want, rel=0, abs=ratio(want, clean, len(ps) * tol))


def reference_component(model, cache, hook: str, pos: int) -> torch.Tensor:
    """The clean write of the component at `hook` to the residual stream, at `pos` [d_model],
    from TransformerLens' own residual decomposition or cache."""
    layer = int(hook.split(".")[1])
    if hook.endswith(("mlp.hook_post", "attn.hook_z")):
        stack, labels = cache.get_full_resid_decomposition(expand_neurons=True,
                                                           return_labels=True)
        prefix = f"L{layer}N" if hook.endswith("hook_post") else f"L{layer}H"
        rows = [i for i, label in enumerate(labels) if label.startswith(prefix)]
        return stack[rows, 0, pos].sum(0)
    return cache[hook][0, pos]


def write_out_by_hand(model, hook: str, act: torch.Tensor) -> torch.Tensor:
    layer = int(hook.split(".")[1])
    if hook.endswith("mlp.hook_post"):
        return torch.einsum("n,nm->m", act, model.blocks[layer].mlp.W_out)
    if hook.endswith("attn.hook_z"):
        return torch.einsum("hd,hdm->m", act, model.blocks[layer].attn.W_O)
    return act


def tl_dla(model, cache, component: torch.Tensor, p: TaskPrompt) -> float:
    """`ActivationCache.logit_attrs` of one residual-stream vector at the answer position."""
    _, pos, a, b = ids(model, p)
    attrs = cache.logit_attrs(component[None, None], tokens=torch.tensor([a]),
                              incorrect_tokens=torch.tensor([b]), pos_slice=pos)
    return float(attrs.squeeze())


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out",
                                  "blocks.1.mlp.hook_post", "blocks.1.attn.hook_z"])
def test_remainder_dla_matches_transformer_lens_logit_attrs(hook, norm):
    model = tiny_model(seed=2, norm=norm)
    ps = prompts()
    d = wrap(Scaled(), model, hook)
    terms = run_task(model, ps, [TaskRequest("d", (d,), dla=True)], OPTIONS).terms["d"]
    original, remainder = [], []
    for p in ps:
        toks, pos, _, _ = ids(model, p)
        _, cache = model.run_with_cache(toks)
        act = cache[hook][0, pos]
        recon = lossy(act.flatten()).reshape(act.shape)
        original.append(tl_dla(model, cache, reference_component(model, cache, hook, pos), p))
        remainder.append(tl_dla(model, cache, write_out_by_hand(model, hook, act - recon), p))
    tol = ld_tolerance(model, ps)
    torch.testing.assert_close(terms["dla_original"], torch.tensor(original).double(),
                               atol=tol, rtol=0)
    torch.testing.assert_close(terms["dla_remainder"], torch.tensor(remainder).double(),
                               atol=tol, rtol=0)
    # one float64 linear map (write-out and DLA, sums of at most 32 + 16 terms of size O(1))
    # of target, reconstruction and their difference: additive up to its rounding
    torch.testing.assert_close(terms["dla_reconstruction"] + terms["dla_remainder"],
                               terms["dla_original"], atol=F64_RECOMPUTE, rtol=0)
    assert terms["dla_remainder"].abs().max() > 10 * tol
    assert torch.equal(terms["abs_dla_remainder"], terms["dla_remainder"].abs())


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hook=st.sampled_from(HOOKS), layer=st.integers(0, 1), seed=st.integers(0, 5),
       norm=st.sampled_from(["LN", "LNPre", "RMS"]))
def test_identity_dictionary_recovers_the_logit_diff_and_leaves_no_remainder(
        hook, layer, seed, norm):
    model = tiny_model(seed=seed, norm=norm)
    hook = hook.format(l=layer)
    req = TaskRequest("id", (wrap(Identity(), model, hook),), dla=True)
    terms = run_task(model, prompts()[:4], [req], OPTIONS).terms["id"]
    # Exact: the identity hands back the activation's own values, so the spliced pass
    # repeats the clean one's arithmetic and LD_spliced is LD_clean to the bit
    assert value("logit_diff_recovered", terms) == 1.0
    assert value("sign_agreement", terms) == 1
    assert torch.equal(terms["dla_remainder"], torch.zeros(4, dtype=torch.float64))
    assert value("remainder_dla", terms, share="abs") == 0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hook=st.sampled_from(HOOKS), layer=st.integers(0, 1), seed=st.integers(0, 5))
def test_zero_dictionary_recovers_nothing_against_zero_ablation(hook, layer, seed):
    model = tiny_model(seed=seed)
    hook = hook.format(l=layer)
    req = TaskRequest("zero", (wrap(Zero(), model, hook),))
    terms = run_task(model, prompts()[:4], [req], OPTIONS).terms["zero"]
    # exact: the splice and the ablation write the same zeros into the same pass
    assert torch.equal(terms["ld_spliced"], terms["ld_zero"])
    assert value("logit_diff_recovered", terms, normalize="zero") == 0


def test_padding_does_not_change_a_prompts_numbers():
    model = tiny_model(seed=3)
    short = min(prompts(), key=lambda p: len(p.prompt))
    longer = [p for p in prompts() if len(model.to_tokens(p.prompt)[0]) >
              len(model.to_tokens(short.prompt)[0])][:3]
    batch = encode_prompts(model, [short, *longer], batch_size=8, special_ids=[0, 1, 2])[0]
    assert int(batch.lengths[0]) < batch.tokens.shape[1]
    d = wrap(Scaled(), model, "blocks.0.hook_resid_post")
    req = TaskRequest("d", (d,), dla=True)
    alone = run_task(model, [short], [req], OPTIONS).terms["d"]
    padded = run_task(model, [short, *longer], [req], EngineOptions(batch_size=8)).terms["d"]
    tol = ld_tolerance(model, [short, *longer])
    for name, col in alone.items():
        torch.testing.assert_close(padded[name][:1], col, rtol=0,
                                   atol=task_term_tolerance(name, tol), msg=name)


def test_answer_positions_splice_only_there():
    model = tiny_model(seed=4)
    hook = "blocks.0.hook_resid_post"
    d = wrap(Scaled(), model, hook)
    ps = [TaskPrompt(p.prompt, p.answer, p.distractor, pos=-2) for p in prompts()[:4]]
    runs = {name: run_task(model, ps, [TaskRequest("d", (d,), positions=pos)], OPTIONS)
            .terms["d"] for name, pos in [("answer", "answer"), ("last", [-1]), ("all", "all")]}
    # exact: the answer position never attends to the last one, and each row of each matrix
    # product is computed from its own values
    assert torch.equal(runs["last"]["ld_spliced"], runs["last"]["ld_clean"])
    tol = ld_tolerance(model, ps)
    assert (runs["all"]["ld_spliced"] - runs["answer"]["ld_spliced"]).abs().max() > 10 * tol
    by_hand = []
    for p in ps:
        _, pos, _, _ = ids(model, p)
        by_hand.append(manual_ld(model, p, [(hook, replace_hook(lossy, where=slice(pos,
                                                                                   pos + 1)))]))
    torch.testing.assert_close(runs["answer"]["ld_spliced"], torch.tensor(by_hand).double(),
                               atol=tol, rtol=0)
    batch = encode_prompts(model, ps, batch_size=4, special_ids=[0, 1, 2])[0]
    mask = batch.splice_mask("answer")
    assert mask.sum(1).tolist() == [1] * 4
    assert mask[torch.arange(4), batch.answer_pos].all()


def test_a_feature_that_never_fires_has_no_effect():
    model = tiny_model(seed=5)
    hook = "blocks.1.hook_resid_pre"
    d = wrap(WithDead(), model, hook, extra=2)
    ps = prompts()
    req = TaskRequest("d", (d,), feature_k=d.d_sae)
    result = run_task(model, ps, [req], OPTIONS)
    rows = {row["feature"]: row for row in result.features["d"]}
    assert len(rows) == d.d_sae
    for dead in (d.d_sae - 2, d.d_sae - 1):  # exact: zeroing a 0 leaves the pass as it is
        assert rows[dead]["effect"] == 0.0
        assert rows[dead]["loss_effect"] == 0.0
        assert rows[dead]["active_share"] == 0.0
    top = result.features["d"][0]["feature"]
    assert top < d.d_sae - 2

    def zero_top(a):
        a = a.clone()
        a[..., top] = 0
        return a

    zeroed = [manual_ld(model, p, [(hook, replace_hook(zero_top))]) for p in ps]
    terms = result.terms["d"]
    effect = terms["ld_spliced"] - torch.tensor(zeroed).double()
    # LD_spliced is shared, so each effect is off by the zeroed LD's tolerance at most
    tol = ld_tolerance(model, ps)
    assert rows[top]["effect"] == pytest.approx(float(effect.mean()), rel=0, abs=tol)
    torch.testing.assert_close(terms["ld_topk_zeroed"][:, 0], torch.tensor(zeroed).double(),
                               atol=tol, rtol=0)
    torch.testing.assert_close(terms["feature_effect"][:, 0], effect, atol=tol, rtol=0)
    assert terms["ld_topk_zeroed"].shape == (len(ps), d.d_sae)
    order = [row["feature"] for row in result.features["d"]]
    for dead in (d.d_sae - 2, d.d_sae - 1):
        rank = order.index(dead)  # exact, as above
        assert torch.equal(terms["ld_topk_zeroed"][:, rank], terms["ld_topk_zeroed"][:, rank - 1])
        assert not terms["feature_effect"][:, rank].any()  # so its interval is [0, 0]


def test_results_are_deterministic():
    model = tiny_model(seed=6)
    d = wrap(Scaled(), model, "blocks.1.hook_resid_pre")
    a, b = (run_task(model, prompts(), [TaskRequest(
        "d", (d,), ablations=("zero", "mean"), dla=True, feature_k=3)], OPTIONS)
        for _ in range(2))
    # exact: the same computation twice
    assert a.per_prompt == b.per_prompt and a.features == b.features
    for name, col in a.terms.items():
        assert all(torch.equal(col[k], b.terms[name][k]) for k in col)


def test_task_metrics_are_ratios_of_pooled_means():
    """Each value against its fraction, to `F64_RECOMPUTE`: float64 sums of a few small
    integers are exact, and the value and the fraction each round a division or two."""

    def fraction(x: float):
        return pytest.approx(x, rel=F64_RECOMPUTE, abs=0)

    t = {"n_prompts": torch.ones(3, dtype=torch.float64),
         "ld_clean": torch.tensor([4.0, 2.0, 0.0]).double(),
         "ld_spliced": torch.tensor([2.0, 1.0, 3.0]).double(),
         "ld_zero": torch.tensor([1.0, 1.0, -2.0]).double(),
         "sign_agree": torch.tensor([1.0, 1.0, 0.0]).double(),
         "dla_original": torch.tensor([2.0, 2.0, 2.0]).double(),
         "dla_reconstruction": torch.tensor([1.0, 3.0, 1.0]).double(),
         "dla_remainder": torch.tensor([1.0, -1.0, 1.0]).double(),
         "abs_dla_reconstruction": torch.tensor([1.0, 3.0, 1.0]).double(),
         "abs_dla_remainder": torch.tensor([1.0, 1.0, 1.0]).double(),
         "ld_topk_zeroed": torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]]).double()}
    assert value("logit_diff_recovered", t) == fraction(6 / 6)
    assert value("logit_diff_recovered", t, normalize="zero") == fraction((6 - 0) / 6)
    t["ld_spliced"] = torch.tensor([2.0, 1.0, 0.0]).double()
    assert value("logit_diff_recovered", t) == fraction(3 / 6)
    assert value("logit_diff_recovered", t, normalize="zero") == fraction(3 / 6)
    t["ld_zero"] = torch.tensor([1.0, 1.0, 1.0]).double()
    assert value("logit_diff_recovered", t, normalize="zero") == fraction(0 / 3)
    assert value("sign_agreement", t) == fraction(2 / 3)
    assert value("remainder_dla", t) == fraction(1 / 6)
    assert value("remainder_dla", t, share="abs") == fraction(3 / 8)
    assert value("feature_ablation", t, k=1) == fraction((3 - 3) / 3)
    t["ld_topk_zeroed"][:, 1] = 0.0
    assert value("feature_ablation", t, k=2) == fraction(1.0)
    with pytest.raises(ValueError, match="feature_k >= 3"):
        value("feature_ablation", t)
    summary = summarize(get_metric("remainder_dla"), t, {"share": "signed"}, n_boot=0)
    assert summary.parts["dla_remainder"] == fraction(1 / 3)
    assert get_metric("logit_diff_recovered").terms({"normalize": "mean"}) == (
        "n_prompts", "ld_clean", "ld_spliced", "ld_mean")
    assert get_metric("remainder_dla").count_term == "n_prompts"
    for metric, options in [("logit_diff_recovered", {"normalize": "max"}),
                            ("remainder_dla", {"share": "relative"}),
                            ("feature_ablation", {"k": 0})]:
        with pytest.raises(ValueError):
            get_metric(metric).terms(options)


def test_a_tiny_clean_logit_diff_is_unstable_not_a_number():
    t = {"n_prompts": torch.ones(4, dtype=torch.float64),
         "ld_clean": torch.tensor([1e-5, -1e-5, 2e-5, -1e-5]).double(),
         "ld_spliced": torch.tensor([1.0, 1.0, 1.0, 1.0]).double()}
    s = summarize(get_metric("logit_diff_recovered"), t, {}, n_boot=50)
    assert s.verdict == "unstable"
    assert "LD_clean" in s.reason


def test_bad_requests_and_prompts_are_refused():
    model = tiny_model()
    d = wrap(Identity(), model, "blocks.0.hook_resid_pre")
    d2 = wrap(Identity(), model, "blocks.1.hook_resid_pre")
    with pytest.raises(ValueError, match="exactly one dictionary"):
        TaskRequest("x", (d, d2), dla=True)
    with pytest.raises(ValueError, match="positions"):
        TaskRequest("x", (d,), positions="last")
    with pytest.raises(ValueError, match="unknown ablation"):
        TaskRequest("x", (d,), ablations=("resample",))
    p = prompts()[0]
    with pytest.raises(ValueError, match="single tokens"):
        run_task(model, [TaskPrompt(p.prompt, "Rose Paul", p.distractor)],
                 [TaskRequest("x", (d,))], OPTIONS)
    with pytest.raises(IndexError, match="answer position"):
        run_task(model, [TaskPrompt(p.prompt, p.answer, p.distractor, pos=99)],
                 [TaskRequest("x", (d,))], OPTIONS)
    with pytest.raises(IndexError, match="outside prompt"):
        run_task(model, [p], [TaskRequest("x", (d,), positions=[60])], OPTIONS)
    bos_only = run_task(model, [p], [TaskRequest("x", (d,), positions=[0])], OPTIONS)
    for metric in ("logit_diff_recovered", "sign_agreement"):
        s = summarize(get_metric(metric), bos_only.terms["x"], n_boot=0)
        assert (s.verdict, s.value != s.value) == ("empty", True)
        assert "changed no counted position" in s.reason


@pytest.fixture(scope="module")
def zoo_ioi(zoo_model):
    names = ["resid-L2-topk16", "mlp_post-L3-topk32", "transcoder-L3", "resid-L2-poor"]
    dicts = {n: as_dictionary(loading.load_zoo_dictionary(n), name=n) for n in names}
    ps = loading.load_task("ioi")[:40]
    requests = [TaskRequest(n, (d,), dla=True) for n, d in dicts.items()]
    return dicts, ps, run_task(zoo_model, ps, requests, EngineOptions(batch_size=16))


def test_zoo_good_dictionaries_recover_the_ioi_logit_diff(zoo_ioi):
    _, _, result = zoo_ioi
    recovered = {n: value("logit_diff_recovered", t) for n, t in result.terms.items()}
    assert recovered["resid-L2-topk16"] >= 0.8
    assert recovered["mlp_post-L3-topk32"] >= 0.8
    assert recovered["resid-L2-poor"] < 0.5
    assert recovered["transcoder-L3"] > recovered["resid-L2-poor"] + 0.3
    assert value("sign_agreement", result.terms["resid-L2-topk16"]) == 1
    assert value("remainder_dla", result.terms["resid-L2-poor"], share="abs") > 0.9
    assert value("remainder_dla", result.terms["mlp_post-L3-topk32"], share="abs") < 0.2


@pytest.mark.parametrize("name", ["mlp_post-L3-topk32", "transcoder-L3"])
def test_zoo_dla_matches_logit_attrs(zoo_model, zoo_ioi, name):
    dicts, ps, result = zoo_ioi
    d = dicts[name]
    want = []
    for p in ps[:6]:
        toks, pos, _, _ = ids(zoo_model, p)
        _, cache = zoo_model.run_with_cache(toks)
        want.append(tl_dla(zoo_model, cache, reference_component(zoo_model, cache,
                                                                 d.write_hook, pos), p))
    got = result.terms[name]["dla_original"][:6]
    tol = ld_tolerance(zoo_model, ps[:6])
    torch.testing.assert_close(got, torch.tensor(want).double(), atol=tol, rtol=0)
    assert result.terms[name]["dla_remainder"].abs().max() > 10 * tol
