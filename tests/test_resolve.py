"""Suite specs resolve to live objects; bad input and missing hubs fail with located messages."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TrainingSAE
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import save_file
from tolerances import f32_error
from transformer_lens import HookedTransformer

from saebench import loading, resolve
from saebench.resolve import HubUnavailable
from saebench.suite import DataSpec, DictionarySpec, ModelSpec, SuiteError, TaskSpec
from saebench.zoo import paths

CPU = {"device": "cpu", "dtype": torch.float32}
RES_JB = DictionarySpec("res-jb-L0", "release", "gpt2-small-res-jb",
                        release="gpt2-small-res-jb", sae_id="blocks.0.hook_resid_pre", line=7)
PILE = DataSpec("hf", hf="NeelNanda/pile-10k", split="train", column="text", n_tokens=1024,
                line=3)


@pytest.fixture(scope="module")
def suite_path(tmp_path_factory) -> Path:
    """A suite file location: relative paths in specs resolve against its directory."""
    return tmp_path_factory.mktemp("suite") / "suite.yaml"


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """Texts in the zoo's vocabulary: the IOI prompts with their answers."""
    return [f"{p.prompt} {p.answer}." for p in loading.load_task("ioi")[:40]]


def _same_outputs(a: HookedTransformer, b: HookedTransformer) -> bool:
    """Exactly the same logits: models loaded as saved hold the same float32 weights and run
    the same TransformerLens code, the same arithmetic (a loader that folded or centred
    weights would change their rounding, and a wrong one far more)."""
    tokens = loading.load_heldout_tokens()[:2, :32]
    return torch.equal(a(tokens), b(tokens))


# ---------------------------------------------------------------------------- zoo

def test_zoo_model_tokens_dictionary_and_task(zoo_model):
    model = resolve.resolve_model(ModelSpec("zoo", "zoo"), **CPU)
    assert not model.training and _same_outputs(model, zoo_model)
    assert torch.equal(resolve.resolve_tokens(DataSpec(), zoo_model),
                       loading.load_heldout_tokens())
    spec = DictionarySpec("mine", "zoo", "resid-L2-topk16", hook="blocks.2.hook_resid_pre")
    (d,) = resolve.adapt(spec, resolve.resolve_dictionary(spec, device="cpu"))
    assert (d.name, d.read_hook, d.d_in) == ("mine", "blocks.2.hook_resid_pre", 128)
    prompts = resolve.resolve_task(TaskSpec("ioi", "zoo", "ioi"))
    assert prompts == loading.load_task("ioi")


def test_zoo_tokens_context_and_n_tokens(zoo_model):
    tokens = resolve.resolve_tokens(DataSpec(context=64, n_tokens=64 * 10 + 5), zoo_model)
    assert tokens.shape == (10, 64) and tokens.dtype == torch.long
    assert torch.equal(tokens, loading.load_heldout_tokens()[:10, :64])


@pytest.mark.parametrize(("spec", "message"), [
    (DataSpec(context=256, line=4), r"suite.yaml:4: data: context 256 is longer than the "
                                    r"model's n_ctx \(128\)"),
    (DataSpec(n_tokens=100, line=4), "n_tokens 100 is less than one row of 128 tokens"),
    (DataSpec(n_tokens=128 * 10_000, line=4), "needs 10000 rows .* has 581"),
])
def test_zoo_tokens_bad_sizes(zoo_model, suite_path, spec, message):
    with pytest.raises(SuiteError, match=message):
        resolve.resolve_tokens(spec, zoo_model, suite_path=suite_path)


# ---------------------------------------------------------------------------- local paths

