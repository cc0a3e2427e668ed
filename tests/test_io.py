"""Files: checked reads (damage, devices, foreign files) and atomic writes (modes, symlinks)."""
import os
import stat
import zipfile

import pytest
import torch

from nern_fast.config import ConfigError
from nern_fast.io import FileFormatError, atomic_save, load_torch_file


def saved(tmp_path, name="w.pt"):
    path = tmp_path / name
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
    return path


def data_offset(path, member_suffix):
    """Where the bytes of the zip member ending in ``member_suffix`` start in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    with open(path, "rb") as f:  # the local header: 30 bytes, then the name and the extra field
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len


def test_damaged_tensor_bytes_are_refused(tmp_path):
    path = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    start = data_offset(path, "data/0") + 100
    raw[start:start + 16] = bytes(b ^ 0x5A for b in raw[start:start + 16])
    path.write_bytes(raw)
    with pytest.raises(FileFormatError, match=r"w.pt is damaged: its member \S*data/0 fails its CRC-32.*backup"):
        load_torch_file(path, "checkpoint")


def test_empty_truncated_and_foreign_files_keep_their_messages(tmp_path):
    assert load_torch_file(saved(tmp_path))["w"][999] == 999
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(FileFormatError, match="the file is empty"):
        load_torch_file(empty)
    truncated = saved(tmp_path, "truncated.pt")
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(FileFormatError, match="truncated, corrupt or not a torch file"):
        load_torch_file(truncated)
    text = tmp_path / "text.pt"
    text.write_text("model: resnet\n")
    with pytest.raises(FileFormatError, match="truncated, corrupt or not a torch file"):
        load_torch_file(text)


def test_a_missing_device_is_not_reported_as_damage(tmp_path, monkeypatch):
    path = saved(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="map_location: 'cuda' asks for CUDA, but CUDA is not available"):
        load_torch_file(path, map_location="cuda")
    with pytest.raises(ConfigError, match="map_location: 'banana' is not one of"):
        load_torch_file(path, map_location="banana")

    def cuda_file(*args, **kwargs):  # what torch.load says of CUDA tensors without CUDA
        raise RuntimeError("Attempting to deserialize object on a CUDA device but "
                           "torch.cuda.is_available() is False. If you are running on a CPU-only machine, "
                           "please use torch.load with map_location=torch.device('cpu')")
    monkeypatch.setattr(torch, "load", cuda_file)
    with pytest.raises(ConfigError, match="holds CUDA tensors.*map_location='cpu'"):
        load_torch_file(path, map_location=None)


def test_a_file_that_cannot_be_opened_is_not_reported_as_damage(tmp_path, monkeypatch):
    path = saved(tmp_path)
    real_open = open

    def denied(file, *args, **kwargs):  # root reads any file, whatever its mode
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(PermissionError, match="Permission denied"):
        load_torch_file(path)
    monkeypatch.undo()
    with pytest.raises(IsADirectoryError):
        load_torch_file(tmp_path)


def test_atomic_save_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "secret.pt"
    atomic_save({"a": 1}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # a new file: open()'s mode
    path.chmod(0o600)
    atomic_save({"a": 2}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_torch_file(path) == {"a": 2}


def test_atomic_save_writes_through_a_symlink(tmp_path):
    target = tmp_path / "store" / "model.pt"
    target.parent.mkdir()
    atomic_save({"a": 1}, target)
    link = tmp_path / "model.pt"
    link.symlink_to(target)
    assert atomic_save({"a": 2}, link) == link
    assert link.is_symlink() and link.resolve() == target
    assert load_torch_file(target) == {"a": 2}
    assert sorted(os.listdir(target.parent)) == ["model.pt"]  # no temp file left behind


def test_atomic_save_refuses_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_save({"a": 1}, tmp_path)


def test_atomic_save_refuses_a_name_ending_in_a_slash(tmp_path):
    with pytest.raises(IsADirectoryError, match="ends with a slash"):
        atomic_save({"a": 1}, str(tmp_path / "new") + "/")
    assert not (tmp_path / "new").exists()


def test_atomic_save_writes_into_a_device_or_fifo_without_replacing_it(tmp_path):
    """Renaming a temp file over /dev/null (as root) would replace the device node with a plain
    file: a device or FIFO is written to directly and stays what it was."""
    import threading
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_save({"a": 2}, fifo)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    (tmp_path / "copy.pt").write_bytes(received[0])
    assert load_torch_file(tmp_path / "copy.pt") == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["copy.pt", "pipe"]  # no temp file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_text_keeps_the_earlier_file_when_writing_fails(tmp_path):
    """metrics.json and eval --json go through the same atomic file: a failure midway leaves the
    earlier file whole and no temp file behind."""
    from nern_fast.io import atomic_file, atomic_write_text
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"a": 1}\n')
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_file(path) as f:
            f.write(b'{"a": ')
            raise RuntimeError("midway")
    assert path.read_text() == '{"a": 1}\n'
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_a_file_saved_without_checksums_loads(tmp_path):
    """torch.save can leave the CRC-32 out (CRC 0): nothing to check, the file loads."""
    import zipfile
    config = pytest.importorskip("torch.utils.serialization").config
    if not hasattr(config, "patch") or "save.compute_crc32" not in config.get_config_copy():
        pytest.skip("this torch always writes checksums")
    with config.patch({"save.compute_crc32": False}):  # (monkeypatch's undo deletes it for good)
        path = saved(tmp_path, "no_crc.pt")
    assert not any(m.CRC for m in zipfile.ZipFile(path).infolist())
    assert load_torch_file(path)["w"][999] == 999
    assert any(m.CRC for m in zipfile.ZipFile(saved(tmp_path)).infolist())  # the setting restored
