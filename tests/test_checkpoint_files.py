"""model.save_checkpoint's files: modes from the user's umask (safetensors writes 0600 on its own), each file
written whole through a temporary file and renamed, nothing left beside them, an earlier checkpoint replaced."""
import json
import os
import stat

import pytest
import torch

import model
from support import tiny


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_save_checkpoint_follows_umask_and_replaces_whole_files(tmp_path, umask_022):
    raw = tiny.qwen_config()
    net = tiny.random_weights(model.build(model.config_from_dict(raw, "tiny"), "cpu", torch.float32))
    (tmp_path / "config.json").write_text("{half a file")  # an earlier, damaged checkpoint is replaced
    model.save_checkpoint(net, raw, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary file left
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    assert json.loads((tmp_path / "config.json").read_text()) == raw
    loaded = model.load(str(tmp_path), "cpu", torch.float32)
    assert torch.equal(loaded.lm_head.weight, net.lm_head.weight.to(torch.bfloat16).float())


def test_failed_write_keeps_the_earlier_file(tmp_path):
    target = tmp_path / "config.json"
    target.write_text('{"old": 1}')

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        model.write_replacing(str(target), fail)
    assert target.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["config.json"]
