"""Splicing dictionaries into a forward pass, checked against sae_lens' HookedSAETransformer
and against hand-written hooks, on a tiny random model and tiny random dictionaries."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens import (
    AbsTopKSAE,
    AbsTopKSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    HookedSAETransformer,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata
from tolerances import f32_error, f32_sum
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saebench import loading
from saebench.splice import (
    Dictionary,
    FeatureEdit,
    ablation_hooks,
    as_dictionary,
    hook_layer,
    position_mask,
    random_like,
    splice_hooks,
)

CFG = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=12, d_vocab=23,
           act_fn="gelu", normalization_type="LN", seed=0)
WIDTH = {"hook_resid_pre": 16, "hook_mlp_out": 16, "hook_attn_out": 16, "mlp.hook_post": 32,
         "attn.hook_z": 16, "ln2.hook_normalized": 16}
ARCHS = {
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 5}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "gated": (GatedSAE, GatedSAEConfig, {}),
    "abstopk": (AbsTopKSAE, AbsTopKSAEConfig, {"k": 5}),
}


@pytest.fixture(scope="module", autouse=True)
def _small_torch():
    """No autograd, one thread (tiny matrices; threads only contend), restored afterwards."""
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer(HookedTransformerConfig(**CFG))


@pytest.fixture(scope="module")
def sae_model(model) -> HookedSAETransformer:
    reference = HookedSAETransformer(HookedTransformerConfig(**CFG))
    reference.load_state_dict(model.state_dict())
    return reference


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, CFG["d_vocab"], (3, CFG["n_ctx"]),
                         generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tol(model, tokens) -> float:
    """How far the logits of two float32 passes computing the same function in other orders
    (sae_lens' hooks or hand-written ones against ours, a pass started mid-model, a batch
    of one row) may differ: `f32_error`, ~3e-6 here. A splice at the wrong hook or position,
    or a wrong reconstruction, moves them by more than 10 × that, as the tests check."""
    return f32_error(model, tokens)


def moved(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest elementwise difference: what a bug-sized change must exceed."""
    return float((a - b).abs().max())


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights of a plausible scale (thresholds small and positive)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        values = torch.randn(param.shape, generator=gen)
        if name == "threshold":
            values = values.abs() * 0.05
        elif param.dim() == 2:
            values = values / param.shape[0] ** 0.5
        else:
            values = values * 0.1
        param.data.copy_(values)
    return module


def make_sae(arch: str, hook: str, seed: int = 0, d_sae: int = 24, **cfg):
    cls, cfg_cls, extra = ARCHS[arch]
    d_in = cfg.pop("d_in", WIDTH[hook.split(".", 2)[2]])
    config = cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook),
                     **extra, **cfg)
    return randomize(cls(config), seed)


def make_transcoder(layer: int = 0, cls=Transcoder, cfg_cls=TranscoderConfig, seed: int = 3):
    config = cfg_cls(d_in=16, d_sae=24, d_out=16, apply_b_dec_to_input=False,
                     metadata=SAEMetadata(hook_name=f"blocks.{layer}.ln2.hook_normalized",
                                          hook_name_out=f"blocks.{layer}.hook_mlp_out"))
    return randomize(cls(config), seed)


def capture(store: dict, key: str):
    """A hook that stores the activation it sees (placed after the splice hooks)."""
    def hook_fn(act, hook):
        store[key] = act.clone()
    return hook_fn


# --- independent reference: sae_lens' HookedSAETransformer -------------------------------

SITES = [("standard", "blocks.0.hook_resid_pre"), ("standard", "blocks.1.hook_mlp_out"),
         ("standard", "blocks.0.hook_attn_out"), ("standard", "blocks.1.mlp.hook_post"),
         ("standard", "blocks.0.attn.hook_z"), ("topk", "blocks.1.hook_resid_pre"),
         ("jumprelu", "blocks.0.hook_mlp_out"), ("gated", "blocks.1.hook_attn_out"),
         ("abstopk", "blocks.1.attn.hook_z")]


