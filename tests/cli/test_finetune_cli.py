"""How ``imago finetune`` reports failures of the training run itself."""

from __future__ import annotations

import pytest
import torch

from imago.client.cli import main
from imago.workers.training import caption as finetune_caption
from imago.workers.training import imagegen as finetune_imagegen


def raise_(error: BaseException):
    def train(*args, **kwargs):
        raise error

    return train


@pytest.mark.parametrize(
    ("module", "kind"), [(finetune_imagegen, "imagegen"), (finetune_caption, "caption")]
)
@pytest.mark.parametrize(
    "error", [torch.cuda.OutOfMemoryError("CUDA out of memory"), MemoryError()]
)
def test_running_out_of_memory_exits_1_with_what_to_lower(
    module, kind, error, monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(module, "train", raise_(error))
    code = main(["finetune", kind, "--data", str(tmp_path), "--out", str(tmp_path / "a")])
    assert code == 1
    assert "out of memory while training" in capsys.readouterr().err


def test_other_failures_are_not_dressed_up_as_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(finetune_caption, "train", raise_(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):
        main(["finetune", "caption", "--data", str(tmp_path), "--out", str(tmp_path / "a")])
