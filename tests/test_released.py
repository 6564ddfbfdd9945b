"""Issue 20, items 1-3: the released Fusioner head, its configs and `fusioner import-released`.

The fixture (../shared/data/reference-parity) holds what the released code outputs for random
weights; `_reference` below writes the released arithmetic out with plain ops on the released key
names (the order of operations the fixture README states), is itself checked on the fixture, and
then checks the head on other seeds, sizes and non-square grids the fixture does not cover.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from fusioner.cli import main
from fusioner.config import load_config
from fusioner.errors import ConfigError, FusionerError
from fusioner.model import FusionerModel, FusionHead, HeadConfig
from fusioner.model.released import head_differences, head_from_released, released_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "data" / "reference-parity"
PAPER_CONFIGS = sorted((ROOT / "configs" / "pascal5i").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "coco20i").glob("*.yaml")
)


def _fixture() -> Path:
    if not (FIXTURE / "head.safetensors").is_file():
        pytest.skip(f"the reference-parity fixture is not at {FIXTURE}")
    return FIXTURE


def _released_shapes(d: int, depth: int, d_ff: int, cv: int, ct: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the released Fusion + Decoder, by its released name (fixture README's list)."""
    shapes = {
        "fusion.visual_proj.0.weight": (cv,), "fusion.visual_proj.0.bias": (cv,),
        "fusion.visual_proj.1.weight": (d, cv), "fusion.visual_proj.1.bias": (d,),
        "fusion.visual_proj.2.weight": (d,), "fusion.visual_proj.2.bias": (d,),
        "fusion.text_proj.0.weight": (ct,), "fusion.text_proj.0.bias": (ct,),
        "fusion.text_proj.1.weight": (d, ct), "fusion.text_proj.1.bias": (d,),
        "fusion.cls_emb": (1, d), "fusion.norm.weight": (d,), "fusion.norm.bias": (d,),
        "fusion.proj_patch": (d, d), "fusion.proj_classes": (d, d),
    }  # fmt: skip
    for i in range(depth):
        p = f"fusion.blocks.{i}."
        shapes |= {
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "mlp.fc1.weight": (d_ff, d), p + "mlp.fc1.bias": (d_ff,),
            p + "mlp.fc2.weight": (d, d_ff), p + "mlp.fc2.bias": (d,),
        }  # fmt: skip
    for i in range(5):
        shapes |= {f"decoder.conv_{i}.weight": (d, d, 3 if i < 4 else 1, 3 if i < 4 else 1)}
        shapes |= {f"decoder.conv_{i}.bias": (d,)}
    return shapes