@pytest.mark.parametrize(("arch", "hook"), SITES)
def test_matches_hooked_sae_transformer(model, sae_model, tokens, tol, arch, hook):
    extra = {"reshape_activations": "hook_z"} if hook.endswith("hook_z") else {}
    sae = make_sae(arch, hook, **extra)
    d = as_dictionary(sae)
    assert (d.name, d.read_hook, d.write_hook, d.d_sae) == (hook, hook, hook, 24)
    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
    reference = sae_model.run_with_saes(tokens, saes=[sae])
    torch.testing.assert_close(spliced, reference, atol=tol, rtol=0)
    assert moved(spliced, clean) > 10 * tol

    record: dict = {}
    with_error = model.run_with_hooks(
        tokens, fwd_hooks=splice_hooks([d], error_term=True, record=record))
    assert torch.equal(with_error, clean)  # exact: no hook runs, the clean arithmetic
    assert set(record[d.name]) == {"x", "target", "recon", "feats", "out"}
    assert splice_hooks([d], error_term=True) == []  # nothing to do, so no pass-time work
    reference = sae_model.run_with_saes(tokens, saes=[sae], use_error_term=True)
    torch.testing.assert_close(with_error, reference, atol=tol, rtol=0)


def test_hook_z_reshaping_sae_is_left_as_found(model, sae_model, tokens, tol):
    hook = "blocks.0.attn.hook_z"
    native = make_sae("standard", hook, reshape_activations="hook_z")
    flat = make_sae("standard", hook)
    flat.load_state_dict(native.state_dict())
    before = native.reshape_fn_in
    spliced = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([as_dictionary(native)]))
    assert native.hook_z_reshaping_mode and native.reshape_fn_in is before
    assert native.d_head is None
    reference = sae_model.run_with_saes(tokens, saes=[native])  # sets native.d_head
    assert native.d_head == CFG["d_head"]
    again = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([as_dictionary(native)]))
    assert native.d_head == CFG["d_head"] and native.hook_z_reshaping_mode
    by_flat = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([as_dictionary(flat)]))
    torch.testing.assert_close(spliced, reference, atol=tol, rtol=0)
    # exact: the same weights on the same flattened activation, the same arithmetic
    assert torch.equal(spliced, again) and torch.equal(spliced, by_flat)

    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    z = cache[hook]
    recon, feats = as_dictionary(native).reconstruct(z)
    assert recon.shape == z.shape and feats.shape == (3, CFG["n_ctx"], 24)
    torch.testing.assert_close(recon, native.decode(native.encode(z)), rtol=0,
                               atol=f32_error(native, z))


def test_several_dictionaries_at_once(model, sae_model, tokens, tol):
    a = make_sae("standard", "blocks.0.hook_resid_pre", seed=1)
    b = make_sae("topk", "blocks.1.hook_mlp_out", seed=2)
    hooks = splice_hooks([as_dictionary(a), as_dictionary(b)])
    spliced = model.run_with_hooks(tokens, fwd_hooks=hooks)
    reference = sae_model.run_with_saes(tokens, saes=[a, b])
    torch.testing.assert_close(spliced, reference, atol=tol, rtol=0)
    alone = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([as_dictionary(a)]))
    assert moved(spliced, alone) > 10 * tol


def test_two_dictionaries_on_one_hook_is_an_error():
    hook = "blocks.0.hook_resid_pre"
    a = as_dictionary(make_sae("standard", hook, seed=1), name="a")
    b = as_dictionary(make_sae("standard", hook, seed=2), name="b")
    with pytest.raises(ValueError, match="write hook"):
        splice_hooks([a, b])
    with pytest.raises(ValueError, match="name"):
        splice_hooks([a, as_dictionary(make_sae("standard", "blocks.1.hook_resid_pre"), name="a")])


# --- transcoders -------------------------------------------------------------------------

