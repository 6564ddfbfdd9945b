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
from torch.nn import functional as F

from fusioner.config import register_choices


def fusion_mask(n: int, k: int, device: torch.device) -> Tensor:
    """``(n+k) (n+k)`` boolean attention mask (True = may attend) of the decoupled rule.

    The rule as a mask, for reference and tests: :func:`decoupled_block` computes the same attention
    without building it (the mask's ``(n+k)^2`` scores are mostly thrown away when ``k >> n``).
    """
    mask = torch.zeros(n + k, n + k, dtype=torch.bool, device=device)
    mask[:, :n] = True  # everyone reads the patches
    mask[:n, n:] = False  # patches do not read names
    own = torch.arange(n, n + k, device=device)
    mask[own, own] = True  # a name reads itself, no other name
    return mask


def _decoupled_attention(attn: nn.Module, x: Tensor, n: int) -> Tensor:
    """timm ``Attention`` under the decoupled rule, on ``x = [n patches ; k names]`` (``b (n+k) c``).

    Patches attend to patches only: plain SDPA over ``n`` tokens (flash / memory-efficient kernels
    apply). A name attends to the ``n`` patches and to itself: its ``n + 1`` scores are the patch
    scores ``q k_p^T`` (``b h k n``) plus its own ``q . k`` (``b h k 1``), one softmax over both.
    ``n^2 + k (n + 1)`` scores instead of the mask's ``(n + k)^2``: at ``k = 1175`` names over
    ``n = 196`` patches, 7x fewer.
    """
    qkv = rearrange(attn.qkv(x), "b t (three h d) -> three b h t d", three=3, h=attn.num_heads)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    drop = attn.attn_drop.p if attn.training else 0.0
    patches = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], dropout_p=drop)
    qc, kc, vc = q[:, :, n:] * attn.scale, k[:, :, n:], v[:, :, n:]
    scores = torch.cat([qc @ k[:, :, :n].transpose(-2, -1), (qc * kc).sum(-1, keepdim=True)], dim=-1)
    weights = attn.attn_drop(scores.softmax(dim=-1))  # b h k (n+1)
    names = weights[..., :n] @ v[:, :, :n] + weights[..., n:] * vc
    out = rearrange(torch.cat([patches, names], dim=2), "b h t d -> b t (h d)")
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def decoupled_block(block: Block, x: Tensor, n: int) -> Tensor:
    """timm ``Block.forward`` with :func:`_decoupled_attention` in place of masked attention."""
    x = x + block.drop_path1(block.ls1(_decoupled_attention(block.attn, block.norm1(x), n)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


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

    def _out(self, x: Tensor, n: int) -> tuple[Tensor, Tensor]:
        x = self.norm(x)
        return self.visual_out(x[:, :n]), self.class_out(x[:, n:])


class DecoupledFusion(_Fusion):
    def forward(self, tokens: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """tokens ``b n cv``, text ``b k ct`` -> (visual ``b 1 n d``, classes ``b k class_dim``)."""
        n = tokens.shape[1]
        x = torch.cat([self.visual_in(tokens), self.text_in(text) + self.class_embed], dim=1)
        for block in self.blocks:
            x = decoupled_block(block, x, n)
        visual, classes = self._out(x, n)
        return visual[:, None], classes


class JointFusion(_Fusion):
    def forward(self, tokens: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """tokens ``b n cv``, text ``b k ct`` -> (visual ``b k n d``, classes ``b k class_dim``)."""
        b, n, k = tokens.shape[0], tokens.shape[1], text.shape[1]
        visual = repeat(self.visual_in(tokens), "b n d -> (b k) n d", k=k)
        names = rearrange(self.text_in(text) + self.class_embed, "b k d -> (b k) 1 d")
        x = torch.cat([visual, names], dim=1)
        for block in self.blocks:
            x = block(x)
        visual, classes = self._out(x, n)
        return (
            rearrange(visual, "(b k) n d -> b k n d", b=b),
            rearrange(classes, "(b k) 1 d -> b k d", b=b),
        )


FUSIONS: dict[str, type[_Fusion]] = {"decoupled": DecoupledFusion, "joint": JointFusion}
register_choices("fusion_layout", FUSION_LAYOUTS)
register_choices("fusion_attention", FUSIONS)
