"""`circuit_tracer:` dictionaries: transcoder sets and cross-layer transcoders in
circuit-tracer's on-disk format, spliced as replacement models (every layer at once, errors
compounding), checked against a float64 re-implementation of the documented equations."""

from __future__ import annotations

import functools
import re
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from saebench import engine, resolve, results
from saebench.splice import as_dictionary, splice_hooks
from saebench.suite import DictionarySpec, SuiteError
from saebench.zoo import formats
from saebench.zoo.coder import Coder

N_LAYERS, D_MODEL, D_TC = 4, 128, 48
READ, WRITE = "ln2.hook_normalized", "hook_mlp_out"


def _layer(g: torch.Generator, n_out: int) -> dict[str, torch.Tensor]:
    return {"W_enc": torch.randn(D_TC, D_MODEL, generator=g) * 0.2,
            "b_enc": torch.randn(D_TC, generator=g) * 0.1,
            "W_dec": torch.randn(D_TC, n_out, D_MODEL, generator=g) * 0.05,
            "b_dec": torch.randn(D_MODEL, generator=g) * 0.05,
            "threshold": torch.rand(D_TC, generator=g) * 0.2}


def _weights(kind: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [_layer(g, 1 if kind == "transcoder_set" else N_LAYERS - i) for i in range(N_LAYERS)]


def _write(directory: Path, kind: str, weights: list[dict[str, torch.Tensor]],
           jump: bool = True) -> Path:
    """A directory as circuit-tracer reads it (config.yaml + per-layer safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(
        f"model_kind: {kind}\nfeature_input_hook: {READ}\nfeature_output_hook: {WRITE}\n")
    for i, w in enumerate(weights):
        if kind == "transcoder_set":
            tensors = {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "W_dec": w["W_dec"][:, 0],
                       "b_dec": w["b_dec"]}
            if jump:
                tensors["activation_function.threshold"] = w["threshold"]
            save_file(tensors, str(directory / f"layer_{i}.safetensors"))
        else:
            tensors = {f"W_enc_{i}": w["W_enc"], f"b_enc_{i}": w["b_enc"],
                       f"b_dec_{i}": w["b_dec"]}
            if jump:
                tensors[f"threshold_{i}"] = w["threshold"]
            save_file(tensors, str(directory / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": w["W_dec"]}, str(directory / f"W_dec_{i}.safetensors"))
    return directory


def _jump(pre: torch.Tensor, w: dict) -> torch.Tensor:
    """JumpReLU: pre where it exceeds the layer's threshold, else 0."""
    return pre * (pre > w["threshold"].double())


def _relu(pre: torch.Tensor, w: dict) -> torch.Tensor:
    return pre.clamp_min(0)


def _topk(pre: torch.Tensor, w: dict, k: int = 0) -> torch.Tensor:
    """circuit-tracer's TopK: the k largest pre-activations of each row kept as they are
    (negative ones too: no ReLU), the others 0; by sorting each row."""
    order = pre.argsort(dim=-1, descending=True, stable=True)[..., :k]
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, order, True)
    return torch.where(keep, pre, 0.0)


def _reference_outputs(weights, kind: str, inputs: list[torch.Tensor], act=_jump
                       ) -> list[torch.Tensor]:
    """Each layer's MLP-output reconstruction from each layer's input, in float64, by the
    documented equations (f_i = act(x_i W_encᵀ + b_enc); out_j = b_dec_j + Σ_{i≤j} f_i W_dec
    + x_j W_skipᵀ with a skip connection)."""
    feats = []
    for w, x in zip(weights, inputs, strict=True):
        feats.append(act(x.double() @ w["W_enc"].double().T + w["b_enc"].double(), w))
    outs = []
    for j in range(N_LAYERS):
        sources = [j] if kind == "transcoder_set" else range(j + 1)
        out = weights[j]["b_dec"].double().clone()
        for i in sources:
            out = out + feats[i] @ weights[i]["W_dec"][:, j - i if kind != "transcoder_set"
                                                       else 0].double()
        if "W_skip" in weights[j]:
            out = out + inputs[j].double() @ weights[j]["W_skip"].double().T
        outs.append(out)
    return outs