@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_matches_manual_two_hook_splice(model, sae_model, tokens, tol, skip):
    tc = (make_transcoder(cls=SkipTranscoder, cfg_cls=SkipTranscoderConfig) if skip
          else make_transcoder())
    d = as_dictionary(tc)
    assert (d.read_hook, d.write_hook) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    assert d.name == "blocks.0.ln2.hook_normalized->blocks.0.hook_mlp_out"
    seen: dict = {}

    def read(act, hook):
        seen["x"] = act

    def write(act, hook):
        return tc(seen["x"])  # forward() includes the skip path

    manual = model.run_with_hooks(tokens, fwd_hooks=[(d.read_hook, read), (d.write_hook, write)])
    spliced = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
    torch.testing.assert_close(spliced, manual, atol=tol, rtol=0)
    if not skip:
        reference = sae_model.run_with_saes(tokens, saes=[tc])
        torch.testing.assert_close(spliced, reference, atol=tol, rtol=0)
    record: dict = {}
    clean = model(tokens)
    assert torch.equal(clean, model.run_with_hooks(  # exact: no hook runs
        tokens, fwd_hooks=splice_hooks([d], error_term=True, record=record)))
    rec = record[d.name]
    torch.testing.assert_close(rec["recon"], tc(rec["x"]), rtol=0, atol=f32_error(tc, rec["x"]))


class ProtocolSkipTranscoder(torch.nn.Module):
    """The saebench protocol: read/write hooks as tuples, `decode(features, x)` with the
    skip term inside (so the adapter must not add `W_skip` a second time)."""

    read_hooks, write_hooks = ("blocks.0.ln2.hook_normalized",), ("blocks.0.hook_mlp_out",)

    def __init__(self, seed: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d_in = self.d_out = 16
        self.d_sae = 24
        self.W_enc = torch.nn.Parameter(torch.randn(16, 24, generator=g))
        self.W_dec = torch.nn.Parameter(torch.randn(24, 16, generator=g))
        self.W_skip = torch.nn.Parameter(torch.randn(16, 16, generator=g))

    def encode(self, x):
        return torch.relu(x @ self.W_enc)

    def decode(self, features, x):
        return features @ self.W_dec + x @ self.W_skip.T


def test_a_protocol_decode_gets_the_input_and_its_skip_once(model, tokens):
    tc = ProtocolSkipTranscoder()
    d = as_dictionary(tc)
    assert (d.read_hooks, d.write_hooks, d.d_sae) == (tc.read_hooks, tc.write_hooks, 24)
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.0.ln2.hook_normalized"]
    expected = torch.relu(x @ tc.W_enc) @ tc.W_dec + x @ tc.W_skip.T
    # exact: the adapter calls the same encode and decode on the same x
    assert torch.equal(d.reconstruct(x)[0], expected)
    with pytest.raises(ValueError, match="needs the input activation"):
        d.decode(d.encode(x))
    clean = model(tokens)
    assert torch.equal(clean, model.run_with_hooks(  # exact: no hook runs
        tokens, fwd_hooks=splice_hooks([d], error_term=True, record={})))
    assert moved(clean, model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))) > 1


def test_a_dictionary_writing_several_hooks_returns_one_reconstruction_each(model, tokens):
    class TwoWrites(ProtocolSkipTranscoder):
        write_hooks = ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out")

        def decode(self, features, x):
            out = super().decode(features, x)
            return out, 2 * out

    d = as_dictionary(TwoWrites())
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.0.ln2.hook_normalized"]
    first, second = d.decode(d.encode(x), x=x)
    assert torch.equal(second, 2 * first)  # exact: doubling is exact
    with pytest.raises(ValueError, match="writes 2 hooks"):
        d.write_hook  # noqa: B018 -- the property raises
    seen: dict = {}
    model.run_with_hooks(tokens, fwd_hooks=[*splice_hooks([d]),
                                            ("blocks.1.hook_mlp_out", capture(seen, "w1"))])
    # exact: the pass reads the same x at the same hook and decodes it the same way
    assert torch.equal(seen["w1"], 2 * first)


