"""Each design's defining operations against its published formula (issue 25), on hand-built or
random cases whose expected numbers are derived here from the formula, and on CLIP at a tiny
random-init width (``clip_vitb16`` with ``weights='random'``, the same adapter code as the real weights)."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from torch.nn import functional as F

from fusioner.adapters import create_text, create_vision
from fusioner.methods.registry import METHODS, call_head
from fusioner.methods.zegclip import (
    ZegCLIPConfig,
    ZegCLIPHead,
    relationship_descriptor,
    zegclip_loss,
)

# A CLIP ViT-B/16 and its text tower at a tiny width: same builder, same dense-token code, random weights.
TINY_VISION = dict(embed_dim=32, vision_cfg=dict(width=64, layers=2, head_width=32))
TINY_TEXT = dict(embed_dim=32, text_cfg=dict(width=64, layers=2, heads=2))


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    vision = create_vision("clip_vitb16", weights="random", **TINY_VISION)
    text = create_text("clip_vitb16_text", weights="random", **TINY_TEXT)
    return vision, text


# -- ZegCLIP ---------------------------------------------------------------------------------------
def test_clip_cls_is_the_class_token_after_ln_post_and_the_projection(tiny_clip):
    """ZegCLIP's image term: CLIP's pooled embedding (``ln_post(x[:, 0]) @ proj``), i.e. what
    open_clip's own image tower returns, in the space of the text embeddings."""
    vision, _ = tiny_clip
    images = torch.rand(2, 3, 224, 224)  # the tower's own grid: no position resampling
    out = vision(images)
    with torch.no_grad():
        pooled = vision.visual((images - vision.mean) / vision.std)  # open_clip: ln_post + proj of CLS
    torch.testing.assert_close(out.cls, pooled, rtol=1e-5, atol=1e-5)
    assert out.cls.shape[-1] == vision.embed_dim == tiny_clip[1].embed_dim


def test_relationship_descriptor_is_text_times_image_then_text():
    t = torch.tensor([[[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]]])  # b k c
    g = torch.tensor([[2.0, 0.5, -1.0]])  # b c
    expected = torch.tensor([[[2.0, 1.0, -3.0, 1.0, 2.0, 3.0], [0.0, -0.5, -0.5, 0.0, -1.0, 0.5]]])
    assert torch.equal(relationship_descriptor(t, g), expected)


def _zegclip(vision_dim: int = 32, text_dim: int = 32, **kw) -> ZegCLIPHead:
    torch.manual_seed(0)
    return ZegCLIPHead(ZegCLIPConfig(vision_dim=vision_dim, text_dim=text_dim, dim=32, heads=4, **kw)).eval()


def test_zegclip_queries_are_q_proj_of_the_descriptor_of_unprojected_text_and_unit_cls():
    head = _zegclip()
    assert isinstance(head.global_in, torch.nn.Identity)  # CLIP's towers share a width: no map
    text = F.normalize(torch.randn(1, 3, 32), dim=-1)
    cls = torch.randn(1, 32) * 7
    captured = {}
    head.decoder[0].register_forward_pre_hook(lambda _m, args: captured.update(q=args[0]))
    head(torch.randn(1, 16, 32), (4, 4), text, cls=cls)
    g = cls / cls.norm()
    expected = head.q_proj(torch.cat([text * g[:, None], text], dim=-1))
    torch.testing.assert_close(captured["q"], expected)


def test_zegclip_reads_the_cls_it_is_given_and_refuses_to_run_without_one():
    head = _zegclip()
    tokens, text = torch.randn(1, 16, 32), F.normalize(torch.randn(1, 2, 32), dim=-1)
    with torch.no_grad():
        a = head(tokens, (4, 4), text, cls=torch.randn(1, 32))
        b = head(tokens, (4, 4), text, cls=torch.randn(1, 32))
    assert not torch.allclose(a, b)
    with pytest.raises(Exception, match="CLS token"):
        head(tokens, (4, 4), text)
    # A backbone without a class token: the mean of its tokens stands in (configured, not silent).
    mean_head = _zegclip(global_token="mean")
    with torch.no_grad():
        assert torch.isfinite(mean_head(tokens, (4, 4), text)).all()


