"""Issue 21's WEAK cases: each a one-line message or a bound, where a traceback or an unbounded cost was."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from fusioner.cli import main
from fusioner.errors import WeightsError


def _last_err(capsys) -> tuple[str, int]:
    err = capsys.readouterr().err.strip().splitlines()
    return (err[-1] if err else ""), len(err)


def test_ctrl_c_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    import fusioner.engine.train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(["train", "--config", str(_tiny_config(tmp_path))]) == 130
    line, count = _last_err(capsys)
    assert line == "fusioner train: interrupted" and count == 1


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_disk_or_read_only_folder_is_one_line(monkeypatch, capsys, tmp_path, code):
    import fusioner.engine.train as train_module

    def refused(*args, **kwargs):
        # As a full disk arrives: the OSError wrapped twice (safetensors, then torch).
        try:
            try:
                raise OSError(code, "No space left on device", str(tmp_path / "run" / "x"))
            except OSError as e:
                raise RuntimeError("failed to write") from e
        except RuntimeError as e:
            raise RuntimeError("while saving the checkpoint") from e

    monkeypatch.setattr(train_module, "train", refused)
    assert main(["train", "--config", str(_tiny_config(tmp_path))]) == 2
    line, count = _last_err(capsys)
    assert count == 1 and line.startswith(f"fusioner train: error: cannot write {tmp_path / 'run' / 'x'}: ")


def test_any_other_exception_keeps_its_traceback(monkeypatch, tmp_path):
    import fusioner.engine.train as train_module

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train_module, "train", bug)
    with pytest.raises(ZeroDivisionError):
        main(["train", "--config", str(_tiny_config(tmp_path))])


def _tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"dataset: folder\ndata_path: {tmp_path}\nout_dir: {tmp_path / 'run'}\n")
    return path


def test_weights_that_are_no_checkpoint_are_one_line(tmp_path):
    from fusioner.adapters.weights import load_state_dict

    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n")
    with pytest.raises(WeightsError, match=r"cannot read .*passwd as safetensors or a weights-only"):
        load_state_dict("efficientnet_lite0", text)


def test_an_upper_case_mask_suffix_pairs_and_is_read(voc_folder, tmp_path):
    from fusioner.data.folder import FolderDataset

    data = Path(shutil.copytree(voc_folder, tmp_path / "data"))
    mask = sorted((data / "masks").glob("*.png"))[0]
    upper = mask.with_suffix(".PNG")
    mask.rename(upper)
    for split in ("train", "val"):
        renamed, original = FolderDataset(data, split), FolderDataset(voc_folder, split)
        ids = [renamed.item_id(i) for i in range(len(renamed))]
        if mask.stem in ids:
            index = ids.index(mask.stem)
            assert renamed.mask_path(mask.stem) == upper
            assert torch.equal(renamed[index]["mask"], original[index]["mask"])  # read, same labels
            return
    pytest.fail(f"{mask.stem} is in no split")


def test_two_masks_differing_only_in_suffix_case_are_refused(voc_folder, tmp_path):
    from fusioner.data.folder import FolderDataset
    from fusioner.errors import DataError

    data = Path(shutil.copytree(voc_folder, tmp_path / "data"))
    mask = sorted((data / "masks").glob("*.png"))[0]
    shutil.copy(mask, mask.with_suffix(".PNG"))
    with pytest.raises(DataError, match=f"two masks are named '{mask.stem}'"):
        FolderDataset(data, "train")


def test_train_finds_the_data_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: folder\ndata_path: {tmp_path / 'nowhere'}\nout_dir: {out}\n")
    assert main(["train", "--config", str(config)]) == 2
    line, _ = _last_err(capsys)
    assert str(tmp_path / "nowhere") in line
    assert not out.exists()  # no config.yaml, no run.lock


def test_sweep_status_reads_every_run_only_now_and_then(tmp_path, monkeypatch):
    from fusioner.run import RunDir
    from fusioner.sweep.expand import Sweep, expand
    from fusioner.sweep.runner import _Status

    spec = {"dataset": "folder", "data_path": str(tmp_path), "seed": list(range(200))}
    sweep = Sweep(tmp_path / "sweep", expand(spec, tmp_path / "sweep"), "s.yaml", ())
    reads = {"n": 0}
    real = RunDir.state

    def counted(self):
        reads["n"] += 1
        return real.fget(self)

    monkeypatch.setattr(RunDir, "state", property(counted))
    status = _Status(sweep)
    status.write(sweep.runs[0])  # the first write reads every run
    assert reads["n"] == 200
    status.read_cost = 3600.0  # as if a full read were slow: the next writes read one run each
    for run in sweep.runs[1:11]:
        status.write(run)
    assert reads["n"] == 210
    status.write()  # the last word of a shard: a full read
    assert reads["n"] == 410


def test_names_differing_only_in_case_are_duplicates():
    from fusioner.errors import FusionerError
    from fusioner.inputs import parse_names

    with pytest.raises(FusionerError, match="--classes has duplicate names: Cat, cat"):
        parse_names("Cat, dog, cat", "--classes")
    assert parse_names("cat, dog", "--classes") == ["cat", "dog"]


def test_a_symlinked_input_is_named_after_its_own_stem(tmp_path):
    from fusioner.errors import FusionerError
    from fusioner.predict import output_names

    target = tmp_path / "IMG_0042.jpg"
    target.write_bytes(b"x")
    link = tmp_path / "photo.jpg"
    link.symlink_to(target)
    assert output_names([str(link)]) == ["photo"]
    with pytest.raises(FusionerError, match="is given twice"):
        output_names([str(link), str(target)])