def _random_released(d=32, depth=2, d_ff=128, cv=12, ct=10, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under the released names: LayerNorm scales near 1, small biases, matrices at
    about unit gain (every tensor random, so a misplaced one shows)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in _released_shapes(d, depth, d_ff, cv, ct).items():
        x = torch.randn(shape, generator=g)
        if key.endswith(".bias"):
            out[key] = 0.1 * x
        elif len(shape) == 1:
            out[key] = 1 + 0.2 * x
        else:
            out[key] = x / math.sqrt(math.prod(shape[1:]))
    return out


def _reference(sd, visual, text, grid, size, heads, temperature=0.07):
    """The released head written out: L2-normalised tokens, Fusion, Decoder, Head; one name a pass."""
    d, depth = sd["fusion.norm.weight"].shape[0], len({k.split(".")[2] for k in sd if ".blocks." in k})

    def ln(x, key):
        return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], 1e-5)

    def lin(x, key):
        return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])

    b, (gh, gw) = visual.shape[0], grid
    out = []
    for j in range(text.shape[1]):
        v = visual / visual.norm(dim=-1, keepdim=True)
        x = ln(lin(ln(v, "fusion.visual_proj.0"), "fusion.visual_proj.1"), "fusion.visual_proj.2")
        t = lin(ln(text[:, j : j + 1], "fusion.text_proj.0"), "fusion.text_proj.1") + sd["fusion.cls_emb"]
        x = torch.cat([x, t], 1)
        for i in range(depth):
            p = f"fusion.blocks.{i}."
            qkv = lin(ln(x, p + "norm1"), p + "attn.qkv").reshape(b, x.shape[1], 3, heads, d // heads)
            q, k, val = qkv.permute(2, 0, 3, 1, 4)
            att = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
            x = x + lin((att @ val).transpose(1, 2).reshape(b, -1, d), p + "attn.proj")
            x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        x = ln(x, "fusion.norm")
        patches, cls = x[:, :-1] @ sd["fusion.proj_patch"], x[:, -1:] @ sd["fusion.proj_classes"]
        f = patches.transpose(1, 2).reshape(b, d, gh, gw)
        for s in range(4):
            if s:
                f = F.interpolate(f, size=(gh * 2**s, gw * 2**s), mode="bilinear", align_corners=False)
            f = F.conv2d(f, sd[f"decoder.conv_{s}.weight"], sd[f"decoder.conv_{s}.bias"], padding=1)
            f = F.relu(F.instance_norm(f, eps=1e-5))
        f = F.conv2d(f, sd["decoder.conv_4.weight"], sd["decoder.conv_4.bias"])
        f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        f, cls = f / f.norm(dim=1, keepdim=True), cls / cls.norm(dim=-1, keepdim=True)
        out.append(torch.einsum("bdhw,bkd->bkhw", f, cls) / temperature)
    return torch.cat(out, 1)


# -- item 1: parity ------------------------------------------------------------------------------
def test_head_matches_the_released_outputs_of_the_fixture():
    folder = _fixture()
    for tokens in ("input.visual", "input.raw_visual"):  # raw: the head L2-normalises them itself
        differences = head_differences(folder, tokens=tokens)
        assert set(differences) == {"logits", "logits_odd", "logits3"}
        assert max(differences.values()) < 1e-4, (tokens, differences)


def test_the_written_out_reference_reproduces_the_fixture():
    """Checks the test's own reference, so the tests below may trust it where no fixture exists."""
    from safetensors.torch import load_file

    folder = _fixture()
    t, c = load_file(str(folder / "head.safetensors")), json.loads((folder / "config.json").read_text())
    with torch.no_grad():
        got = _reference(t, t["input.raw_visual"], t["input.text3"], tuple(c["grid"]), c["target_size"], 4)
    assert (got - t["output.logits3"]).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("seed", "grid", "size", "k", "heads"),
    [(1, (3, 5), (37, 61), 2, 4), (2, (4, 4), (32, 32), 1, 2), (3, (5, 2), (80, 16), 3, 8)],
)
def test_head_matches_the_reference_on_other_seeds_grids_and_sizes(seed, grid, size, k, heads):
    sd = _random_released(d=32, depth=2, d_ff=96, cv=12, ct=10, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    visual = torch.randn(2, grid[0] * grid[1], 12, generator=g)
    text = F.normalize(torch.randn(2, k, 10, generator=g), dim=-1)
    head = head_from_released(sd, heads=heads)
    with torch.no_grad():
        expected = _reference(sd, visual, text, grid, size, heads)
        assert (head(visual, grid, text, size=size) - expected).abs().max() < 1e-4
        # names never share a sequence: name j alone gives channel j
        alone = head(visual, grid, text[:, k - 1 :], size=size)
        assert (alone[:, 0] - expected[:, k - 1]).abs().max() < 1e-4


def test_released_weights_round_trip_through_our_names():
    sd = _random_released(seed=4)
    head = head_from_released(sd, heads=4)
    back = released_state_dict(head)
    assert set(back) == set(sd)
    assert all(torch.equal(back[key], sd[key]) for key in sd)
    assert head.config.depth == 2 and head.config.mlp_ratio == 4.0 and head.config.dim == 32


def test_other_prefixes_are_ignored():
    sd = _random_released(seed=5) | {"img_model.conv1.weight": torch.zeros(3), "text_model.x": torch.ones(1)}
    assert isinstance(head_from_released(sd, heads=4), FusionHead)


# -- item 1: refusals ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda sd: sd.update({"fusion.blocks.1.attn.qkv.weight": torch.zeros(90, 32)}),
            r"fusion\.blocks\.1\.attn\.qkv\.weight is \(90, 32\), the released head .* needs \(96, 32\)",
        ),
        (
            lambda sd: sd.update({"decoder.conv_2.weight": torch.zeros(32, 32, 1, 1)}),
            r"decoder\.conv_2\.weight is \(32, 32, 1, 1\), .* needs \(32, 32, 3, 3\)",
        ),
        (lambda sd: sd.pop("decoder.conv_4.bias"), r"key 'decoder\.conv_4\.bias' \(32,\) missing"),
        (
            lambda sd: sd.update({"fusion.blocks.0.attn.extra": torch.zeros(2)}),
            r"unexpected key 'fusion\.blocks\.0\.attn\.extra' \(2,\)",
        ),
        (lambda sd: sd.pop("fusion.norm.weight"), r"key 'fusion\.norm\.weight' missing"),
    ],
)
def test_a_state_dict_that_does_not_fit_is_refused_in_one_line(edit, match):
    sd = _random_released(seed=6)
    edit(sd)
    with pytest.raises(FusionerError, match=match) as info:
        head_from_released(sd, heads=4, where="ckpt.pth")
    assert str(info.value).startswith("ckpt.pth: ") and "\n" not in str(info.value)