def test_path_dictionary_relative_to_the_suite(suite_path):
    cfg = StandardSAEConfig(d_in=128, d_sae=32,
                            metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre"))
    sae = StandardSAE(cfg)
    torch.nn.init.normal_(sae.W_enc)
    sae.save_model(str(suite_path.parent / "saes" / "mine"))
    spec = DictionarySpec("mine", "path", "saes/mine", line=9)
    loaded = resolve.resolve_dictionary(spec, device="cpu", suite_path=suite_path)
    assert isinstance(loaded, SAE) and torch.equal(loaded.W_enc, sae.W_enc)
    (d,) = resolve.adapt(spec, loaded)
    assert (d.read_hook, d.d_sae) == ("blocks.1.hook_resid_pre", 32)


def test_path_dictionary_that_is_not_one(suite_path):
    (suite_path.parent / "empty").mkdir(exist_ok=True)
    spec = DictionarySpec("mine", "path", "empty", line=9)
    with pytest.raises(SuiteError, match=r"suite.yaml:9: dictionaries.mine: .*empty: cannot "
                                         r"load a sae_lens dictionary"):
        resolve.resolve_dictionary(spec, device="cpu", suite_path=suite_path)


# Every architecture sae_lens has a training class for; each one's `save_model` works.
TRAINING_ARCHITECTURES = ["standard", "gated", "topk", "abstopk", "jumprelu", "batchtopk",
                          "matryoshka_batchtopk", "matching_pursuit"]
# Training architectures saved as another inference one. They keep k active over the whole
# batch in training, which the saved JumpReLU threshold only approximates, so their training
# forward is no reference for the inference SAE.
SAVED_AS = {"batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}


def _training_sae(architecture: str) -> TrainingSAE:
    """A random 6 -> 12 training SAE, its thresholds (where it has one) positive."""
    sae_class, cfg_class = SAE_TRAINING_CLASS_REGISTRY[architecture]
    extra: dict = {"k": 3} if "topk" in architecture else {}
    if architecture == "matryoshka_batchtopk":
        extra["matryoshka_widths"] = [4, 12]
    if architecture == "matching_pursuit":
        extra["decoder_init_norm"] = 1.0
    torch.manual_seed(0)
    sae = sae_class(cfg_class(d_in=6, d_sae=12, **extra,
                              metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre")))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_()
        for name in ("threshold", "topk_threshold"):
            if hasattr(sae, name):
                getattr(sae, name).abs_().add_(0.3)
    return sae


def test_every_training_architecture_is_covered():
    assert sorted(TRAINING_ARCHITECTURES) == sorted(SAE_TRAINING_CLASS_REGISTRY)


@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
def test_training_sae_dir_loads_as_its_inference_sae(tmp_path, architecture):
    training = _training_sae(architecture)
    training.save_model(str(tmp_path / "trained"))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = training.eval().encode(x)
        # the training encode against the inference one: the same features in another
        # order of float32 operations, measured on 256 inputs like x (`f32_error`); a lost
        # threshold, k or gate moves features by O(1)
        tol = f32_error(training, torch.randn(256, 6, generator=torch.Generator().manual_seed(2)),
                        method="encode")
        training.save_inference_model(str(tmp_path / "reference"))  # sae_lens' conversion
    reference = SAE.load_from_disk(str(tmp_path / "reference"))
    spec = DictionarySpec("mine", "path", "trained", line=9)
    info = resolve.probe_dictionary(spec, suite_path=tmp_path / "suite.yaml")
    assert (info.architecture, info.d_in, info.d_sae, info.d_out) == (
        SAVED_AS.get(architecture, architecture), 6, 12, 6)
    assert info.read_hook == info.write_hook == "blocks.0.hook_resid_pre"
    assert set(info.identity) == {"source", "sha256"}
    for name in ("trained", "reference"):  # the inference save loads as saved, unconverted
        loaded = resolve.resolve_dictionary(DictionarySpec("mine", "path", name, line=9),
                                            device="cpu", suite_path=tmp_path / "suite.yaml")
        assert type(loaded) is type(reference)
        with torch.no_grad():
            features = loaded.encode(x)
            # exact: the same class and weights, the same arithmetic
            assert torch.equal(features, reference.encode(x))
            assert torch.equal(loaded.decode(features), reference.decode(features))
    assert 0 < features.count_nonzero() < features.numel()
    if architecture not in SAVED_AS:
        torch.testing.assert_close(features, own, rtol=0, atol=tol)


@pytest.mark.parametrize(("architecture", "message"), [
    ("mystery", r"unknown architecture 'mystery'; sae_lens knows standard, gated, .*jumprelu.* "
                r"\(inference SAEs\) and standard, .*batchtopk.* \(training SAEs\)"),
    ("batch_topk", r"unknown architecture 'batch_topk'; close matches: batchtopk"),
])
def test_path_dictionary_of_unknown_architecture(tmp_path, architecture, message):
    _training_sae("batchtopk").save_model(str(tmp_path / "odd"))
    cfg = json.loads((tmp_path / "odd" / "cfg.json").read_text())
    (tmp_path / "odd" / "cfg.json").write_text(json.dumps(cfg | {"architecture": architecture}))
    spec = DictionarySpec("mine", "path", "odd", line=9)
    with pytest.raises(SuiteError, match=r"suite.yaml:9: dictionaries.mine: .*cfg.json: "
                                         + message):
        resolve.probe_dictionary(spec, suite_path=tmp_path / "suite.yaml")
    with pytest.raises(SuiteError, match=rf"cannot load a sae_lens dictionary \(KeyError: "
                                         rf"'{architecture}'\)"):
        resolve.resolve_dictionary(spec, device="cpu", suite_path=tmp_path / "suite.yaml")


def test_transformer_lens_config_dir(zoo_model, tmp_path):
    directory = tmp_path / "zoo-style"
    shutil.copytree(paths.ARTIFACTS / paths.MODEL, directory)
    shutil.copytree(paths.ARTIFACTS / paths.TOKENIZER, directory / "tokenizer")
    suite = tmp_path / "suite.yaml"
    model = resolve.resolve_model(ModelSpec("path", path="zoo-style"), **CPU, suite_path=suite)
    assert _same_outputs(model, zoo_model)
    assert model.to_tokens("Rose")[0, 0] == model.tokenizer.bos_token_id
    with pytest.raises(ValueError, match="suite.yaml: model: .*zoo-style holds a TransformerLens "
                                         "config, loaded as saved; it takes no "
                                         "from_pretrained_kwargs"):
        resolve.resolve_model(ModelSpec("path", path="zoo-style",
                                        kwargs={"center_writing_weights": True}),
                              **CPU, suite_path=suite)


def test_zoo_dir_as_model_path(zoo_model):
    model = resolve.resolve_model(ModelSpec("path", path=str(paths.ARTIFACTS)), **CPU)
    assert _same_outputs(model, zoo_model)


def test_hugging_face_checkpoint_dir_loads_offline(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = loading.load_zoo_tokenizer()
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(
        n_layer=1, n_embd=32, n_head=2, n_positions=64, n_ctx=64, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    model = resolve.resolve_model(ModelSpec("path", path=str(tmp_path / "hf")), **CPU)
    tokens = model.to_tokens("Rose gave a flower to Paul")
    # TransformerLens against Hugging Face: the same function in other orders (`f32_error`)
    torch.testing.assert_close(model(tokens), hf_model(tokens).logits, rtol=0,
                               atol=f32_error(model, tokens))
    assert model.cfg.n_ctx == 64 and model.cfg.normalization_type == "LN"


def test_model_dir_without_a_config(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"model: .*config.json: cannot read the model config"):
        resolve.resolve_model(ModelSpec("path", path=str(tmp_path / "nothing")), **CPU)


def test_task_file_relative_to_the_suite(suite_path):
    task = suite_path.parent / "tasks" / "mine.jsonl"
    task.parent.mkdir(exist_ok=True)
    task.write_text('{"prompt": "Rose gave a flower to", "answer": "Paul", '
                    '"distractor": "Rose"}\n{"prompt": "x"}\n')
    with pytest.raises(SuiteError, match=r"suite.yaml:5: tasks.mine: .*mine.jsonl:2: field "
                                         r"'answer'"):
        resolve.resolve_task(TaskSpec("mine", "path", "tasks/mine.jsonl", 5),
                             suite_path=suite_path)
    task.write_text(task.read_text().splitlines()[0] + "\n")
    [prompt] = resolve.resolve_task(TaskSpec("mine", "path", "tasks/mine.jsonl", 5),
                                    suite_path=suite_path)
    assert prompt.answer == "Paul"


# ---------------------------------------------------------------------------- token files

def _file(directory: Path, name: str, content: object) -> DataSpec:
    path = directory / name
    if name.endswith(".safetensors"):
        save_file(content, str(path))
    elif name.endswith(".pt"):
        torch.save(content, path)
    else:
        path.write_text(content)
    return DataSpec("path", path=name, line=2)


def test_token_files(zoo_model, suite_path):
    rows = loading.load_heldout_tokens()[:6]
    spec = _file(suite_path.parent, "rows.safetensors", {"tokens": rows})
    assert torch.equal(resolve.resolve_tokens(spec, zoo_model, suite_path=suite_path), rows)
    spec = _file(suite_path.parent, "stream.pt", rows.flatten()[:1000].int())
    tokens = resolve.resolve_tokens(DataSpec("path", path=spec.path, context=100, n_tokens=550),
                                    zoo_model, suite_path=suite_path)
    assert tokens.dtype == torch.long and torch.equal(tokens.flatten(), rows.flatten()[:500])


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_text_files_are_packed_with_bos(zoo_model, suite_path, documents, suffix):
    text = ("\n\n".join(documents) if suffix == ".txt"
            else "".join(json.dumps({"text": d}) + "\n" for d in documents))
    spec = _file(suite_path.parent, "docs" + suffix, text)
    tokens = resolve.resolve_tokens(DataSpec("path", path=spec.path, context=32),
                                    zoo_model, suite_path=suite_path)
    bos = zoo_model.tokenizer.bos_token_id
    first = zoo_model.to_tokens(documents[0], prepend_bos=False)[0]
    assert tokens.shape[1] == 32 and (tokens[:, 0] == bos).all()
    assert torch.equal(tokens[0, 1:1 + len(first)], first)
    stream = torch.cat([zoo_model.to_tokens(d, prepend_bos=False)[0] for d in documents])
    words = tokens[tokens != bos]
    assert torch.equal(words, stream[: len(words)]) and len(words) > 0.9 * len(stream)
    short = resolve.resolve_tokens(DataSpec("path", path=spec.path, context=32, n_tokens=100),
                                   zoo_model, suite_path=suite_path)
    assert torch.equal(short, tokens[:3])


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.safetensors", None, r"bad.safetensors: cannot read token ids"),
    ("nokey.safetensors", {"ids": torch.zeros(2, 4, dtype=torch.long)},
     r"nokey.safetensors: no 'tokens' entry \(found: ids\)"),
    ("float.pt", torch.zeros(2, 4), r"float.pt: token ids must be integers"),
    ("list.pt", [1, 2, 3], r"list.pt: expected a tensor of token ids, got list"),
    ("big.pt", torch.full((2, 4), 10_000), r"big.pt: token ids range over \[10000, 10000\]"),
    ("wide.pt", torch.zeros(2, 200, dtype=torch.long), r"wide.pt: rows of 200 tokens are "
                                                       r"longer than the model's n_ctx"),
    ("bad.jsonl", '{"text": "Rose"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
    ("field.jsonl", '{"body": "Rose"}\n', r"field.jsonl:1: expected an object with a string "
                                          r"field 'text'"),
    ("tiny.txt", "Rose", r"tiny.txt holds less than one row of 128 tokens"),
])
def test_bad_token_files_name_the_file(zoo_model, suite_path, name, content, message):
    if content is None:
        (suite_path.parent / name).write_bytes(b"not a safetensors file")
        spec = DataSpec("path", path=name, line=2)
    else:
        spec = _file(suite_path.parent, name, content)
    with pytest.raises(SuiteError, match=r"suite.yaml:2: data.source.path: .*" + message):
        resolve.resolve_tokens(spec, zoo_model, suite_path=suite_path)


def test_hf_tokens_stream_until_n_tokens(zoo_model, documents, monkeypatch):
    seen: list[str] = []

    def rows() -> Iterator[dict]:
        for d in documents:
            seen.append(d)
            yield {"text": d, "meta": 0}

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows())
    spec = DataSpec("hf", hf="toy/docs", split="train", column="text", n_tokens=64, context=32)
    tokens = resolve.resolve_tokens(spec, zoo_model)
    assert tokens.shape == (2, 32) and len(seen) < len(documents)
    with pytest.raises(ValueError, match="no text column 'body' .*columns: text, meta"):
        resolve.resolve_tokens(DataSpec("hf", hf="toy/docs", column="body", n_tokens=128),
                               zoo_model)
    with pytest.raises(ValueError, match="n_tokens is required"):
        resolve.resolve_tokens(DataSpec("hf", hf="toy/docs"), zoo_model)


# ---------------------------------------------------------------------------- hub failures

def _refuse(message: str, error: type[Exception] = OSError):
    def download(*args, **kwargs):
        raise error(message)

    return download


def test_hub_model_unavailable(monkeypatch):
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", _refuse(
        "We couldn't connect to 'https://huggingface.co' to load the files"))
    with pytest.raises(HubUnavailable, match=r"^suite.yaml: model: could not download "
                                             r"TransformerLens model 'gpt2-small' from the "
                                             r"Hugging Face Hub \(OSError: We couldn't"):
        resolve.resolve_model(ModelSpec("transformer_lens", "gpt2-small"), **CPU,
                              suite_path=Path("suite.yaml"))


def test_hub_dictionary_unavailable(monkeypatch):
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", _refuse(
        "cannot find the requested files in the local cache",
        huggingface_hub.errors.LocalEntryNotFoundError))
    with pytest.raises(HubUnavailable, match=r"^suite.yaml:7: dictionaries.res-jb-L0: could "
                                             r"not download SAE 'blocks.0.hook_resid_pre' of "
                                             r"release 'gpt2-small-res-jb' .*"
                                             r"LocalEntryNotFoundError"):
        resolve.resolve_dictionary(RES_JB, device="cpu", suite_path=Path("suite.yaml"))