def test_zegclip_masks_are_the_last_layers_head_averaged_attention_logits():
    head = _zegclip()
    tokens, cls = torch.randn(2, 12, 32), torch.randn(2, 32)
    text = F.normalize(torch.randn(2, 5, 32), dim=-1)
    captured = {}
    last = head.decoder[-1]
    last.register_forward_pre_hook(lambda _m, args: captured.update(q=args[0], p=args[1]))
    with torch.no_grad():
        logits = head(tokens, (3, 4), text, size=(3, 4), cls=cls)
    q, p = last.q(captured["q"]), last.k(captured["p"])  # b k d, b n d
    e = 32 // 4
    per_head = [
        q[..., i * e : (i + 1) * e] @ p[..., i * e : (i + 1) * e].transpose(1, 2) / math.sqrt(e)
        for i in range(4)
    ]
    expected = rearrange(torch.stack(per_head).mean(0), "b k (h w) -> b k h w", h=3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_zegclip_has_three_cross_attention_layers_and_no_patch_block():
    head = _zegclip()
    assert len(head.decoder) == 3
    assert not any(
        "Block" in type(m).__name__ or isinstance(m, torch.nn.MultiheadAttention) for m in head.modules()
    )
    assert [type(m).__name__ for m in head.visual_in] == ["Linear", "LayerNorm"]


def test_zegclip_loss_is_focal_times_100_plus_dice_over_present_names():
    # One image, two names, two pixels, every logit 0 (p = 0.5). Name 0 covers both pixels, name 1 none.
    logits = torch.zeros(1, 2, 1, 2)
    targets = torch.tensor([[[[1, 1]], [[0, 0]]]], dtype=torch.uint8)
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    ln2 = math.log(2)
    # focal = alpha_t (1 - p_t)^2 BCE: 0.25 * 0.25 * ln2 on a positive, 0.75 * 0.25 * ln2 on a negative;
    # mean over the pixels of each mask, summed over both masks (absent names count).
    focal = 0.25 * 0.25 * ln2 + 0.75 * 0.25 * ln2
    # dice of name 0 only: 1 - (2 * 1 + 1) / (1 + 2 + 1); divided by 1 present name.
    dice = 1 - 3 / 4
    torch.testing.assert_close(zegclip_loss(logits, targets, valid), torch.tensor(100 * focal + dice))
    # An ignored pixel drops out of both terms.
    valid[0, 0, 1] = False
    focal_one = 0.25 * 0.25 * ln2 + 0.75 * 0.25 * ln2
    dice_one = 1 - (2 * 0.5 + 1) / (0.5 + 1 + 1)
    torch.testing.assert_close(zegclip_loss(logits, targets, valid), torch.tensor(100 * focal_one + dice_one))


def test_zegclip_trains_on_every_seen_name_of_every_image(tiny_clip):
    from types import SimpleNamespace

    from fusioner.methods.objective import Objective

    vision, _ = tiny_clip
    head = _zegclip()
    config = SimpleNamespace(
        dice_weight=1.0, ce_weight=0.0, spectral_weight=0.0, spectral_eigs=2, spectral_segments=2,
        spectral_knn=0, seed=0, pseudo_labels="none", pseudo_weight=0.0, pseudo_clusters=2,
        pseudo_scales=["1"], global_loss_weight=0.0,
    )  # fmt: skip
    objective = Objective(config, head, vision, 32)
    seen = {}
    head.register_forward_pre_hook(lambda _m, args: seen.update(k=args[2].shape[1]))
    vocab = F.normalize(torch.randn(7, 32), dim=-1)
    class_idx = torch.tensor([[0, 3], [5, 1]])  # the sampled names: ZegCLIP ignores the sampling
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[0, :4] = 3
    loss = objective(head, torch.randn(2, 16, 32), (4, 4), vocab, class_idx, target, cls=torch.randn(2, 32))
    assert seen["k"] == 7 and torch.isfinite(loss)


def test_call_head_hands_the_cls_only_to_heads_that_read_it():
    assert METHODS["zegclip"].takes_cls and not METHODS["fusioner"].takes_cls
    head = _zegclip()
    tokens, text, cls = torch.randn(1, 16, 32), F.normalize(torch.randn(1, 2, 32), dim=-1), torch.randn(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            call_head(head, tokens, (4, 4), text, cls), head(tokens, (4, 4), text, cls=cls)
        )


# -- ZegFormer -------------------------------------------------------------------------------------
from fusioner.methods.zegformer import (  # noqa: E402
    ZegFormerConfig,
    ZegFormerHead,
    fuse,
    mask_pooled,
    semantic_map,
    set_loss,
)


def test_zegformer_fusion_is_geometric_with_lambda_two_thirds_swapped_for_unseen_names():
    # One segment, names (seen, seen, unseen) + no-object; the logits are log-probabilities.
    segment = torch.tensor([[[0.4, 0.2, 0.3, 0.1]]]).log()
    image = torch.tensor([[[0.1, 0.3, 0.5, 0.1]]]).log()
    seen = torch.tensor([[True, True, False]])
    out = fuse(segment, image, seen, 2 / 3)
    clip_seen = (0.1 + 0.3) / 2  # CLIP's seen scores are replaced by their mean
    expected = torch.tensor([[[
        0.4 ** (2 / 3) * clip_seen ** (1 / 3),
        0.2 ** (2 / 3) * clip_seen ** (1 / 3),
        0.3 ** (1 / 3) * 0.5 ** (2 / 3),
    ]]])  # fmt: skip
    torch.testing.assert_close(out, expected)


def test_mask_pooling_averages_the_clip_tokens_under_the_binarised_mask():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]]])  # b n c
    masks = torch.tensor([[[4.0, -2.0, 0.5, -9.0], [-1.0, -1.0, -1.0, -1.0]]])  # b s n
    out = mask_pooled(tokens, masks)
    torch.testing.assert_close(out[0, 0], torch.tensor([2.0, 0.0]))  # tokens 0 and 2
    s = torch.tensor(-1.0).sigmoid()  # nothing passes 0.5: the soft mask, equal weights here
    torch.testing.assert_close(out[0, 1], (tokens[0] * s).sum(0) / (4 * s))