def test_write_before_read_is_an_error(model, tokens):
    tc = make_transcoder(layer=0)
    d = as_dictionary(tc, hook_out="blocks.1.hook_mlp_out")
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(RuntimeError, match="before the read hook"):
        model.run_with_hooks(cache["blocks.1.hook_resid_pre"], start_at_layer=1,
                             fwd_hooks=splice_hooks([d]))


# --- passes started mid-model ----------------------------------------------------------

def test_hooks_work_in_a_pass_started_mid_model(model, tokens, tol):
    sae = as_dictionary(make_sae("standard", "blocks.1.hook_resid_pre"))
    tc = as_dictionary(make_transcoder(layer=1))
    edits = [FeatureEdit(sae.name, (0, 1))]
    _, cache = model.run_with_cache(tokens)
    mask = position_mask(torch.tensor([3, 7, -1]), *tokens.shape)
    for error_term in (False, True):
        kw = dict(error_term=error_term, mask=mask, edits=edits)
        full = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([sae, tc], **kw))
        partial = model.run_with_hooks(cache["blocks.1.hook_resid_pre"], start_at_layer=1,
                                       fwd_hooks=splice_hooks([sae, tc], **kw))
        torch.testing.assert_close(partial, full, atol=tol, rtol=0)
        assert moved(full, cache["unembed.hook_out"]) > 10 * tol


# --- positions ---------------------------------------------------------------------------

def test_splicing_at_one_position_leaves_earlier_positions_bit_identical(model, tokens, tol):
    """Exact before the spliced position: causal attention never reads a later position, and
    each row of each matrix product is computed from its own values."""
    d = as_dictionary(make_sae("standard", "blocks.0.hook_resid_pre"))
    clean = model(tokens)
    for p in (0, 5, -3):
        out = model.run_with_hooks(
            tokens, fwd_hooks=splice_hooks([d], mask=position_mask(p, *tokens.shape)))
        p = p % tokens.shape[1]
        assert torch.equal(out[:, :p], clean[:, :p])
        assert moved(out[:, p], clean[:, p]) > 10 * tol


def test_per_row_positions(model, tokens, tol):
    d = as_dictionary(make_sae("standard", "blocks.1.hook_mlp_out"))
    rows = torch.tensor([2, 5, -1])
    mask = position_mask(rows, *tokens.shape)
    assert mask.sum(-1).tolist() == [1, 1, 1] and mask[2, -1]
    clean = model(tokens)
    batched = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d], mask=mask))
    for i, p in enumerate(rows.tolist()):
        single = model.run_with_hooks(tokens[i:i + 1], fwd_hooks=splice_hooks(
            [d], mask=position_mask(p, 1, tokens.shape[1])))
        torch.testing.assert_close(batched[i:i + 1], single, atol=tol, rtol=0)
        p = p % tokens.shape[1]
        assert torch.equal(batched[i, :p], clean[i, :p])  # exact, as above


def test_position_mask_forms_and_errors():
    assert position_mask(None, 2, 3).all()
    assert position_mask([0, -1], 2, 3).tolist() == [[True, False, True]] * 2
    assert torch.equal(position_mask(-1, 2, 4), position_mask(3, 2, 4))
    assert torch.equal(position_mask(torch.tensor(1), 2, 4), position_mask(1, 2, 4))
    bool_mask = torch.tensor([[True, False], [False, False]])
    assert position_mask(bool_mask, 2, 2) is not None
    for bad in (4, -5, [0, 9], torch.tensor([0, 4])):
        with pytest.raises(IndexError, match="out of range"):
            position_mask(bad, 2, 4)
    with pytest.raises(ValueError, match=r"shape \[batch\]"):
        position_mask(torch.tensor([0, 1, 2]), 2, 4)
    with pytest.raises(TypeError):
        position_mask(torch.tensor([0.5, 1.0]), 2, 4)


def test_mask_shape_mismatch_is_an_error(model, tokens):
    d = as_dictionary(make_sae("standard", "blocks.0.hook_resid_pre"))
    with pytest.raises(ValueError, match="does not match"):
        model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d], mask=position_mask(0, 2, 5)))