def test_hub_dataset_unavailable(zoo_model, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _refuse(
        "Couldn't reach 'NeelNanda/pile-10k' on the Hub (LocalEntryNotFoundError)",
        ConnectionError))
    with pytest.raises(HubUnavailable, match=r"^suite.yaml:3: data.source.hf: could not "
                                             r"download dataset 'NeelNanda/pile-10k' \(split "
                                             r"'train'\) .*ConnectionError"):
        resolve.resolve_tokens(PILE, zoo_model, suite_path=Path("suite.yaml"))


def test_hub_failure_while_streaming(zoo_model, monkeypatch):
    def rows() -> Iterator[dict]:
        yield {"text": "Rose"}
        raise ConnectionError("connection reset")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows())
    with pytest.raises(HubUnavailable, match="connection reset"):
        resolve.resolve_tokens(PILE, zoo_model)


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: the offline path is not wired")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="the deadline needs SIGALRM")
def test_real_download_offline_is_hub_unavailable(monkeypatch, tmp_path):
    """The real sae_lens -> huggingface_hub path, with offline mode on and an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with _deadline(30), pytest.raises(HubUnavailable, match="res-jb-L0: could not download"):
        resolve.resolve_dictionary(RES_JB, device="cpu")


# ---------------------------------------------------------------------------- names

def test_unknown_release_and_sae_id_suggest_close_matches(suite_path):
    bad_release = DictionarySpec("x", "release", "gpt2-small-res-j", release="gpt2-small-res-j",
                                 sae_id="blocks.0.hook_resid_pre", line=8)
    with pytest.raises(SuiteError, match=r"suite.yaml:8: dictionaries.x: unknown sae_lens "
                                         r"release 'gpt2-small-res-j'; close matches: "
                                         r"gpt2-small-res-jb"):
        resolve.resolve_dictionary(bad_release, device="cpu", suite_path=suite_path)
    with pytest.raises(ValueError, match=r"no sae_id 'blocks.0.hook_resid_post'; close "
                                         r"matches: .*blocks.0.hook_resid_pre"):
        resolve.model_kwargs_for_release("gpt2-small-res-jb", "blocks.0.hook_resid_post")


def test_release_model_kwargs_offline(monkeypatch):
    kwargs = resolve.model_kwargs_for_release("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
    assert kwargs["center_writing_weights"] is True
    calls = []
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing",
                        lambda name, **kw: calls.append((name, kw)) or torch.nn.Linear(1, 1))
    resolve.resolve_model(ModelSpec("transformer_lens", "gpt2-small", kwargs={"n_ctx": 64}),
                          **CPU, dictionaries=[RES_JB])
    assert calls == [("gpt2-small", {"device": "cpu", "dtype": torch.float32,
                                     "center_writing_weights": True, "n_ctx": 64})]


def test_unknown_transformer_lens_name():
    with pytest.raises(ValueError, match="'gpt2-smal' is not a TransformerLens model name; "
                                         "close matches: gpt2-small"):
        resolve.resolve_model(ModelSpec("transformer_lens", "gpt2-smal"), **CPU)


# ---------------------------------------------------------------------------- factories

def test_factory_needs_permission_and_builds_the_object(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        "import torch\n\n"
        "def make_identity(width):\n"
        "    return lambda x: x * torch.ones(width)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = DictionarySpec("ident", "factory", "my_factories:make_identity", args={"width": 4},
                          hook="blocks.0.hook_resid_pre", line=11)
    with pytest.raises(SuiteError, match="dictionaries.ident: .*set allow_factory: true"):
        resolve.resolve_dictionary(spec, device="cpu", suite_path=tmp_path / "s.yaml")
    obj = resolve.resolve_dictionary(spec, device="cpu", allow_factory=True)
    (d,) = resolve.adapt(spec, obj)
    assert (d.name, d.read_hook, d.write_hook) == ("ident", *(["blocks.0.hook_resid_pre"] * 2))
    missing = DictionarySpec("m", "factory", "my_factories:nope", line=12)
    with pytest.raises(ValueError, match="cannot import factory 'my_factories:nope'"):
        resolve.resolve_dictionary(missing, device="cpu", allow_factory=True)
