"""Cross-modal transformer over visual patch tokens and class-name tokens, two attention rules.

Visual and class tokens are projected to a shared width ``d`` and attended over as one sequence
of ``[n visual ; class]`` tokens. ``FUSIONS`` holds the two rules (config key ``fusion_attention``):

- ``joint`` (the paper's): every token reads every token, one name per sequence, as the released
  Fusioner code ran it. Patches are conditioned on the name, so K names are K sequences (batched
  as ``(b k)``): the cost grows with K, and a name's mask never depends on the other names asked.
- ``decoupled``: one sequence ``[n visual ; k class]`` where a class token reads the patches and
  itself, never another class token, and patches never read class tokens. One pass with K names
  gives the numbers of K one-name passes at about the price of one; the price is that the patch
  features are not conditioned on the query text.

Both return the fused patches as ``b q n d`` with ``q = k`` (joint: one patch set per name) or
``q = 1`` (decoupled: one patch set shared by every name), and the class tokens as ``b k d``.

``FUSION_LAYOUTS`` (config key ``fusion_layout``) holds the details around the attention rule:
``default`` (timm's Block LayerNorm eps 1e-6, output projections with a bias, a class embedding
drawn at std 0.02) and ``released``, the released Fusioner ``Fusion``: LayerNorm eps 1e-5 in the
blocks, bias-free output projections (``x @ proj_patch``) and a class embedding drawn from N(0, 1)
as its ``nn.Embedding(1, d)``. The parameter names stay ours; fusioner/model/released.py maps the
released names onto them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange, repeat
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from fusioner.config import register_choices


def fusion_mask(n: int, k: int, device: torch.device) -> Tensor:
    """``(n+k) (n+k)`` boolean attention mask (True = may attend) of the decoupled rule."""
    mask = torch.zeros(n + k, n + k, dtype=torch.bool, device=device)
    mask[:, :n] = True  # everyone reads the patches
    mask[:n, n:] = False  # patches do not read names
    own = torch.arange(n, n + k, device=device)
    mask[own, own] = True  # a name reads itself, no other name
    return mask


@dataclass(frozen=True)
class FusionLayout:
    norm_layer: Callable[..., nn.Module] | None  # the blocks' LayerNorm; None = timm's own (eps 1e-6)
    out_bias: bool  # output projections with a bias
    init_class_embed: Callable[[Tensor], object]


FUSION_LAYOUTS: dict[str, FusionLayout] = {
    "default": FusionLayout(None, True, partial(nn.init.trunc_normal_, std=0.02)),
    # eps 1e-5 is PyTorch's LayerNorm default, what the released Block uses.
    "released": FusionLayout(partial(nn.LayerNorm, eps=1e-5), False, nn.init.normal_),
}


class _Fusion(nn.Module):
    """Input projections, the blocks and the output projections; subclasses lay out the sequence."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        dim: int = 512,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        class_dim: int | None = None,
        layout: str = "default",
    ) -> None:
        super().__init__()
        if layout not in FUSION_LAYOUTS:
            raise ValueError(f"fusion layout must be one of {', '.join(FUSION_LAYOUTS)}, got {layout!r}")
        style = FUSION_LAYOUTS[layout]
        self.visual_in = nn.Sequential(
            nn.LayerNorm(vision_dim), nn.Linear(vision_dim, dim), nn.LayerNorm(dim)
        )
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        # One learned vector marks every class token as "a name".
        self.class_embed = nn.Parameter(torch.zeros(dim))
        style.init_class_embed(self.class_embed)
        # timm's pre-norm Block runs attention through F.scaled_dot_product_attention; its parameter
        # names are the released Block's (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).
        norm = {"norm_layer": style.norm_layer} if style.norm_layer is not None else {}
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, **norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.visual_out = nn.Linear(dim, dim, bias=style.out_bias)
        self.class_out = nn.Linear(dim, class_dim or dim, bias=style.out_bias)

    def _run(self, x: Tensor, n: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        x = self.norm(x)
        return self.visual_out(x[:, :n]), self.class_out(x[:, n:])


class DecoupledFusion(_Fusion):
    def forward(self, tokens: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """tokens ``b n cv``, text ``b k ct`` -> (visual ``b 1 n d``, classes ``b k class_dim``)."""
        n, k = tokens.shape[1], text.shape[1]
        x = torch.cat([self.visual_in(tokens), self.text_in(text) + self.class_embed], dim=1)
        visual, classes = self._run(x, n, fusion_mask(n, k, x.device))
        return visual[:, None], classes


class JointFusion(_Fusion):
    def forward(self, tokens: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """tokens ``b n cv``, text ``b k ct`` -> (visual ``b k n d``, classes ``b k class_dim``)."""
        b, n, k = tokens.shape[0], tokens.shape[1], text.shape[1]
        visual = repeat(self.visual_in(tokens), "b n d -> (b k) n d", k=k)
        names = rearrange(self.text_in(text) + self.class_embed, "b k d -> (b k) 1 d")
        visual, classes = self._run(torch.cat([visual, names], dim=1), n, None)
        return (
            rearrange(visual, "(b k) n d -> b k n d", b=b),
            rearrange(classes, "(b k) 1 d -> b k d", b=b),
        )


FUSIONS: dict[str, type[_Fusion]] = {"decoupled": DecoupledFusion, "joint": JointFusion}
register_choices("fusion_layout", FUSION_LAYOUTS)
register_choices("fusion_attention", FUSIONS)
