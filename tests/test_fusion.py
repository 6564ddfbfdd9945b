"""The decoupled fusion computed without its mask equals the masked attention it stands for."""

import pytest
import torch

from fusioner.model.fusion import DecoupledFusion, fusion_mask


def _masked_reference(fusion: DecoupledFusion, tokens: torch.Tensor, text: torch.Tensor):
    """The decoupled rule as written in the mask: every block over ``[n ; k]`` with ``fusion_mask``."""
    n, k = tokens.shape[1], text.shape[1]
    x = torch.cat([fusion.visual_in(tokens), fusion.text_in(text) + fusion.class_embed], dim=1)
    for block in fusion.blocks:
        x = block(x, attn_mask=fusion_mask(n, k, x.device))
    visual, classes = fusion._out(x, n)
    return visual[:, None], classes


@pytest.mark.parametrize("layout", ["default", "released"])
@pytest.mark.parametrize("k", [1, 3, 40])
def test_decoupled_fusion_equals_the_masked_attention_values_and_gradients(layout, k):
    torch.manual_seed(0)
    fusion = DecoupledFusion(vision_dim=12, text_dim=10, dim=16, depth=2, heads=4, layout=layout).train()
    tokens = torch.randn(2, 9, 12, requires_grad=True)
    text = torch.randn(2, k, 10, requires_grad=True)

    got = fusion(tokens, text)
    want = _masked_reference(fusion, tokens, text)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    grads = [
        torch.autograd.grad(sum(t.square().sum() for t in out), [tokens, text, *fusion.parameters()])
        for out in (got, want)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_names_output_does_not_depend_on_the_other_names():
    torch.manual_seed(1)
    fusion = DecoupledFusion(vision_dim=8, text_dim=8, dim=16, depth=2, heads=2).eval()
    tokens, text = torch.randn(1, 6, 8), torch.randn(1, 5, 8)
    visual, classes = fusion(tokens, text)
    visual_one, classes_one = fusion(tokens, text[:, 2:3])
    torch.testing.assert_close(visual, visual_one, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(classes[:, 2:3], classes_one, rtol=1e-5, atol=1e-6)
