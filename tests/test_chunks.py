"""Chunks of positions through the unembedding: results do not depend on the chunk size,
bad sizes are refused, and the memory a run allocates is bounded by the budget.

The reference of every comparison is the same run unchunked (the toy models' small
vocabulary fits one chunk under the default budget). Chunk sizes of 1 and 7 positions
split sequences of 12 positions mid-row and divide neither a batch of 4 rows (48
positions) nor the last batch of 1 row; the budget-derived size is 5 positions.
"""

from __future__ import annotations

import doctest
import functools
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import (
    downstream,
    f32_kl,
    f32_log_probs,
    f32_sum,
    f32_unembed,
    logit_bound,
    sequence_sums,
)
from torch.profiler import ProfilerActivity, profile
from toys import Scaled, tiny_config, tiny_model, tokens_for, width
from transformer_lens import HookedTransformer

from saebench import chunks, engine, evaluate, loading
from saebench.splice import as_dictionary
from saebench.tasks import TaskRequest, run_task

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("no_grad_one_thread")

D_VOCAB, D_MODEL, N_CTX = 29, 16, 12  # tiny_config's
FIVE_POSITIONS = 5 * chunks.LIVE_TENSORS * 4 * D_VOCAB + 100
"""A budget of five positions' logits-sized float32 tensors (and a little)."""
CHUNKINGS = {"1 position": {"chunk_positions": 1}, "7 positions": {"chunk_positions": 7},
             "budget of 5": {"max_memory": FIVE_POSITIONS}}


def wrap(model, hook: str, name: str, scale: float = 1.0):
    class Shrunk(Scaled):
        def decode(self, f):
            return scale * super().decode(f)

    return as_dictionary(Shrunk(), hook=hook, name=name, d_in=width(model, hook),
                         d_sae=width(model, hook))


def requests(model) -> list[engine.Request]:
    """Every logit-derived term: zero and mean ablations (a whole residual, so the
    token-independent one-row pass), position buckets, both noise baselines, two
    dictionaries at one hook (a stacked pass) and one at an MLP output."""
    resid = "blocks.1.hook_resid_pre"
    return [
        engine.Request("noisy", (wrap(model, resid, "a"),), ablations=("zero", "mean"),
                       noise_draws=2, noise_baselines=("isotropic", "covariance"),
                       by_position=True, layers=True),
        engine.Request("stacked", (wrap(model, resid, "b", 0.5),), ablations=("zero",)),
        engine.Request("mlp", (wrap(model, "blocks.0.hook_mlp_out", "c"),),
                       ablations=("zero", "mean"), by_position=True),
    ]


def run_engine(**chunking) -> dict[str, dict[str, torch.Tensor]]:
    model = tiny_model(seed=4)
    options = engine.EngineOptions(batch_size=4, progress=False, special_token_ids=[0],
                                   stack_bytes=1 << 30, **chunking)
    return engine.run(model, tokens_for(model, 5, 4), requests(model), options)


@functools.cache
def unchunked() -> dict[str, dict[str, torch.Tensor]]:
    return run_engine()


def token_tolerance(model) -> float:
    """How far one token's NLL or log-probs may move with the chunk: chunking changes only
    the unembedding's and log_softmax's order, from the same final residual."""
    bound = logit_bound(model)
    return f32_log_probs(D_VOCAB, bound, f32_unembed(D_MODEL, bound))


