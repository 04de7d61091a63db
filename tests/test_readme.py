"""The README's Python examples run as written (on a small VGG-16 and random CIFAR-sized data)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import pccfast

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def batches(n_batches: int, batch: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        yield (torch.randn(batch, 3, 32, 32, generator=gen),
               torch.randint(0, 10, (batch,), generator=gen))


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 3, "the README's Python examples changed: update this test"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = pccfast.models.vgg16_cifar(width=0.125)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    namespace = dict(model=model, opt=opt, loader=list(batches(2)))
    exec(compile(blocks[0], "README.md (PCC)", "exec"), namespace)
    assert namespace["s"].ndim == 0 and torch.isfinite(namespace["s"])
    assert namespace["R"].shape == (64, 3, 3)  # x: the loop's last batch

    namespace.update(calibration_loader=batches(12), fmap=torch.randn(2, 6, 4, 5))
    exec(compile(blocks[1], "README.md (CI, pruning)", "exec"), namespace)
    col, pruned = namespace["col"], namespace["pruned"]
    assert col.images == 640  # stopped at the default, not at the end of the loader
    assert len(namespace["scores"]) == 13  # every conv; the rate list covers the first 12
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert isinstance(namespace["model"], torch.nn.Module) and (tmp_path / "pruned.pt").is_file()
    assert namespace["ci"].shape == (2, 6) and namespace["ci"].dtype == torch.float64


def test_readme_torch_pruning_example_runs():
    """The CIImportance example: Torch-Pruning's MetaPruner halves every group by CI."""
    import pytest

    pytest.importorskip("torch_pruning")
    pytest.importorskip("torchvision")
    namespace: dict = {}
    exec(compile(python_blocks()[2], "README.md (Torch-Pruning)", "exec"), namespace)
    model = namespace["model"]
    assert model.layer1[0].conv1.out_channels == 32 and model.fc.out_features == 10
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def _layout() -> str:
    text = README.read_text()
    section = text[text.index("## Layout"):]
    return section[section.index("```"):section.index("```", section.index("```") + 3)]


def test_the_layout_names_every_module():
    """README's Layout stays true: a module added (or moved) without a word there fails."""
    import re as _re

    layout = _layout()
    package = Path(pccfast.__file__).resolve().parent
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        folder = path.parent.relative_to(package.parent).as_posix() + "/"
        if folder not in layout:
            missing.append(f"{folder} (folder)")
        elif not _re.search(rf"(?<![\w.]){_re.escape(path.stem)}(\.py)?\b", layout):
            missing.append(path.relative_to(package.parent).as_posix())
    assert not missing, f"README's Layout does not name {missing}"


def test_docs_lines_fit_100_columns():
    root = README.parent
    for doc in (README, root / "CONTRIBUTING.md"):
        long = [i + 1 for i, line in enumerate(doc.read_text().splitlines()) if len(line) > 100]
        assert not long, f"{doc.name}: lines {long} are longer than 100 characters"