# --- feature edits -----------------------------------------------------------------------

def manual_edit_hook(sae, feature: int, value: float, error_term: bool = False):
    def hook_fn(act, hook):
        feats = sae.encode(act)
        edited = feats.clone()
        edited[..., feature] = value
        if error_term:
            return act + (sae.decode(edited) - sae.decode(feats))
        return sae.decode(edited)
    return hook_fn


def test_feature_edits(model, tokens, tol):
    hook = "blocks.0.hook_resid_pre"
    sae = make_sae("standard", hook)
    sae.b_enc.data[7] = -1e3  # feature 7 never fires
    d = as_dictionary(sae)
    record: dict = {}
    plain = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d], record=record))
    feats = record[hook]["feats"]
    assert (feats[..., 7] == 0).all()
    firing = int((feats > 0).float().sum((0, 1)).argmax())
    dead = model.run_with_hooks(tokens, fwd_hooks=splice_hooks(
        [d], edits=[FeatureEdit(hook, (7,))]))
    assert torch.equal(dead, plain)  # exact: zeroing a 0 changes nothing
    for value in (0.0, 3.0):
        edits = [FeatureEdit(hook, (firing,), value)]
        out = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d], edits=edits))
        manual = model.run_with_hooks(tokens, fwd_hooks=[(hook, manual_edit_hook(sae, firing,
                                                                                value))])
        torch.testing.assert_close(out, manual, atol=tol, rtol=0)
        assert moved(out, plain) > 10 * tol
    edits = [FeatureEdit(hook, (firing,)), FeatureEdit("another dictionary", (0,))]
    recon, edited = d.reconstruct(record[hook]["x"], edits=edits)
    assert (edited[..., firing] == 0).all()
    # one affine map of 24 features: two orders differ by f32_sum(24 + 2) of its terms
    terms = edited.abs() @ sae.W_dec.abs() + sae.b_dec.abs()
    torch.testing.assert_close(recon, sae.decode(edited), rtol=0,
                               atol=f32_sum(24 + 2) * float(terms.max()))


def test_edit_with_error_term_matches_manual_and_sae_lens(model, sae_model, tokens, tol):
    hook = "blocks.1.hook_resid_pre"
    sae = make_sae("jumprelu", hook)
    d = as_dictionary(sae)
    feature = 4
    clean = model(tokens)
    out = model.run_with_hooks(tokens, fwd_hooks=splice_hooks(
        [d], error_term=True, edits=[FeatureEdit(hook, (feature,))]))
    manual = model.run_with_hooks(tokens, fwd_hooks=[(hook, manual_edit_hook(sae, feature, 0.0,
                                                                            error_term=True))])
    torch.testing.assert_close(out, manual, atol=tol, rtol=0)
    assert moved(out, clean) > 10 * tol

    def zero_feature(acts, hook):
        acts[..., feature] = 0
        return acts

    with sae_model.saes(saes=[sae], use_error_term=True):
        reference = sae_model.run_with_hooks(
            tokens, fwd_hooks=[(f"{hook}.hook_sae_acts_post", zero_feature)])
    torch.testing.assert_close(out, reference, atol=tol, rtol=0)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_run_time_normalising_sae(model, sae_model, tokens, tol, norm):
    """sae_lens keeps the input's scale from encode() for the next decode() and deletes it
    there, so every decode here re-derives it from x (two decodes happen with edits)."""
    hook = "blocks.0.hook_resid_pre"
    sae = make_sae("standard", hook, normalize_activations=norm)
    d = as_dictionary(sae)
    spliced = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
    torch.testing.assert_close(spliced, sae_model.run_with_saes(tokens, saes=[sae]),
                               atol=tol, rtol=0)

    def zero_feature(acts, hook):
        acts[..., 2] = 0
        return acts

    out = model.run_with_hooks(tokens, fwd_hooks=splice_hooks(
        [d], error_term=True, edits=[FeatureEdit(hook, (2,))]))
    with sae_model.saes(saes=[sae], use_error_term=True):
        reference = sae_model.run_with_hooks(
            tokens, fwd_hooks=[(f"{hook}.hook_sae_acts_post", zero_feature)])
    torch.testing.assert_close(out, reference, atol=tol, rtol=0)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="pass x="):
        d.decode(d.encode(x), x)
    torch.testing.assert_close(d.decode(d.encode(x * 3), x, x=x), sae(x), rtol=0,
                               atol=rescaled_input_tolerance(sae, x, norm))