def assert_same_terms(got: dict, want: dict) -> None:
    """Every term of every request equal within `sequence_sums` (absolute). The terms that
    do not read log-probs are exact: top-1 agreement changes only where the top two logits
    are within 2·f32_unembed (≈ 2e-5) of each other, and the closest pair in these runs is
    2e-4 apart. A misaligned next token or a chunk measured against the wrong clean chunk
    moves a CE or KL sum by O(1) nats, ~10⁴ times these tolerances."""
    token = token_tolerance(tiny_model(seed=4))
    assert got.keys() == want.keys()
    for key, terms in want.items():
        assert got[key].keys() == terms.keys(), key
        for name, value in terms.items():
            torch.testing.assert_close(got[key][name], value, rtol=0,
                                       atol=sequence_sums(name, value, token, N_CTX,
                                                          D_VOCAB),
                                       msg=f"{key}: {name}")


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_chunked_engine_terms_equal_the_unchunked(chunking):
    """CE (clean, spliced, ablated), KL (spliced, ablated, noise), top-1 agreement, per
    bucket too, and the stacked pass, within `sequence_sums`."""
    want = unchunked()
    assert {"ce_clean", "ce_spliced", "ce_zero", "ce_mean", "kl_spliced", "kl_zero",
            "agree_spliced", "kl_eps_iso", "kl_eps_cov", "@2-3:ce_spliced",
            "@4-7:kl_mean"} <= set(want["noisy"])
    assert_same_terms(run_engine(**CHUNKINGS[chunking]), want)


def test_the_budget_sets_the_positions_of_a_chunk(monkeypatch):
    seen = []
    real = engine._Unembedding.__init__

    def spy(self, model, batch, clean, chunk, hold_bytes):
        seen.append(chunk)
        real(self, model, batch, clean, chunk, hold_bytes)

    monkeypatch.setattr(engine._Unembedding, "__init__", spy)
    run_engine(max_memory=FIVE_POSITIONS)
    run_engine(max_memory=FIVE_POSITIONS, chunk_positions=3)  # the count wins
    run_engine()
    default = chunks.DEFAULT_MAX_MEMORY // (chunks.LIVE_TENSORS * 4 * D_VOCAB)
    assert seen == [5, 5, 3, 3, default, default]  # two batches each
    assert default > 48  # the default never chunks a batch of the toy vocabulary


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk=st.integers(1, 60), budget=st.booleans())
def test_no_term_depends_on_the_chunk_size(chunk, budget):
    """Any chunk, given as positions or as the budget of that many, gives the same terms."""
    chunking = ({"max_memory": chunk * chunks.LIVE_TENSORS * 4 * D_VOCAB} if budget
                else {"chunk_positions": chunk})
    assert_same_terms(run_engine(**chunking), unchunked())


def test_evaluate_values_do_not_depend_on_the_chunk():
    """Each downstream value within the `downstream` tolerance of its parts. Here
    CE_abl − CE_clean is only 0.021 nats, so ce_loss_recovered magnifies its parts' ±2·token
    (5e-5) ~100-fold, to 5e-3 (a fixed 1e-6 once failed on another machine by 1.8e-6); one
    next token misaligned at a chunk boundary, 1 nat off, moves it by ~0.7. Explained
    variance and top-1 agreement are exact (see `assert_same_terms`)."""
    model = tiny_model(seed=5)
    tokens = tokens_for(model, 6, 5)
    token = token_tolerance(model)
    metrics = ["ce_loss_recovered", "delta_ce", "kl_div", "kl_div_score",
               "next_token_agreement", "explained_variance"]

    def values(**chunking):
        df = evaluate(model, {"d": wrap(model, "blocks.1.hook_mlp_out", "d")}, tokens, metrics,
                      ablation=("zero", "mean"), progress=False, n_boot=20, **chunking)
        return {m + o: (m, v, json.loads(p)) for m, o, v, p in
                zip(df["metric"], df["options"], df["value"], df["parts"], strict=True)}

    want = values()
    for chunking in ({"chunk_positions": 1}, {"chunk_positions": 7},
                     {"max_memory": f"{FIVE_POSITIONS}B"}):
        got = values(**chunking)
        assert got.keys() == want.keys()
        for key, (metric, value, parts) in want.items():
            exact = metric in ("next_token_agreement", "explained_variance")
            tol = 0.0 if exact else downstream(metric, value, parts, token, D_VOCAB)
            assert got[key][1] == pytest.approx(value, rel=0, abs=tol), key


