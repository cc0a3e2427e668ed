"""The README's "Minimal example" runs as printed (so that it cannot drift from the API unnoticed)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def minimal_example_source() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Minimal example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README.md's 'Minimal example' section has no python code block"
    return match.group(1)


def test_minimal_example_runs_and_its_file_loads(tmp_path, monkeypatch):
    import nern_fast

    monkeypatch.chdir(tmp_path)  # the example writes resnet56.nfc into the working directory
    namespace: dict = {}
    exec(compile(minimal_example_source(), str(README), "exec"), namespace)

    model, pred = namespace["model"], namespace["pred"]
    assert namespace["kernels"].shape == (4096, 9)
    assert all(p.grad is not None for p in pred.parameters())
    assert 0 < pred.compression_ratio < 1
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert model.eval()(images).shape == (2, 10)  # the example leaves the model attached on demand
        loaded, loaded_pred = nern_fast.load_compressed(tmp_path / "resnet56.nfc")
        decoded = pred.decode_flat().float()
        stored = loaded_pred.layout.flatten(loaded).float()
    # the file holds the predictor in fp16: the weights it decodes are those of the example's
    # predictor up to that rounding (an untrained 56-layer net's outputs amplify it too much to compare)
    assert stored.shape == decoded.shape
    assert (stored - decoded).abs().max() <= 3e-2 * decoded.abs().max()
