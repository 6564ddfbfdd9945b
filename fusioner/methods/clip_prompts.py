"""ZegCLIP's deep prompt tuning inside a frozen CLIP ViT (``method: zegclip``, ``deep_prompts: N``).

As ZegCLIP's ``VPTCLIPVisionTransformer`` (ZiqinZhou66/ZegCLIP, ``models/backbone/img_encoder.py``)
builds it: one set of N prompt tokens per transformer layer, each set through a shared linear
*prompt projection* and dropout 0.1, placed right after the class token; the first layer's set is
inserted after ``ln_pre``, every later layer's replaces the previous layer's prompts; after the last
layer a *prompt norm* (LayerNorm, eps 1e-6) and then CLIP's own ``ln_post`` and projection. The
prompts start uniform in ``+-sqrt(6 / (3 p^2 + width))`` (p the patch size), the projection with
Kaiming-normal (fan out). The prompts, projection and norm belong to the head
(:class:`fusioner.methods.zegclip.ZegCLIPHead`); the CLIP weights never change.
"""

from __future__ import annotations

import hashlib
import math

import torch
from einops import rearrange, repeat
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from fusioner.adapters.base import VisionAdapter, VisionOutput
from fusioner.errors import FusionerError


def is_clip_tower(vision: VisionAdapter) -> bool:
    """Whether ``vision`` is an open_clip ViT image tower (the adapter ZegCLIP's prompts enter)."""
    visual = getattr(vision, "visual", None)
    return visual is not None and hasattr(visual, "transformer") and hasattr(visual, "conv1")


class ClipPrompts(nn.Module):
    """The trainable prompt parts: ``layers x tokens x width`` prompts, their projection and norm."""

    def __init__(self, layers: int, tokens: int, width: int, patch: int, dropout: float = 0.1) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        self.prompts = nn.Parameter(torch.empty(layers, tokens, width).uniform_(-bound, bound))
        self.proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def layer(self, i: int, batch: int, dtype: torch.dtype) -> Tensor:
        """Layer ``i``'s prompts, projected, as ``b t c``."""
        return repeat(self.dropout(self.proj(self.prompts[i].to(dtype))), "t c -> b t c", b=batch)


class PromptedCLIP(VisionAdapter):
    """A frozen open_clip ViT adapter run with ZegCLIP's deep prompts (owned by the head)."""

    def __init__(self, inner: VisionAdapter, prompts: ClipPrompts) -> None:
        if not is_clip_tower(inner):
            raise FusionerError(f"{inner.name}: ZegCLIP's CLIP prompts need an open_clip ViT image tower")
        super().__init__(
            inner.name,
            inner.embed_dim,
            inner.patch_size,
            inner.mean.flatten().tolist(),
            inner.std.flatten().tolist(),
        )
        self.inner = inner
        # A tuple, not a submodule: freeze() must not freeze the prompts, nor the adapter's state hold them.
        self._prompts = (prompts,)
        self.freeze()

    @property
    def preprocessing(self) -> dict[str, object]:
        return self.inner.preprocessing

    def fingerprint(self) -> str:
        """The backbone's digest and the prompts': cached tokens are never read for other prompts."""
        h = hashlib.sha1(self.inner.fingerprint().encode())
        for value in self._prompts[0].state_dict().values():
            h.update(value.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def forward(self, images: Tensor) -> VisionOutput:
        # Autograd stays on (the base adapter's forward is no-grad): gradients reach the prompts.
        return self.encode(self.normalized(images))

    def encode(self, x: Tensor) -> VisionOutput:
        v, prompts = self.inner.visual, self._prompts[0]
        x = v.conv1(x)
        gh, gw = x.shape[-2:]
        x = rearrange(x, "b c h w -> b (h w) c")
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resample_abs_pos_embed(
            v.positional_embedding[None], new_size=[gh, gw], old_size=list(v.grid_size), num_prefix_tokens=1
        )
        x = v.ln_pre(v.patch_dropout(torch.cat([cls, x], dim=1) + pos.to(x.dtype)))
        t = prompts.prompts.shape[1]
        batch_first = getattr(v.transformer, "batch_first", True)
        for i, block in enumerate(v.transformer.resblocks):
            rest = x[:, 1:] if i == 0 else x[:, 1 + t :]  # the previous layer's prompts go
            x = torch.cat([x[:, :1], prompts.layer(i, x.shape[0], x.dtype), rest], dim=1)
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        x = v.ln_post(prompts.norm(x)) @ v.proj
        tokens = x[:, 1 + t :]
        if tokens.shape[1] != gh * gw:
            raise FusionerError(f"{self.name}: expected {gh}x{gw} tokens, got {tokens.shape[1]}")
        return VisionOutput(tokens=tokens, grid=(gh, gw), cls=x[:, 0])


__all__ = ["ClipPrompts", "PromptedCLIP", "is_clip_tower"]