@functools.cache
def task_model() -> HookedTransformer:
    """A random model reading the zoo's tokenizer, so the zoo's task prompts tokenize."""
    tokenizer = loading.load_zoo_tokenizer()
    cfg = tiny_config(seed=6, n_ctx=48, d_vocab=len(tokenizer))
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def task_terms(model, **chunking) -> dict[str, torch.Tensor]:
    prompts = [*loading.load_task("ioi")[:4], *loading.load_task("agreement")[:3]]
    d = wrap(model, "blocks.1.hook_resid_pre", "t")
    request = TaskRequest("t", (d,), ablations=("zero", "mean"), dla=True, feature_k=2)
    options = engine.EngineOptions(batch_size=4, progress=False, **chunking)
    return run_task(model, prompts, [request], options).terms["t"]


def test_task_logit_diffs_do_not_depend_on_the_chunk():
    model = task_model()
    want = task_terms(model)
    assert {"ld_clean", "ld_spliced", "ld_zero", "ld_mean", "ld_topk_zeroed"} <= set(want)
    chunk_of_2 = 2 * 3 * 8 * model.cfg.d_vocab  # three float64 tensors per position
    for chunking in ({"chunk_positions": 1}, {"chunk_positions": 3},
                     {"max_memory": chunk_of_2}):
        got = task_terms(model, **chunking)
        for name, value in want.items():
            # exact: LDs and DLAs go through two unembedding columns in float64 outside the
            # chunks, the same arithmetic in the same order whatever the chunk size
            assert torch.equal(got[name], value), name


def test_a_dictionary_at_the_final_norm_is_spliced_though_passes_stop_before_it():
    """Passes stop after the last block; the final norm, and its hooks, run after them."""
    model = tiny_model(seed=2)
    tokens = tokens_for(model, 4, 2)
    hook = "ln_final.hook_normalized"
    df = evaluate(model, {"d": wrap(model, hook, "d")}, tokens, ["delta_ce", "kl_div"],
                  exclude_special_tokens=False, progress=False, n_boot=10)
    got = dict(zip(df["metric"], df["value"], strict=True))
    clean = model(tokens).log_softmax(-1)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, hook: 0.6 * a + 0.3 * (
        torch.tanh(a).flip(-1)))]).log_softmax(-1)

    def nll(logp):
        return -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]

    # The same final residuals (the same ops on the same inputs), unembedded with another
    # matrix layout: tokens move by `f32_log_probs`. The spliced residual 0.6·x + 0.3·tanh(x)
    # has terms of at most 0.6 of the normed one's plus 0.3·Σᵢ|W_U[i, j]|. A splice that
    # the passes skipped would give 0 for both (they are 0.26 and 0.07 nats here).
    bound = logit_bound(model) + 0.3 * float(model.W_U.abs().sum(0).max())
    token = f32_log_probs(D_VOCAB, bound, f32_unembed(D_MODEL, bound))
    assert got["delta_ce"] == pytest.approx(float((nll(spliced) - nll(clean)).mean()),
                                            rel=0, abs=2 * token)
    kl = float((clean.exp() * (clean - spliced)).sum(-1).mean())
    # plus the float32 mean over the 4 × 12 positions here
    assert got["kl_div"] == pytest.approx(
        kl, rel=0, abs=f32_kl(token, kl, D_VOCAB) + f32_sum(48) * kl)


def test_a_dictionary_inside_the_unembedding_is_refused():
    model = tiny_model()
    d = as_dictionary(Scaled(), hook="unembed.hook_in", d_in=16, d_sae=16)
    with pytest.raises(ValueError, match="inside the unembedding"):
        engine.run(model, tokens_for(model, 2, 0), [engine.Request("u", (d,))])


# ---------------------------------------------------------------------------- memory