def rescaled_input_tolerance(sae, x: torch.Tensor, norm: str) -> float:
    """How far decoding features of 3x with x's scale lands from sae(x). constant_norm_rescale
    is scale-free, so only rounding differs: `f32_error` of the SAE, measured on 256 rows
    like x (a stable largest error; x's own 2 rows give too few). layer_norm divides by
    std + 1e-5, so 3x normalises to (1 − δ)·x̂, δ = 2e-5 / (3·std + 1e-5), moving the input by
    δ·‖x̂‖, ‖x̂‖ ≤ √d_in; the SAE (ReLU between two linear maps) moves its output by at most
    ‖W_enc‖₂·‖W_dec‖₂ times that, and the output is scaled back by std + 1e-5. A decode
    with 3x's scale would be off by a factor of 3."""
    rounding = f32_error(sae, torch.randn(256, 16, generator=torch.Generator().manual_seed(1)))
    if norm != "layer_norm":
        return rounding
    std = x.std(dim=-1)
    shift = (2e-5 / (3 * std + 1e-5) * 16**0.5 * (std + 1e-5)).max()
    gain = torch.linalg.matrix_norm(sae.W_enc, 2) * torch.linalg.matrix_norm(sae.W_dec, 2)
    return rounding + float(shift * gain)


def test_edit_errors():
    d = as_dictionary(make_sae("standard", "blocks.0.hook_resid_pre"))
    with pytest.raises(IndexError, match="outside"):
        splice_hooks([d], edits=[FeatureEdit(d.name, (24,))])
    f = as_dictionary(lambda x: x, hook="blocks.0.hook_resid_pre", name="identity")
    with pytest.raises(ValueError, match="encode/decode"):
        splice_hooks([f], edits=[FeatureEdit("identity", (0,))])
    assert FeatureEdit("x", 3).features == (3,)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_outside_the_mask_the_clean_activation_is_kept(model, tokens, data):
    hook = "blocks.0.hook_mlp_out"
    d = as_dictionary(make_sae("standard", hook))
    batch, seq = tokens.shape
    cells = data.draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    mask = torch.tensor(cells).reshape(batch, seq)
    features = data.draw(st.lists(st.integers(0, 23), max_size=5, unique=True))
    value = data.draw(st.sampled_from([0.0, 2.5]))
    error_term = data.draw(st.booleans())
    edits = [FeatureEdit(hook, tuple(features), value)] if features else []
    seen: dict = {}
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    hooks = splice_hooks([d], error_term=error_term, mask=mask, edits=edits)
    model.run_with_hooks(tokens, fwd_hooks=[*hooks, (hook, capture(seen, "out"))])
    assert torch.equal(seen["out"][~mask], cache[hook][~mask])
    if not error_term:
        recon, _ = d.reconstruct(cache[hook], edits=edits)
        assert torch.equal(seen["out"][mask], recon[mask])


# --- other kinds of dictionary -----------------------------------------------------------