def _parts(directory: Path, name: str = "ct", **args):
    spec = DictionarySpec(name, "circuit_tracer", str(directory), args=args)
    return resolve.adapt(spec, resolve.resolve_dictionary(spec, device="cpu"))


@pytest.fixture(scope="module")
def tokens():
    from saebench import loading

    return loading.load_heldout_tokens()[:6, :48]


@pytest.mark.parametrize("kind", ["transcoder_set", "cross_layer_transcoder"])
def test_probe_reads_hooks_widths_and_identity(tmp_path, kind):
    directory = _write(tmp_path / kind, kind, _weights(kind))
    spec = DictionarySpec("ct", "circuit_tracer", str(directory))
    info = resolve.probe_dictionary(spec)
    assert info.read_hooks == tuple(f"blocks.{i}.{READ}" for i in range(N_LAYERS))
    assert info.write_hooks == tuple(f"blocks.{i}.{WRITE}" for i in range(N_LAYERS))
    assert (info.d_in, info.d_out, info.d_sae) == (D_MODEL, D_MODEL, N_LAYERS * D_TC)
    assert not info.single and info.architecture == f"circuit_tracer-{kind}"
    assert len(info.identity["sha256"]) == 16


@pytest.mark.parametrize("kind", ["transcoder_set", "cross_layer_transcoder"])
@pytest.mark.parametrize("jump", [True, False])
def test_parts_reconstruct_as_the_documented_equations(tmp_path, zoo_model, tokens, kind,
                                                       jump):
    weights = _weights(kind)
    parts = _parts(_write(tmp_path / kind, kind, weights, jump))
    assert [p.name for p in parts] == [f"ct/L{i}" for i in range(N_LAYERS)]
    assert {p.part_of for p in parts} == {"ct"}
    _assert_parts_reconstruct(parts, zoo_model, tokens, weights, kind, _jump if jump else _relu)


def _assert_parts_reconstruct(parts, model, tokens, weights, kind, act) -> None:
    """Every layer's parts, on the clean model's inputs, sum to the float64 reference."""
    _, cache = model.run_with_cache(tokens)
    inputs = [cache[f"blocks.{i}.{READ}"] for i in range(N_LAYERS)]
    expected = _reference_outputs(weights, kind, inputs, act)
    got = [torch.zeros_like(e) for e in expected]
    for i, part in enumerate(parts):
        recon = part.decode(part.encode(inputs[i]), x=inputs[i])
        recon = recon if isinstance(recon, tuple) else (recon,)
        assert len(recon) == len(part.write_hooks)
        for hook, r in zip(part.write_hooks, recon, strict=True):
            got[int(hook.split(".")[1])] += r.double()
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def _hooked_reference(model, tokens, weights, kind):
    """Logits of the compounded replacement model, built with plain hooks in float64: each
    layer's features read the spliced run, each MLP output is the reference's sum."""
    feats: dict[int, torch.Tensor] = {}

    def read(act, hook):
        i = int(hook.name.split(".")[1])
        w = weights[i]
        pre = act.double() @ w["W_enc"].double().T + w["b_enc"].double()
        feats[i] = pre * (pre > w["threshold"].double())

    def write(act, hook):
        j = int(hook.name.split(".")[1])
        out = weights[j]["b_dec"].double().clone()
        for i in ([j] if kind == "transcoder_set" else range(j + 1)):
            out = out + feats[i] @ weights[i]["W_dec"][:, 0 if kind == "transcoder_set"
                                                       else j - i].double()
        return out.to(act.dtype)

    hooks = [(f"blocks.{i}.{READ}", read) for i in range(N_LAYERS)]
    hooks += [(f"blocks.{i}.{WRITE}", write) for i in range(N_LAYERS)]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