def test_semantic_inference_sums_segment_probabilities_times_mask_probabilities():
    probs = torch.tensor([[[0.7, 0.1], [0.2, 0.6]]])  # b s k
    masks = torch.tensor([[[0.0, 2.0], [1.0, -1.0]]])  # b s n
    m = masks.sigmoid()[0]
    expected = torch.stack([0.7 * m[0] + 0.2 * m[1], 0.1 * m[0] + 0.6 * m[1]])[None]
    torch.testing.assert_close(semantic_map(probs, masks), expected)


def _zegformer(vision_dim=32, text_dim=32) -> ZegFormerHead:
    torch.manual_seed(0)
    return ZegFormerHead(
        ZegFormerConfig(vision_dim=vision_dim, text_dim=text_dim, dim=32, depth=1, queries=3)
    )


def test_zegformer_classifies_the_projected_query_embedding_with_a_learned_no_object():
    head = _zegformer()
    q = torch.randn(1, 3, 32)
    names = F.normalize(torch.randn(1, 2, 32), dim=-1)
    x = F.normalize(head.projection(q), dim=-1)
    expected = torch.cat([x @ names[0].T, x @ head.no_object.T], -1) * head.scale
    torch.testing.assert_close(head.classify(q, names), expected)


def test_set_loss_matches_queries_on_class_mask_and_dice_then_ce_with_no_object():
    # Two queries, one region (name 1 of 2) on the left half of a 2 x 2 image.
    classes = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]])  # b s (k + 1)
    masks = torch.tensor([[[[-3.0, 2.0], [-3.0, 2.0]], [[4.0, -4.0], [4.0, -4.0]]]])  # b s 2 2
    target = torch.tensor([[[2, 0], [2, 0]]])
    loss = set_loss(classes, masks, target)
    # Query 1 predicts name 1 and covers the left half: it is the match; query 0 learns no-object.
    ce = F.cross_entropy(classes[0], torch.tensor([2, 1]), weight=torch.tensor([1.0, 1.0, 0.1]))
    logit, truth = masks[0, 1].flatten(), torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = logit.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logit, truth, reduction="none")
    p_t = p * truth + (1 - p) * (1 - truth)
    focal = ((0.25 * truth + 0.75 * (1 - truth)) * (1 - p_t) ** 2 * bce).mean()
    dice = 1 - (2 * (p * truth).sum() + 1) / (p.sum() + truth.sum() + 1)
    torch.testing.assert_close(loss, ce + 20 * focal + dice)