class TupleAutoencoder(torch.nn.Module):
    """Older research code: forward returns (loss, x_reconstruct, acts, l2, l1)."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    def forward(self, x):
        acts = self.sae.encode(x)
        recon = self.sae.decode(acts)
        return recon.sum(), recon, acts, recon.pow(2).sum(), acts.abs().sum()


class EncodeDecode:
    """A minimal encode/decode dictionary with a sae_lens-style cfg and weights."""

    def __init__(self, sae, hook):
        self.cfg = SimpleNamespace(hook_name=hook)
        self.W_enc, self.W_dec = sae.W_enc.detach(), sae.W_dec.detach()
        self.b_enc, self.b_dec = sae.b_enc.detach(), sae.b_dec.detach()

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def test_callables_and_encode_decode_objects(model, tokens, tol):
    hook = "blocks.0.hook_resid_pre"
    sae = make_sae("standard", hook)
    expected = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([as_dictionary(sae)]))
    wrapped = TupleAutoencoder(sae)
    variants = [
        as_dictionary(lambda x: sae(x), hook=hook),
        as_dictionary(wrapped, hook=hook, output=1),
        as_dictionary(lambda x: {"recon": sae(x)}, hook=hook, output="recon"),
        as_dictionary(lambda x: SimpleNamespace(recon=sae(x)), hook=hook, output="recon"),
        as_dictionary(EncodeDecode(sae, hook)),
    ]
    assert [v.kind for v in variants] == ["callable"] * 4 + ["encode_decode"]
    assert variants[1].d_sae is None and variants[4].d_sae == 24 and variants[4].d_in == 16
    for d in variants:
        out = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
        torch.testing.assert_close(out, expected, atol=tol, rtol=0)
    with pytest.raises(ValueError, match="encode/decode"):
        variants[1].encode(torch.zeros(16))
    with pytest.raises(ValueError, match="output="):
        model.run_with_hooks(tokens, fwd_hooks=splice_hooks([as_dictionary(wrapped, hook=hook)]))
    with pytest.raises(ValueError, match="no element 'nope'"):
        as_dictionary(wrapped, hook=hook, output="nope").reconstruct(torch.zeros(2, 16))
    assert as_dictionary(variants[4], name="renamed").name == "renamed"


def test_hook_z_for_a_callable_is_flattened_and_restored(model, tokens, tol):
    hook = "blocks.0.attn.hook_z"
    sae = make_sae("standard", hook)
    d = as_dictionary(lambda x: sae(x), hook=hook)
    expected = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([as_dictionary(sae)]))
    torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d])),
                               expected, atol=tol, rtol=0)


def test_missing_hook_and_bad_objects_are_errors():
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=8))
    with pytest.raises(ValueError, match="no read hook"):
        as_dictionary(sae)
    hook = "blocks.0.hook_resid_pre"
    assert as_dictionary(sae, hook=hook).write_hook == hook
    with pytest.raises(ValueError, match="no read hook"):
        as_dictionary(lambda x: x)
    with pytest.raises(TypeError, match="encode/decode"):
        as_dictionary(object(), hook="blocks.0.hook_resid_pre")
    head = StandardSAE(StandardSAEConfig(d_in=8, d_sae=8, metadata=SAEMetadata(
        hook_name="blocks.0.attn.hook_z", hook_head_index=1)))
    with pytest.raises(ValueError, match="hook_head_index"):
        as_dictionary(head)


def test_width_mismatch_names_dictionary_hook_and_widths(model, tokens):
    d = as_dictionary(make_sae("standard", "blocks.0.hook_resid_pre", d_in=20), name="wide")
    with pytest.raises(ValueError, match=r"'wide'.*d_in=20.*'blocks\.0\.hook_resid_pre'.*16"):
        model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
    z = make_sae("standard", "blocks.0.attn.hook_z", d_in=12)
    with pytest.raises(ValueError, match=r"d_in=12.*hook_z.*width 16"):
        model.run_with_hooks(tokens, fwd_hooks=splice_hooks([as_dictionary(z)]))
    tc = as_dictionary(make_transcoder(), hook_out="blocks.0.mlp.hook_post")
    with pytest.raises(ValueError, match=r"writes width 16 at 'blocks\.0\.mlp\.hook_post'.*32"):
        model.run_with_hooks(tokens, fwd_hooks=splice_hooks([tc]))


# --- ablation and hook_layer -------------------------------------------------------------

def test_ablation_hooks(model, tokens):
    seen: dict = {}
    _, cache = model.run_with_cache(tokens)
    mask = position_mask([1, 4], *tokens.shape)
    resid, z = "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"

    def run(hook, kind, **kw):
        model.run_with_hooks(tokens, fwd_hooks=[*ablation_hooks(hook, kind, **kw),
                                                (hook, capture(seen, hook))])
        return seen[hook]

    assert (run(resid, "zero") == 0).all()
    out = run(resid, "zero", mask=mask)
    assert (out[mask] == 0).all() and torch.equal(out[~mask], cache[resid][~mask])
    mean = torch.arange(16.0)
    assert torch.equal(run(resid, "mean", mean=mean, mask=mask)[mask], mean.expand(6, 16))
    per_pos = torch.randn(CFG["n_ctx"] + 4, 16)
    assert torch.equal(run(resid, "mean", mean=per_pos)[1], per_pos[: CFG["n_ctx"]])
    head_mean = torch.randn(2, 8)
    out = run(z, "mean", mean=head_mean, mask=mask)
    assert torch.equal(out[mask], head_mean.expand(6, 2, 8))
    assert torch.equal(out[~mask], cache[z][~mask])
    with pytest.raises(ValueError, match="does not broadcast"):
        run(resid, "mean", mean=torch.zeros(5))
    with pytest.raises(ValueError, match="unknown ablation kind"):
        ablation_hooks(resid, "resample")
    with pytest.raises(ValueError, match="mean="):
        ablation_hooks(resid, "mean")


def test_hook_layer():
    assert hook_layer("blocks.3.attn.hook_z") == 3
    assert hook_layer("blocks.11.hook_resid_post") == 11
    assert hook_layer("hook_embed") == hook_layer("hook_pos_embed") == 0
    for name in ("ln_final.hook_normalized", "unembed.hook_out", "blocks.x.hook_resid_pre"):
        with pytest.raises(ValueError, match="not inside a transformer block"):
            hook_layer(name)


def test_dictionary_is_a_frozen_value():
    d = as_dictionary(make_sae("standard", "blocks.0.hook_resid_pre"))
    assert isinstance(d, Dictionary) and as_dictionary(d) is not None
    with pytest.raises(AttributeError):
        d.name = "other"


def test_random_like_keeps_shape_and_hooks_and_draws_new_weights_per_seed():
    real = as_dictionary(loading.load_zoo_dictionary("resid-L2-topk16"), name="d")
    first, again, other = (random_like(real, seed) for seed in (0, 0, 1))
    assert type(first.module) is type(real.module)
    assert (first.name, first.read_hook, first.write_hook, first.d_in, first.d_sae) == \
        (real.name, real.read_hook, real.write_hook, real.d_in, real.d_sae)
    assert first.module.cfg.k == real.module.cfg.k
    assert torch.equal(first.module.W_dec, again.module.W_dec)
    assert not torch.equal(first.module.W_dec, other.module.W_dec)
    # new weights, apart from the trained ones by their own size, not by rounding
    assert not torch.allclose(first.module.W_dec, real.module.W_dec)


def test_random_like_of_a_plain_module_permutes_each_weight():
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = torch.nn.Parameter(torch.randn(8, 32))
            self.dec = torch.nn.Parameter(torch.randn(32, 8))

        def encode(self, x):
            return torch.relu(x @ self.enc)

        def decode(self, f):
            return f @ self.dec

    real = as_dictionary(Plain(), name="p", hook="blocks.0.hook_resid_pre", d_sae=32)
    random = random_like(real, seed=3)
    for mine, theirs in zip(real.module.parameters(), random.module.parameters(), strict=True):
        assert mine.shape == theirs.shape and not torch.equal(mine, theirs)
        assert torch.equal(mine.flatten().sort().values, theirs.flatten().sort().values)
    with pytest.raises(ValueError, match="no weights to randomise"):
        random_like(as_dictionary(lambda x: x, name="f", hook="blocks.0.hook_resid_pre"), 0)
