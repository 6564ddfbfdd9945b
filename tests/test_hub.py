"""Pushing a run to the Hub (against a recording fake client) and loading the pushed files back."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from fusioner import FusionerModel
from fusioner.cli import main
from fusioner.config import load_config, save_config
from fusioner.errors import ConfigError, FusionerError, UnknownNameError
from fusioner.hub import push

REPO = "alice/fusioner-effnet-minilm"


class FakeHub:
    """Records what a push would create and upload; ``materialise`` lays the commit out as the Hub would."""

    def __init__(self) -> None:
        self.repos: list[tuple[str, bool | None]] = []
        self.commits: list[tuple[str, dict[str, bytes], str]] = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        self.repos.append((repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        self.commits.append((repo_id, files, commit_message))

    def materialise(self, folder: Path) -> Path:
        folder.mkdir(parents=True)
        for name, data in self.commits[-1][1].items():
            (folder / name).write_bytes(data)
        return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, voc_folder) -> tuple[Path, FusionerModel]:
    """A run directory as ``train`` leaves it (config.yaml, model/, train_state.json, metrics.json),
    with a head whose weights differ from any fresh initialisation."""
    run = tmp_path_factory.mktemp("run")
    config = load_config(
        None, vision="efficientnet_lite0", text="minilm_l6", preset="tiny", image_size=64, dataset="folder",
        data_path=str(voc_folder), unseen_classes=["cow", "sheep"], out_dir=str(run),
    )  # fmt: skip
    model = FusionerModel.from_config(config)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    model.save_pretrained(run / "model")
    save_config(config, run / "config.yaml")
    (run / "train_state.json").write_text(json.dumps({"steps": 12, "total_steps": 12, "finished": True}))
    metrics = {
        "one_way": {"miou": 0.4123, "fbiou": 0.6, "per_class": {"cow": 0.3, "sheep": 0.5246}},
        "gzss": {"miou": 0.2, "miou_seen": 0.25, "miou_unseen": 0.15, "hiou": 0.1875, "per_class": {}},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, model.eval()


def test_push_uploads_three_files_that_load_back_to_the_same_model(trained_run, tmp_path, monkeypatch):
    run, model = trained_run
    hub = FakeHub()
    result = push(run, REPO, api=hub)

    assert hub.repos == [(REPO, False)]
    assert len(hub.commits) == 1
    repo_id, files, message = hub.commits[0]
    assert repo_id == REPO and result.repo_id == REPO
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert files["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()
    assert json.loads(files["config.json"]) == json.loads((run / "model" / "config.json").read_text())
    assert "efficientnet_lite0 + minilm_l6" in message

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "fusioner"
    assert card.data.pipeline_tag == "image-segmentation"
    assert card.data.eval_results[0].metric_value == 41.23
    for text in ("`efficientnet_lite0`", "`minilm_l6`", "dataset `folder`", "cow, sheep", "12 steps",
                 "| 1-way, each held-out class queried alone (HSNet) | mIoU | 41.2 |", "sheep 52.5",
                 "## Intended use and limits", f'FusionerModel.from_pretrained("{REPO}")'):  # fmt: skip
        assert text in card.text, text

    # The three files are all a user needs: from a folder laid out like the repo, or by repo id.
    folder = hub.materialise(tmp_path / "snapshot")
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    expected = model(images, ["cow", "sheep", "grass"])
    loaded = FusionerModel.from_pretrained(folder).eval()
    torch.testing.assert_close(loaded(images, ["cow", "sheep", "grass"]), expected, rtol=0, atol=0)

    requested = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requested.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    by_id = FusionerModel.from_pretrained(REPO).eval()
    assert requested == {"repo_id": REPO, "allow_patterns": ["config.json", "model.safetensors"]}
    torch.testing.assert_close(by_id(images, ["cow", "sheep", "grass"]), expected, rtol=0, atol=0)


def test_predict_and_eval_accept_a_hub_style_folder(trained_run, tmp_path, voc_folder):
    run, _ = trained_run
    hub = FakeHub()
    push(run, REPO, api=hub)
    folder = hub.materialise(tmp_path / "snapshot")
    image = next((voc_folder / "images").glob("*.jpg"))
    assert main(["predict", str(image), "--model", str(folder), "--classes", "cow,sheep", "--out",
                 str(tmp_path / "pred")]) == 0  # fmt: skip
    assert (tmp_path / "pred" / f"{image.stem}_labels.png").is_file()
    out = tmp_path / "eval" / "metrics.json"
    assert main(["eval", "--model", str(folder), "--config", str(run / "config.yaml"), 
                 "--out", str(out)]) == 0  # fmt: skip
    assert set(json.loads(out.read_text())["one_way"]["per_class"]) == {"cow", "sheep"}


def test_cli_push_uses_the_hub_client(trained_run, monkeypatch, capsys):
    run, _ = trained_run
    hubs = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hubs.append(FakeHub()) or hubs[-1])
    assert main(["push", str(run), "--repo-id", REPO, "--private"]) == 0
    assert hubs[0].repos == [(REPO, True)]
    assert "pushed config.json, model.safetensors, README.md" in capsys.readouterr().out


def test_hub_errors_become_one_line(trained_run):
    class Offline(FakeHub):
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("no route to huggingface.co")

    with pytest.raises(FusionerError, match="could not push to 'alice/x'.*no route.*hf auth login"):
        push(trained_run[0], "alice/x", api=Offline())


# -- refusals: each before anything is uploaded ----------------------------------------------------
@pytest.mark.parametrize(
    "repo_id",
    ["fusioner-model", "alice/team/model", "alice/", "/model", "alice/my model", "alice/a--b", "alice/m.git"],
)
def test_a_malformed_repo_id_is_refused(trained_run, repo_id):
    hub = FakeHub()
    with pytest.raises(ConfigError, match=r"--repo-id .*expected 'namespace/name'"):
        push(trained_run[0], repo_id, api=hub)
    assert hub.repos == [] and hub.commits == []


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda r: (r / "model" / "model.safetensors").unlink(),
         "holds no finished model.*model.safetensors missing"),
        (lambda r: __import__("shutil").rmtree(r / "model"), "holds no finished model"),
        (lambda r: (r / "train_state.json").write_text('{"steps": 3, "total_steps": 9, "finished": false}'),
         "unfinished model \\(3 of 9 steps"),
        (lambda r: (r / "config.yaml").unlink(), "not a run directory: config.yaml"),
        (lambda r: (r / "model" / "model.safetensors").write_bytes(b"not a safetensors file"),
         "not a readable safetensors file"),
    ],
)  # fmt: skip
def test_a_run_without_a_finished_model_is_refused(trained_run, tmp_path, damage, match):
    run = _copy_run(trained_run[0], tmp_path / "run")
    damage(run)
    hub = FakeHub()
    with pytest.raises(FusionerError, match=match):
        push(run, REPO, api=hub)
    assert hub.repos == [] and hub.commits == []


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        (
            "vision",
            "dino_vitb99",
            UnknownNameError,
            "unknown vision backbone 'dino_vitb99'; known: .*dino_vitb16",
        ),
        (
            "vision",
            "timm:not_a_timm_model",
            UnknownNameError,
            "unknown vision backbone 'timm:not_a_timm_model'",
        ),
        ("text", "bert_huge", UnknownNameError, "config.json: unknown text backbone 'bert_huge'"),
        ("vision_weights", "random", FusionerError, "random weights .*cannot be rebuilt on load"),
    ],
)
def test_a_model_naming_an_unknown_or_random_backbone_is_refused(
    trained_run, tmp_path, monkeypatch, key, value, error, match
):
    run = _copy_run(trained_run[0], tmp_path / "run")
    record = json.loads((run / "model" / "config.json").read_text())
    (run / "model" / "config.json").write_text(json.dumps({**record, key: value}))
    hub = FakeHub()
    with pytest.raises(error, match=match):
        push(run, REPO, api=hub)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    assert main(["push", str(run), "--repo-id", REPO]) == 2  # the CLI too: one line, exit 2
    assert hub.repos == [] and hub.commits == []


def test_the_cli_refuses_a_bad_repo_id_in_one_line(trained_run, capsys, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    assert main(["push", str(trained_run[0]), "--repo-id", "no-namespace"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusioner push: error: --repo-id 'no-namespace'") and "\n" not in err
    assert hub.repos == [] and hub.commits == []