def test_zegformer_names_segments_with_frozen_clip_tokens_only_at_inference(tiny_clip):
    vision, text = tiny_clip
    from types import SimpleNamespace

    from fusioner.methods.zegformer import _config

    settings = SimpleNamespace(
        dim=32, depth=1, heads=4, mlp_ratio=4.0, temperature=0.07, learn_temperature=False,
        zegformer_grouping="queries", zegformer_queries=3, zegformer_lambda=2 / 3, spectral_eigs=2, seed=0,
    )  # fmt: skip
    assert _config(settings, vision, text).image_branch  # CLIP's pair shares one space
    head = _zegformer()
    out = vision(torch.rand(1, 3, 64, 64))
    names = text(["cat", "dog", "cow"])[None]
    head.remember_seen(names[0, :2])
    assert head.seen_flags(names).tolist() == [[True, True, False]]
    head.eval()
    with torch.no_grad():
        fused = head(out.tokens, out.grid, names)
        head.config = type(head.config)(**{**head.config.__dict__, "image_branch": False})
        plain = head(out.tokens, out.grid, names)
    assert fused.shape == plain.shape and not torch.allclose(fused, plain)


# -- SAZS ------------------------------------------------------------------------------------------
from fusioner.methods import sazs as sazs_module  # noqa: E402
from fusioner.methods.sazs import SAZSRefiner, binary_eigen_masks, mask_iou, swap_in  # noqa: E402


def _halves(gh: int = 6, gw: int = 8, c: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    left = torch.zeros(gh, gw, dtype=torch.bool)
    left[:, : gw // 2] = True
    tokens = torch.where(left[..., None], torch.eye(c)[0], torch.eye(c)[1]) + 0.05 * torch.randn(
        gh, gw, c, generator=g
    )
    return rearrange(tokens, "h w c -> 1 (h w) c"), left


def test_binary_eigen_masks_hold_both_halves_of_the_fiedler_vector():
    tokens, left = _halves()
    masks = binary_eigen_masks(tokens, (6, 8), eigs=5)
    assert masks.shape == (1, 10, 6, 8)
    # Eigenvector 1 splits the two regions; its two halves are candidates 0 and 5 (either sign).
    assert {masks[0, 0].equal(left), masks[0, 5].equal(left)} == {True, False}
    assert masks[0, 0].equal(~masks[0, 5])


def test_mask_iou_counts_intersection_over_union():
    pred = torch.tensor([[[[1, 1, 0, 0]], [[0, 0, 0, 0]]]], dtype=torch.bool)  # b k 1 4
    masks = torch.tensor([[[[1, 1, 1, 0]], [[0, 0, 1, 1]]]], dtype=torch.bool)  # b m 1 4
    torch.testing.assert_close(mask_iou(pred, masks), torch.tensor([[[2 / 3, 0.0], [0.0, 0.0]]]))


def test_the_best_matching_eigen_mask_is_swapped_in_without_any_label():
    masks = torch.tensor([[[[1, 1, 1, 0]], [[0, 0, 0, 1]]]], dtype=torch.bool)
    logits = torch.tensor([[[[3.0, 2.0, -1.0, -4.0]]]])  # predicts the first two pixels
    # IoU with mask 0 is 2/3, with mask 1 is 0: mask 0 replaces the prediction, magnitudes kept.
    torch.testing.assert_close(swap_in(logits, masks, 0.5), torch.tensor([[[[3.0, 2.0, 1.0, -4.0]]]]))
    assert torch.equal(swap_in(logits, masks, 0.7), logits)  # 2/3 < 0.7: the prediction stays


def test_the_eigen_masks_are_computed_once_per_image_not_per_chunk_of_names(monkeypatch):
    tokens, _ = _halves()
    calls = []
    real = sazs_module.binary_eigen_masks
    monkeypatch.setattr(sazs_module, "binary_eigen_masks", lambda *a: calls.append(1) or real(*a))
    refiner = SAZSRefiner(min_iou=0.5, eigs=3)
    for _ in range(3):
        refiner(torch.randn(1, 2, 12, 16), tokens, (6, 8))
    assert len(calls) == 1


# -- the CLS token through the cache and the inference path ------------------------------------------
def test_the_cache_stores_each_items_clip_cls_and_zegclip_reads_it_like_a_fresh_encoding(
    voc_folder, tmp_path, tiny_clip
):
    from fusioner.data.folder import FolderDataset
    from fusioner.data.transforms import resize
    from fusioner.engine.cache import FeatureCache, cache_key, fill_cache
    from fusioner.inference import image_logits

    vision, text = tiny_clip
    dataset = FolderDataset(voc_folder, "val")
    cache = FeatureCache(tmp_path, cache_key(vision, 64, "folder:test", dataset.vocabulary))
    fill_cache(cache, vision, dataset, 64, batch_size=2, progress=False)
    sample = resize(dataset[0], 64)
    item = cache.read(sample["id"])
    fresh = vision(sample["image"][None])
    assert item.cls is not None and item.cls.shape == (vision.embed_dim,)
    torch.testing.assert_close(item.cls.float(), fresh.cls[0], rtol=2e-3, atol=2e-3)  # stored as fp16
    assert torch.equal(cache.read_cls(sample["id"]), item.cls)  # what cached training reads per example

    model = type("Model", (), {})()  # what inference.py reads of a model: vision, head, refiner
    model.vision, model.head, model.refiner = vision, _zegclip().eval(), None
    names = text(["cat", "dog"])
    with torch.no_grad():
        cached = image_logits(
            model, sample["image"], names, size=64, tokens=item.tokens.float(), cls=item.cls.float()
        )
        computed = image_logits(model, sample["image"], names, size=64)
    torch.testing.assert_close(cached, computed, rtol=2e-2, atol=2e-2)


# -- ZegCLIP's deep prompts inside CLIP ------------------------------------------------------------------
def _prompted_clip(tiny_clip, tokens: int = 3):
    from types import SimpleNamespace

    from fusioner.methods.zegclip import _config

    vision, text = tiny_clip
    settings = SimpleNamespace(
        dim=32, heads=4, mlp_ratio=4.0, temperature=0.07, deep_prompts=tokens, vision="clip_vitb16"
    )
    torch.manual_seed(0)
    head = ZegCLIPHead(_config(settings, vision, text))
    return head, head.attach(vision)


def test_zegclip_prompts_in_clip_are_projected_placed_after_cls_and_replaced_at_every_layer(tiny_clip):
    head, prompted = _prompted_clip(tiny_clip)
    head.eval()  # no dropout: the inserted prompts are exactly proj(prompts[i])
    parts = head.clip_prompts
    assert head.config.prompt_style == "zegclip" and parts.prompts.shape == (2, 3, 64)
    bound = math.sqrt(6 / (3 * 16 * 16 + 64))
    assert parts.prompts.abs().max() <= bound
    seen, post_inputs = [], []
    blocks = prompted.inner.visual.transformer.resblocks
    hooks = [
        b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone())) for b in blocks
    ]
    hooks.append(
        prompted.inner.visual.ln_post.register_forward_pre_hook(lambda _m, a: post_inputs.append(a[0]))
    )
    out = prompted(torch.rand(1, 3, 64, 64))
    for hook in hooks:  # the fixture's tower is shared with the other tests
        hook.remove()
    for i, x in enumerate(seen):
        assert x.shape[1] == 1 + 3 + 16  # class token, this layer's prompts, the patches
        torch.testing.assert_close(x[0, 1:4], parts.proj(parts.prompts[i]))
    last = blocks[-1](seen[-1])
    torch.testing.assert_close(post_inputs[0], parts.norm(last))  # prompt norm, then CLIP's ln_post
    assert out.tokens.shape == (1, 16, 32) and out.cls.shape == (1, 32)