@pytest.mark.parametrize("kind", ["transcoder_set", "cross_layer_transcoder"])
def test_the_replacement_model_compounds_as_the_reference(tmp_path, zoo_model, tokens, kind):
    weights = _weights(kind)
    parts = _parts(_write(tmp_path / kind, kind, weights))
    spliced = zoo_model.run_with_hooks(tokens, fwd_hooks=splice_hooks(parts))
    reference = _hooked_reference(zoo_model, tokens, weights, kind)
    torch.testing.assert_close(spliced, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(spliced, zoo_model(tokens), atol=1e-2)


def test_the_error_term_at_every_layer_gives_the_clean_logits(tmp_path, zoo_model, tokens):
    parts = _parts(_write(tmp_path / "clt", "cross_layer_transcoder",
                          _weights("cross_layer_transcoder")))
    record: dict = {}
    logits = zoo_model.run_with_hooks(tokens, fwd_hooks=splice_hooks(parts, error_term=True,
                                                                     record=record))
    torch.testing.assert_close(logits, zoo_model(tokens), atol=1e-5, rtol=0)
    assert set(record) == {p.name for p in parts}


def test_identity_parts_give_the_clean_model_and_perfect_scores(zoo_model, tokens):
    """A replacement model of identity parts at every MLP output (two halves at the last
    one, summed) is the clean model: agreement 1, per-layer error 0, loss recovered 1."""

    class Scaled(torch.nn.Module):
        def __init__(self, hook: str, scale: float) -> None:
            super().__init__()
            self.read_hooks = self.write_hooks = (hook,)
            self.d_in = self.d_out = self.d_sae = D_MODEL
            self.scale = scale

        def encode(self, x):
            return x * self.scale

        def decode(self, feats, x):
            return feats

    last = f"blocks.{N_LAYERS - 1}.{WRITE}"
    modules = [Scaled(f"blocks.{i}.{WRITE}", 1.0) for i in range(N_LAYERS - 1)]
    modules += [Scaled(last, 0.5), Scaled(last, 0.5)]
    parts = tuple(as_dictionary(m, name=f"id/{i}", part_of="id") for i, m in enumerate(modules))
    request = engine.Request("id", parts, reconstruction=False, layers=True)
    terms = engine.run(zoo_model, tokens, [request], engine.EngineOptions(progress=False))["id"]
    assert torch.equal(terms["agree_spliced"], terms["n_kl"])
    torch.testing.assert_close(terms["kl_spliced"], torch.zeros_like(terms["kl_spliced"]),
                               atol=1e-8, rtol=0)
    assert terms["layer_sq_err"].shape[-1] == N_LAYERS and float(terms["layer_sq_err"].max()) < 1e-8
    torch.testing.assert_close(terms["ce_spliced"], terms["ce_clean"], atol=1e-5, rtol=0)


def test_only_parts_of_one_model_may_share_a_write_hook(tmp_path, zoo_model):
    sae = as_dictionary(torch.nn.Identity(), name="a", hook=f"blocks.1.{WRITE}")
    other = as_dictionary(torch.nn.Identity(), name="b", hook=f"blocks.1.{WRITE}")
    with pytest.raises(ValueError, match="share the write hook"):
        splice_hooks([sae, other])
    parts = _parts(_write(tmp_path / "clt", "cross_layer_transcoder",
                          _weights("cross_layer_transcoder")))
    with pytest.raises(ValueError, match="share the write hook"):
        splice_hooks([*parts, sae])


def test_shuffled_decoders_permute_each_layers_decoder_rows(tmp_path):
    directory = _write(tmp_path / "clt", "cross_layer_transcoder",
                       _weights("cross_layer_transcoder"))
    plain, shuffled = _parts(directory), _parts(directory, shuffle_decoders=3)
    again = _parts(directory, shuffle_decoders=3)
    for p, s, a in zip(plain, shuffled, again, strict=True):
        w, ws = p.module.W_dec, s.module.W_dec
        assert not torch.equal(w, ws) and torch.equal(ws, a.module.W_dec)
        rows = {tuple(r.flatten().tolist()) for r in w}
        assert {tuple(r.flatten().tolist()) for r in ws} == rows
        assert torch.equal(p.module.W_enc, s.module.W_enc)


def _located(tmp_path: Path, directory: Path, **entry) -> str:
    spec = DictionarySpec("ct", "circuit_tracer", str(directory), line=7, **entry)
    suite = tmp_path / "s.yaml"
    with pytest.raises(SuiteError) as err:
        resolve.probe_dictionary(spec, suite_path=suite)
    assert str(err.value).startswith(f"{suite}:7: dictionaries.ct")
    return str(err.value)


def test_bad_directories_are_refused_with_a_location(tmp_path):
    assert "expected config.yaml" in _located(tmp_path, tmp_path)
    directory = _write(tmp_path / "set", "transcoder_set", _weights("transcoder_set"))
    (directory / "layer_2.safetensors").unlink()
    assert "a transcoder_set of layers 0..3 (its files go up to layer 3), but " \
           "layer_2.safetensors is missing" in _located(tmp_path, directory)
    clt = _write(tmp_path / "clt", "cross_layer_transcoder", _weights("cross_layer_transcoder"))
    save_file({"W_dec_1": torch.zeros(D_TC, N_LAYERS, D_MODEL)},
              str(clt / "W_dec_1.safetensors"))
    assert "W_dec_1 has shape [48, 4, 128], expected [48, 3, 128]" in _located(tmp_path, clt)
    good = _write(tmp_path / "ok", "cross_layer_transcoder", _weights("cross_layer_transcoder"))
    assert "hook:/hook_out: do not apply" in _located(tmp_path, good, hook="blocks.0.hook_mlp_out")
    assert "do not apply" in _located(tmp_path, good, args={"seed": 1})
    (good / "config.yaml").write_text(textwrap.dedent("""\
        model_kind: crosscoder
        feature_input_hook: ln2.hook_normalized
        feature_output_hook: hook_mlp_out
        """))
    assert "model_kind 'crosscoder'" in _located(tmp_path, good)


def test_a_pass_cut_short_leaves_nothing_for_the_next(tmp_path, zoo_model, tokens):
    """A pass that stops before a CLT layer's later write hooks must not hand their
    reconstructions (of the old tokens) to the next pass."""
    parts = _parts(_write(tmp_path / "clt", "cross_layer_transcoder",
                          _weights("cross_layer_transcoder")))
    hooks = splice_hooks(parts)
    zoo_model.run_with_hooks(tokens.flip(0), fwd_hooks=hooks, stop_at_layer=2)
    torch.testing.assert_close(zoo_model.run_with_hooks(tokens, fwd_hooks=hooks),
                               zoo_model.run_with_hooks(tokens, fwd_hooks=splice_hooks(parts)))


@torch.no_grad()
def test_per_layer_error_and_agreement_match_a_float64_reference(tmp_path, zoo_model, tokens):
    """per_layer_error at each layer = Σ‖written − clean‖² / Σ‖clean − mean‖² over the
    non-special positions, written by the compounded replacement model; next-token
    agreement = share of those positions whose top-1 token is the clean model's."""
    from saebench.metrics.registry import get_metric
    from saebench.stats import summarize

    kind = "cross_layer_transcoder"
    weights = _weights(kind)
    parts = _parts(_write(tmp_path / kind, kind, weights))
    request = engine.Request("clt", parts, reconstruction=False, layers=True)
    terms = engine.run(zoo_model, tokens, [request], engine.EngineOptions(progress=False))["clt"]

    written: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        written[hook.name] = act.double()

    _, clean_cache = zoo_model.run_with_cache(tokens)
    mask = ~torch.isin(tokens, torch.tensor(engine.special_token_ids(zoo_model)))
    spliced = zoo_model.run_with_hooks(tokens, fwd_hooks=[  # BOS is never spliced
        *splice_hooks(parts, mask=mask), *((f"blocks.{i}.{WRITE}", keep) for i in range(N_LAYERS))])
    metric = get_metric("per_layer_error")
    errors = []
    for i in range(N_LAYERS):
        hook = f"blocks.{i}.{WRITE}"
        clean, out = clean_cache[hook].double()[mask], written[hook][mask]
        errors.append(float((out - clean).pow(2).sum() / (clean - clean.mean(0)).pow(2).sum()))
        value = summarize(metric, terms, {"layer": i}, n_boot=0).value
        assert value == pytest.approx(errors[-1], rel=1e-6)
    assert summarize(metric, terms, {}, n_boot=0).value == pytest.approx(max(errors), rel=1e-6)
    agree = (spliced.argmax(-1) == zoo_model(tokens).argmax(-1))[mask].double().mean()
    value = summarize(get_metric("next_token_agreement"), terms, {}, n_boot=0).value
    assert value == pytest.approx(float(agree), rel=1e-9)


def test_a_suite_measures_replacement_models_and_refuses_one_dictionary_metrics(tmp_path):
    from saebench.checks import RunSettings, SuiteRun
    from saebench.suite import load_suite

    kind = "cross_layer_transcoder"
    _write(tmp_path / "clt", kind, _weights(kind))
    _write(tmp_path / "set", "transcoder_set", _weights("transcoder_set"))
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        model: zoo
        data: {source: zoo, n_tokens: 2048}
        dictionaries:
          clt: {circuit_tracer: clt}
          set: {circuit_tracer: set}
          shuffled: {circuit_tracer: clt, args: {shuffle_decoders: 0}}
        defaults: {options: {n_boot: 50}}
        checks:
          - {metric: ce_loss_recovered, dictionaries: [clt, set, shuffled]}
          - {metric: next_token_agreement, dictionaries: [clt, set, shuffled]}
          - {metric: per_layer_error, dictionaries: [clt, set]}
          - {metric: l0, dictionaries: [clt]}
        """))
    run = SuiteRun(load_suite(tmp_path / "s.yaml"), RunSettings(device="cpu"))
    rows = {c.id: run.result(c) for c in run.suite.checks}
    for name in ("clt", "set", "shuffled"):
        row = rows[f"{name}::next_token_agreement"]
        assert row["verdict"] == "measured" and 0 <= row["value"] <= 1
        assert row["hook"] == ",".join(f"blocks.{i}.{WRITE}" for i in range(N_LAYERS))
        assert row["architecture"].startswith("circuit_tracer-")
    assert rows["clt::ce_loss_recovered"]["value"] != \
        rows["shuffled::ce_loss_recovered"]["value"]
    error = rows["clt::per_layer_error"]
    layers = run.extra_rows(next(c for c in run.suite.checks if c.id == "clt::per_layer_error"))
    (table,) = layers.values()
    assert [r["layer"] for r in table] == list(range(N_LAYERS))
    results.append_rows(tmp_path / results.LAYERS_FILE, table)
    stored = results.read_table(tmp_path / results.LAYERS_FILE, results.LAYER_COLUMNS)
    assert stored["hook"].tolist() == [f"blocks.{i}.{WRITE}" for i in range(N_LAYERS)]
    assert error["value"] == pytest.approx(max(r["value"] for r in table))
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in table)
    refused = rows["clt::l0"]
    assert refused["verdict"] == "error"
    assert "l0 needs a dictionary that reads one hook and writes one" in refused["message"]
    assert refused["message"].startswith(f"{tmp_path / 's.yaml'}:")


def test_evaluate_measures_a_replacement_model_given_as_its_parts(tmp_path, zoo_model, tokens):
    from saebench import evaluate

    kind = "cross_layer_transcoder"
    parts = _parts(_write(tmp_path / kind, kind, _weights(kind)))
    frame = evaluate(zoo_model, {"clt": list(parts)}, tokens,
                     ["next_token_agreement", "per_layer_error"], n_boot=0, progress=False)
    request = engine.Request("clt", parts, reconstruction=False, layers=True)
    terms = engine.run(zoo_model, tokens, [request], engine.EngineOptions(progress=False))["clt"]
    errors = terms["layer_sq_err"].sum(0)
    assert set(frame["metric"]) == {"next_token_agreement", "per_layer_error"}
    assert frame.set_index("metric").loc["per_layer_error", "hook"] == "+".join(
        f"blocks.{i}.{WRITE}" for i in range(N_LAYERS))
    assert float(errors.min()) > 0


# ---------------------------------------------------------------------------- activations,
# config keys and coverage

K_TOP = 6


def _coder(weights: list[dict[str, torch.Tensor]], kind: str) -> Coder:
    """The weights as a zoo `Coder`, which `saebench.zoo.formats` writes as circuit-tracer
    does."""
    n = len(weights)
    if kind == "transcoder_set":
        decoders = {(i, i): w["W_dec"][:, 0] for i, w in enumerate(weights)}
    else:
        decoders = {(i, j): w["W_dec"][:, j - i] for i, w in enumerate(weights)
                    for j in range(i, n)}
    return Coder([f"blocks.{i}.{READ}" for i in range(n)],
                 [f"blocks.{i}.{WRITE}" for i in range(n)],
                 [w["W_enc"].T for w in weights], [w["b_enc"] for w in weights], decoders,
                 [w["b_dec"] for w in weights], [None] * n, [w.get("W_skip") for w in weights])


def _skipped(weights: list[dict[str, torch.Tensor]], shift: float) -> list[dict]:
    """`weights` with a skip connection per layer and every encoder bias moved by `shift`."""
    g = torch.Generator().manual_seed(7)
    return [{**w, "b_enc": w["b_enc"] + shift,
             "W_skip": torch.randn(D_MODEL, D_MODEL, generator=g) * 0.02} for w in weights]


def test_a_topk_set_keeps_the_k_largest_pre_activations_without_a_relu(tmp_path, zoo_model,
                                                                       tokens):
    """`activation: topk` with `k` (circuit-tracer's TopK: no ReLU first), with skip
    connections, written by the zoo's circuit-tracer writer; the encoder biases are low
    enough that most kept pre-activations are negative, which a ReLU would zero."""
    weights = _skipped(_weights("transcoder_set"), shift=-4.0)
    directory = tmp_path / "topk"
    formats.write_transcoder_set(_coder(weights, "transcoder_set"), directory,
                                 activation="topk", k=K_TOP)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    assert (config["activation"], config["k"]) == ("topk", K_TOP)
    parts = _parts(directory)
    assert all(p.module.rule == "topk" and p.module.W_skip is not None for p in parts)
    act = functools.partial(_topk, k=K_TOP)
    _assert_parts_reconstruct(parts, zoo_model, tokens, weights, "transcoder_set", act)
    _, cache = zoo_model.run_with_cache(tokens)
    x = cache[f"blocks.0.{READ}"].double()
    feats = act(x @ weights[0]["W_enc"].double().T + weights[0]["b_enc"].double(), weights[0])
    assert ((feats != 0).sum(-1) == K_TOP).all() and (feats < 0).any()


@pytest.mark.parametrize(("activation", "act"), [("jump_relu", _jump), ("relu", _relu),
                                                 (None, _jump)])
def test_the_configs_activation_decides_as_circuit_tracer_does(tmp_path, zoo_model, tokens,
                                                               activation, act):
    """With thresholds stored: `jump_relu` (or no activation key) is JumpReLU; `relu` is
    ReLU, the thresholds unused, as circuit-tracer's `load_transcoder_set` does."""
    weights = _weights("transcoder_set")
    directory = tmp_path / "set"
    formats.write_transcoder_set(_coder(weights, "transcoder_set"), directory,
                                 activation=activation,
                                 thresholds=[w["threshold"] for w in weights])
    parts = _parts(directory)
    _assert_parts_reconstruct(parts, zoo_model, tokens, weights, "transcoder_set", act)


def test_a_jump_relu_clt_written_by_the_zoo_writer(tmp_path, zoo_model, tokens):
    weights = _weights("cross_layer_transcoder")
    directory = tmp_path / "clt"
    formats.write_clt(_coder(weights, "cross_layer_transcoder"), directory,
                      thresholds=[w["threshold"] for w in weights])
    _assert_parts_reconstruct(_parts(directory), zoo_model, tokens, weights,
                              "cross_layer_transcoder", _jump)


def test_keys_that_change_no_number_are_accepted_and_ignored(tmp_path, zoo_model, tokens):
    weights = _weights("transcoder_set")
    directory = _write(tmp_path / "set", "transcoder_set", weights)
    with (directory / "config.yaml").open("a") as f:
        f.write("model_name: google/gemma-2-2b\nscan: mwhanna/gemma-scope-transcoders\n"
                "revision: main\nlazy_encoder: false\nlazy_decoder: true\n")
    _assert_parts_reconstruct(_parts(directory), zoo_model, tokens, weights, "transcoder_set",
                              _jump)


def _append(text: str):
    def edit(directory: Path) -> None:
        with (directory / "config.yaml").open("a") as f:
            f.write(text)
    return edit


def _resave(file: str, change):
    def edit(directory: Path) -> None:
        tensors = load_file(directory / file)
        change(tensors)
        save_file(tensors, str(directory / file))
    return edit


def _unlink(*files: str):
    def edit(directory: Path) -> None:
        for file in files:
            (directory / file).unlink()
    return edit


SET, CLT = "transcoder_set", "cross_layer_transcoder"
# case -> (kind, damage, message after `dictionaries.ct: `)
REFUSED = {
    "unknown activation": (SET, _append("activation: softplus\n"),
                           r"activation 'softplus' is not one of relu, jump_relu, topk"),
    "topk without k": (SET, _append("activation: topk\n"),
                       r"k goes with activation: topk, and only with it"),
    "k without topk": (SET, _append("k: 8\n"), r"k goes with activation: topk"),
    "k zero": (SET, _append("activation: topk\nk: 0\n"), r"k must be an integer >= 1, got 0"),
    "k above the features": (SET, _append("activation: topk\nk: 100\n"),
                             r"k=100 is more than the 48 features of a layer"),
    "per-layer paths": (SET, _append("transcoders: [hf://a/b/layer_0.safetensors]\n"),
                        r"transcoders: \(per-layer paths\) is not read"),
    "unknown key": (SET, _append("dead_feature_threshold: 3\n"),
                    r"unknown key\(s\) \['dead_feature_threshold'\]; circuit-tracer's keys"),
    "topk on a clt": (CLT, _append("activation: topk\nk: 4\n"),
                      r"activation 'topk' on a cross_layer_transcoder, whose features "
                      r"circuit-tracer runs as jump_relu"),
    "relu on a jump clt": (CLT, _append("activation: relu\n"), r"runs as jump_relu"),
    "jump_relu without thresholds": (SET, lambda d: (
        [_resave(f"layer_{i}.safetensors", lambda t: t.pop("activation_function.threshold"))(d)
         for i in range(N_LAYERS)], _append("activation: jump_relu\n")(d)),
        r"activation jump_relu, but no layer stores activation_function\.threshold"),
    "stored k disagrees": (SET, lambda d: (_append("activation: topk\nk: 8\n")(d), _resave(
        "layer_1.safetensors", lambda t: t.update(k=torch.tensor(4)))(d)),
        r"layers \[1\] store k=4, but the config says k: 8"),
    "threshold in some layers": (SET, _resave("layer_2.safetensors", lambda t: t.pop(
        "activation_function.threshold")), r"layers \[0, 1, 3\] store threshold and the "
                                           r"others do not"),
    "unknown tensor": (CLT, _resave("W_enc_1.safetensors", lambda t: t.update(
        W_skip_1=torch.zeros(D_MODEL, D_MODEL))), r"W_enc_1\.safetensors: unknown tensor\(s\) "
                                                  r"\['W_skip_1'\]"),
    "widths differ": (SET, _resave("layer_3.safetensors", lambda t: t.update(
        W_enc=t["W_enc"][:40], b_enc=t["b_enc"][:40], W_dec=t["W_dec"][:40],
        **{"activation_function.threshold": t["activation_function.threshold"][:40]})),
        r"the layers' W_enc shapes differ \(\[\(48, 128\), \(48, 128\), \(48, 128\), "
        r"\(40, 128\)\]\); circuit-tracer needs one d_transcoder"),
    "garbage layer file": (SET, lambda d: (d / "layer_1.safetensors").write_bytes(b"\0" * 20),
                           r"layer_1\.safetensors: not a readable safetensors file "
                           r"\(SafetensorError: "),
    "clt without its last layer": (CLT, _unlink("W_enc_3.safetensors", "W_dec_3.safetensors"),
                                   r"a cross_layer_transcoder of layers 0\.\.3 \(W_dec_0 writes 4 "
                                   r"layers\), but W_enc_3\.safetensors, W_dec_3\.safetensors "
                                   r"are missing"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_circuit_tracer_does_not_document_is_refused_with_a_location(tmp_path, case):
    kind, damage, message = REFUSED[case]
    directory = _write(tmp_path / "ct", kind, _weights(kind))
    damage(directory)
    text = _located(tmp_path, directory)
    assert "\n" not in text and re.search(message, text), text


def test_declared_layers_must_be_the_layers_the_files_hold(tmp_path):
    directory = _write(tmp_path / "ct", SET, _weights(SET))
    text = _located(tmp_path, directory, args={"layers": [0, 1]})
    assert "args.layers is [0, 1], but the files hold layers [0, 1, 2, 3]" in text
    spec = DictionarySpec("ct", "circuit_tracer", str(directory), args={"layers": [0, 1, 2, 3]})
    assert resolve.probe_dictionary(spec).d_sae == N_LAYERS * D_TC


def test_a_set_short_of_the_models_layers_fails_its_checks_unless_its_layers_are_given(
        tmp_path):
    """Three layers' files of a four-layer model: an [error] naming the missing file, not a
    three-layer replacement passing its checks; `args: {layers: [0, 1, 2]}` evaluates it
    as that. The suite's other checks run."""
    from saebench.checks import RunSettings, SuiteRun
    from saebench.suite import load_suite

    directory = _write(tmp_path / "short", SET, _weights(SET))
    (directory / "layer_3.safetensors").unlink()
    suite = tmp_path / "s.yaml"
    suite.write_text(textwrap.dedent("""\
        model: zoo
        data: {source: zoo, n_tokens: 256}
        dictionaries:
          short: {circuit_tracer: short}
          declared: {circuit_tracer: short, args: {layers: [0, 1, 2]}}
        defaults: {options: {n_boot: 20}}
        checks:
          - {metric: next_token_agreement, dictionaries: [short, declared]}
        """))
    run = SuiteRun(load_suite(suite), RunSettings(device="cpu"))
    rows = {c.id: run.result(c) for c in run.suite.checks}
    short = rows["short::next_token_agreement"]
    assert short["verdict"] == "error"
    assert short["message"] == (
        f"{suite}:4: dictionaries.short: a transcoder_set of layers 0..2 replaces part of a "
        "model of 4 layers (layer_3.safetensors missing); add the missing files, or give "
        "args: {layers: [0, 1, 2]} to evaluate a replacement of those layers only")
    declared = rows["declared::next_token_agreement"]
    assert declared["verdict"] == "measured" and 0 < declared["value"] <= 1
    assert declared["hook"] == ",".join(f"blocks.{i}.{WRITE}" for i in range(3))