def test_heads_that_do_not_divide_the_width_are_refused():
    with pytest.raises(FusionerError, match=r"d_model 32 .* not divisible by heads=5"):
        head_from_released(_random_released(seed=7), heads=5)


# -- item 2: the released head as configuration --------------------------------------------------
def _config_heads():
    from fusioner.sweep import load_sweep

    configs = [(p.relative_to(ROOT).as_posix(), load_config(p)) for p in PAPER_CONFIGS]
    runs = load_sweep(ROOT / "configs" / "sweeps" / "paper.yaml").runs
    return configs + [(f"configs/sweeps/paper.yaml {r.name}", r.config) for r in runs[:: len(runs) // 3]]


@pytest.mark.parametrize(("name", "config"), _config_heads(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_paper_config_builds_exactly_the_released_head(name, config):
    cv, ct = 48, 40  # the widths do not change the layout; small ones keep the test fast
    torch.manual_seed(0)
    ours = FusionHead(HeadConfig.from_config(config, cv, ct))
    d, depth = config.dim, config.depth
    released = _random_released(d=d, depth=depth, d_ff=4 * d, cv=cv, ct=ct, seed=8)
    loaded = head_from_released(released, heads=config.heads)
    assert loaded.config == ours.config, name
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    # ... and under the released names: exactly the released tensors, no more, no fewer
    assert {k: tuple(v.shape) for k, v in released_state_dict(ours).items()} == {
        k: tuple(v.shape) for k, v in released.items()
    }
    assert (d, depth, config.heads) == (512, 12, 8)
    # what no shape shows: LayerNorm eps 1e-5 everywhere (timm's blocks default to 1e-6), bias-free
    # output projections, the class embedding drawn as nn.Embedding's N(0, 1)
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 + 1 + 2 * depth and all(m.eps == 1e-5 for m in norms)
    assert ours.fusion.visual_out.bias is None and ours.fusion.class_out.bias is None
    assert 0.8 < ours.fusion.class_embed.std().item() < 1.2
    assert ours.config.normalize_tokens and ours.resizes_features


def test_normalised_tokens_are_normalised_in_the_head_so_cached_tokens_get_it():
    head = head_from_released(_random_released(seed=9), heads=4)
    tokens, text = torch.randn(1, 6, 12), torch.randn(1, 2, 10)
    with torch.no_grad():
        a = head(tokens, (2, 3), text, size=(20, 30))
        b = head(tokens * 7.5, (2, 3), text, size=(20, 30))
    assert (a - b).abs().max() < 1e-4


def test_released_head_resizes_features_not_logits():
    head = head_from_released(_random_released(seed=10), heads=4)
    tokens, text = torch.randn(1, 6, 12), torch.randn(1, 1, 10)
    with torch.no_grad():
        features_first = head(tokens, (2, 3), text, size=(21, 35))
        logits_first = F.interpolate(head(tokens, (2, 3), text), size=(21, 35), mode="bilinear")
    assert head.resizes_features
    assert features_first.shape == logits_first.shape == (1, 1, 21, 35)
    assert (features_first - logits_first).abs().max() > 1e-3  # the order matters, and is the released one


@pytest.mark.parametrize("mode", ["fixed", "sliding"])
def test_inference_scores_a_released_head_at_the_view_size(mode):
    """Evaluation and predict keep the released order: features reach the view's size, then scores."""
    from types import SimpleNamespace

    from fusioner.inference import image_logits

    head = head_from_released(_random_released(seed=15), heads=4)
    tokens = torch.randn(1, 16, 12)

    def vision(pixels):  # a stub backbone: a 4 x 4 grid of fixed tokens for a 64 x 64 view
        assert pixels.shape[-2:] == (64, 64)
        return SimpleNamespace(tokens=tokens, grid=(4, 4), cls=None)

    model = SimpleNamespace(head=head, vision=vision, refiner=None)
    text = torch.randn(2, 10)
    image = torch.rand(3, 64, 64) if mode == "sliding" else torch.rand(3, 50, 70)
    with torch.no_grad():
        got = image_logits(model, image, text, size=64, mode=mode)
        scored = head(tokens, (4, 4), text[None], size=(64, 64))
    expected = F.interpolate(scored, size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    assert (got - expected).abs().max() < 1e-5


def test_decoder_paper_is_refused_for_new_runs_but_saved_heads_still_load():
    with pytest.raises(ConfigError, match=r"'decoder': 'paper' .* not the released Fusioner decoder"):
        load_config(None, decoder="paper")
    old = HeadConfig(vision_dim=12, text_dim=10, dim=32, depth=1, heads=4, decoder="paper")  # a saved head
    assert FusionHead(old)(torch.randn(1, 4, 12), (2, 2), torch.randn(1, 2, 10)).shape == (1, 2, 16, 16)


# -- item 3: import-released ---------------------------------------------------------------------
@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _argv(ckpt: Path, out: Path) -> list[str]:
    argv = ["import-released", str(ckpt), "--vision", "efficientnet_lite0", "--text", "minilm_l6"]
    return [*argv, "--out", str(out), "--heads", "4"]


def _import(ckpt: Path, out: Path) -> int:
    return main(_argv(ckpt, out))


@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_import_released_makes_a_run_that_loads_predicts_and_publishes(offline, tmp_path, kind):
    from fusioner.hub import read_run

    sd = _random_released(d=32, depth=1, d_ff=128, cv=112, ct=384, seed=11)  # efficientnet_lite0, minilm_l6
    towers = {"img_model.conv1.weight": torch.randn(4, 3, 2, 2)}  # a FullModel's frozen towers: ignored
    if kind == "torch":
        ckpt = tmp_path / "fusioner.pth"
        torch.save({"model": sd | towers, "epoch": 3}, ckpt)  # as the released code saves it
    else:
        ckpt = tmp_path / "fusioner.safetensors"
        save_file(sd | towers, str(ckpt))
    out = tmp_path / "imported"
    assert _import(ckpt, out) == 0
    model = FusionerModel.from_pretrained(out).eval()
    expected = head_from_released(sd, heads=4)
    assert model.head.config == expected.config
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.head.state_dict().items())
    record = json.loads((out / "model" / "config.json").read_text())
    assert (record["vision"], record["text"], record["image_size"], len(record["templates"])) == (
        "efficientnet_lite0", "minilm_l6", 224, 32,
    )  # fmt: skip
    assert model.predict(torch.rand(3, 40, 50), ["cat", "dog"]).shape == (40, 50)
    assert read_run(out).record["head"]["decoder"] == "released"  # what push checks before uploading
    run_config = load_config(out / "config.yaml")
    assert HeadConfig.from_config(run_config, 112, 384) == expected.config


def test_an_imported_run_evaluates_under_its_dataset_config(offline, tmp_path, voc_folder):
    ckpt = tmp_path / "fusioner.pth"
    torch.save({"model": _random_released(d=32, depth=1, d_ff=128, cv=112, ct=384, seed=14)}, ckpt)
    config = tmp_path / "data.yaml"
    config.write_text(f"dataset: folder\ndata_path: {voc_folder}\nunseen_classes: [cow]\nimage_size: 64\n")
    out = tmp_path / "run"
    assert main([*_argv(ckpt, out), "--config", str(config), "--image-size", "64"]) == 0
    assert main(["eval", "--model", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "one_way" in metrics


def test_import_released_never_replaces_a_file_and_never_unpickles_code(offline, tmp_path, capsys):
    sd = _random_released(d=32, depth=1, d_ff=128, cv=112, ct=384, seed=12)
    ckpt = tmp_path / "fusioner.pth"
    torch.save({"model": sd}, ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("mine")
    assert _import(ckpt, out) == 2
    assert "config.yaml already exists" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "mine" and not (out / "model").exists()
    assert _import(ckpt, tmp_path / "new") == 0  # and a second import into its own output is refused
    assert _import(ckpt, tmp_path / "new") == 2

    evil = tmp_path / "evil.pth"
    torch.save({"model": sd, "args": Path("x")}, evil)  # an object, not tensors: needs unpickling code
    assert _import(evil, tmp_path / "other") == 2
    assert "cannot be read weights-only" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_import_released_refuses_backbones_of_another_width(offline, tmp_path, capsys):
    ckpt = tmp_path / "fusioner.pth"
    torch.save(_random_released(d=32, depth=1, d_ff=128, cv=768, ct=384, seed=13), ckpt)
    assert _import(ckpt, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "fusion.visual_proj.1.weight takes 768-wide features" in err
    assert "'efficientnet_lite0' gives 112" in err