def allocations(run) -> tuple[int, int]:
    """(largest single allocation, peak of the bytes allocated and not yet freed) while
    `run()` runs, from the CPU allocator's own events as torch.profiler records them."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events()
             if e.name() == "[memory]"]
    live = peak = 0
    for size in sizes:
        live += size
        peak = max(peak, live)
    return max(sizes), peak


def big_vocab_model(tokenizer=None, n_ctx: int = 12) -> HookedTransformer:
    """One layer, d_model 16 and a 50,000-token vocabulary."""
    cfg = tiny_config(n_layers=1, seed=7, d_vocab=50_000, n_ctx=n_ctx)
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def test_the_memory_of_an_engine_run_is_bounded_by_the_budget():
    """4 sequences of 12 positions, a 50,000-token vocabulary: one batch's logits are
    9.6 MB, and unchunked the run holds several such tensors at once; under a 1 MiB budget
    (one position a chunk) every allocation together stays below it."""
    model = big_vocab_model()
    tokens = tokens_for(model, 4, 7)
    hooks = ("blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out")

    def run(**chunking):
        reqs = [engine.Request(h, (wrap(model, h, h),), ablations=("zero", "mean"),
                               noise_draws=1, by_position=True) for h in hooks]
        options = engine.EngineOptions(batch_size=4, progress=False, special_token_ids=[],
                                       stack_bytes=0, **chunking)
        return lambda: engine.run(model, tokens, reqs, options)

    logits_bytes = tokens.numel() * model.cfg.d_vocab * 4
    largest, peak = allocations(run())
    assert largest >= logits_bytes and peak >= 3 * logits_bytes  # the profiler sees them
    budget = 1 << 20
    largest, peak = allocations(run(max_memory=budget))
    assert largest <= budget // chunks.LIVE_TENSORS
    assert peak <= budget


def test_the_memory_of_a_task_run_is_bounded_by_the_budget():
    """Only the answer positions go through the unembedding, a few prompts at a time."""
    model = big_vocab_model(loading.load_zoo_tokenizer(), n_ctx=48)
    prompts = loading.load_task("ioi")[:8]
    d = wrap(model, "blocks.0.hook_resid_pre", "t")
    budget = 4 << 20

    def run():
        request = TaskRequest("t", (d,), ablations=("zero",), dla=True)
        options = engine.EngineOptions(batch_size=8, progress=False, max_memory=budget)
        run_task(model, prompts, [request], options)

    largest, peak = allocations(run)
    assert largest <= budget // 3 and peak <= budget


# ---------------------------------------------------------------------------- sizes

def test_docstring_examples():
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(chunks):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


@pytest.mark.parametrize(("text", "size"), [
    ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("2GiB", 2 * 2**30), ("1.5 gib", 3 * 2**29),
    ("4096", 4096), (4096, 4096), ("3K", 3000), ("64kib", 65536), ("10b", 10), (None, None),
])
def test_sizes_are_parsed(text, size):
    assert chunks.parse_size(text) == size


@pytest.mark.parametrize("bad", ["0", 0, -5, "-1GB", "12XB", "1.5", "", "GiB", "2 GB B",
                                 True, 1.5, "1e9"])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="memory size"):
        chunks.parse_size(bad)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "7"])
def test_bad_chunk_positions_are_refused(bad):
    with pytest.raises(ValueError, match="chunk positions"):
        engine.EngineOptions(chunk_positions=bad)


def test_evaluate_refuses_a_bad_size_before_any_work():
    model = tiny_model()
    with pytest.raises(ValueError, match="memory size 'lots'"):
        evaluate(model, {"d": wrap(model, "blocks.0.hook_resid_pre", "d")},
                 tokens_for(model, 2, 0), ["l0"], max_memory="lots", progress=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--saebench-max-memory=lots"], "--saebench-max-memory: memory size 'lots': expected"),
    (["--saebench-max-memory", "0"], "--saebench-max-memory: memory size '0'"),
    (["--saebench-max-memory=2QB"], "--saebench-max-memory: memory size '2QB'"),
    (["--saebench-chunk-positions=0"], "--saebench-chunk-positions: chunk positions 0"),
])
def test_bad_options_are_a_usage_error(pytester, args, message):
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in "\n".join(result.errlines)


def test_good_options_reach_the_settings(pytester):
    pytester.makeconftest("""
        import pytest

        def pytest_collection_finish(session):
            from saebench.plugin import STATE
            s = session.config.stash[STATE].settings
            print("SETTINGS", s.max_memory, s.chunk_positions)
    """)
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", "--saebench-max-memory=2GiB",
                                "--saebench-chunk-positions=64")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result.stdout.fnmatch_lines(["SETTINGS 2147483648 64"])