def test_zegclip_prompts_train_and_leave_clip_bit_identical(tiny_clip):
    head, prompted = _prompted_clip(tiny_clip)
    backbone = {k: v.clone() for k, v in prompted.inner.state_dict().items()}
    before = prompted.fingerprint()
    out = prompted(torch.rand(2, 3, 64, 64))
    names = tiny_clip[1](["cat", "dog"])
    head(out.tokens, out.grid, names, cls=out.cls).sum().backward()
    parts = head.clip_prompts
    assert all(p.grad is not None for p in (parts.prompts, parts.proj.weight, parts.norm.weight))
    torch.optim.SGD(head.parameters(), lr=1.0).step()
    assert all(torch.equal(v, backbone[k]) for k, v in prompted.inner.state_dict().items())
    assert prompted.fingerprint() != before  # tokens cached under the old prompts are never reused


def test_the_spectral_hybrid_trains_each_segment_on_its_majority_label():
    from fusioner.methods.zegformer import majority_loss

    classes = torch.tensor([[[1.0, 0.0, 2.0], [0.5, 1.5, 0.0], [0.0, 0.0, 0.0]]])  # b s (k + 1), k = 2
    segments = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    segments[0, 0, 0], segments[0, 1, 1, 0], segments[0, 2, 1, 1] = True, True, True
    target = torch.tensor([[[2, 2], [0, -1]]])  # segment 0: name 1; segment 1: background; 2: ignored
    expected = F.cross_entropy(classes[0], torch.tensor([1, 2, 2]), weight=torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(majority_loss(classes, segments, target), expected)
