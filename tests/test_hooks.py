"""Hook names from other ecosystems: the mapping both ways, and refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from saebench.hooks import activation_hook, module_hooks, module_path


@pytest.mark.parametrize(("module", "read", "write"), [
    ("layers.6", "blocks.6.hook_resid_pre", "blocks.6.hook_resid_post"),
    ("model.layers.6", "blocks.6.hook_resid_pre", "blocks.6.hook_resid_post"),
    ("transformer.h.0", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"),
    ("layers.11.mlp", "blocks.11.ln2.hook_normalized", "blocks.11.hook_mlp_out"),
    ("gpt_neox.layers.3.mlp", "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out"),
    ("model.layers.2.self_attn", "blocks.2.ln1.hook_normalized", "blocks.2.hook_attn_out"),
    ("transformer.h.2.attn", "blocks.2.ln1.hook_normalized", "blocks.2.hook_attn_out"),
])
def test_module_paths_map_to_module_hooks(module, read, write):
    assert module_hooks(module) == (read, write)


@given(layer=st.integers(0, 200), form=st.sampled_from(["layers.{n}", "layers.{n}.mlp",
                                                        "layers.{n}.self_attn"]))
def test_the_mapping_inverts_on_output_hooks(layer, form):
    canonical = form.format(n=layer)
    assert module_path(module_hooks(canonical)[1]) == canonical


@pytest.mark.parametrize("module", ["layers.6.mlp.down_proj", "embed_tokens", "layers.x",
                                    "lm_head", "blocks.6.hook_resid_pre"])
def test_an_unknown_module_is_refused_naming_the_known_forms(module):
    with pytest.raises(ValueError, match=rf"no TransformerLens hook is known for the module "
                                         rf"'{module}'; known forms: layers\.N"):
        module_hooks(module)


def test_a_hook_without_a_module_path_is_refused():
    with pytest.raises(ValueError, match="no Hugging Face module path is known"):
        module_path("blocks.1.attn.hook_z")


@pytest.mark.parametrize(("name", "hook"), [("resid_post_layer_3", "blocks.3.hook_resid_post"),
                                            ("mlp_out_layer_0", "blocks.0.hook_mlp_out"),
                                            ("attn_out_layer_11", "blocks.11.hook_attn_out")])
def test_dictionary_learning_activation_names_map_to_their_hook(name, hook):
    assert activation_hook(name) == hook


def test_a_name_that_is_no_activation_name_is_refused():
    with pytest.raises(ValueError, match="not an activation name"):
        activation_hook("resid_pre_layer")
