"""pccfast.save / pccfast.load: architecture (per-layer widths) with weights, a fresh process,
atomic writes, clear errors on damaged or foreign files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pccfast
from pccfast.models import resnet56_cifar, vgg16_cifar
from pccfast.prune.graph import build_graph

ROOT = Path(__file__).resolve().parents[1]


def random_scores(model, size=(1, 3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    graph = build_graph(model, size, prune_classifier_input=True)
    return {x.name: torch.rand(x.width, generator=g, dtype=torch.float64) for x in graph.prunable}


def same_outputs(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_pruned_zoo_model_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = resnet56_cifar(width=0.5)
    pruned, plan = pccfast.prune(model, random_scores(model), rates="[0.]+[0.3]*2+[0.5]*27")
    pruned.train()
    pruned(torch.randn(8, 3, 32, 32))  # move the BN statistics: they must survive too
    path = tmp_path / "pruned.pt"
    pccfast.save(pruned, path)
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(pruned.eval()(x), tmp_path / "expected.pt")
    script = (
        "import sys, torch, pccfast\n"
        f"m = pccfast.load({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert not m.training\n"
        "with torch.no_grad(): torch.testing.assert_close(m(x), e, rtol=0, atol=0)\n"
        "print(m.layer2[0].shortcut.out_channels, m.layer1[0].conv1.out_channels)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(plan.widths["layer2"]), str(plan.widths["layer1.0.conv1"])]


def test_twice_pruned_and_unpruned_models_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = vgg16_cifar(width=0.25)
    once, _ = pccfast.prune(model, random_scores(model), tau=0.8)
    twice, _ = pccfast.prune(once, random_scores(once, seed=1), rates=0.2)
    x = torch.randn(2, 3, 32, 32)
    for m in (model, once, twice):
        pccfast.save(m, tmp_path / "m.pt")
        same_outputs(pccfast.load(tmp_path / "m.pt"), m, x)
    assert len(pccfast.load(tmp_path / "m.pt")._pccfast_recipe["plans"]) == 2


def test_models_outside_the_zoo_need_allow_pickle(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    pruned, _ = pccfast.prune(model, random_scores(model, (1, 3, 64, 64)), tau=0.7,
                              input_size=(1, 3, 64, 64))
    pccfast.save(pruned, tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        pccfast.load(tmp_path / "r18.pt")
    same_outputs(pccfast.load(tmp_path / "r18.pt", allow_pickle=True), pruned,
                 torch.randn(2, 3, 64, 64))


def test_damaged_and_foreign_files_are_clear_errors(tmp_path):
    model = vgg16_cifar(width=0.125)
    pccfast.save(model, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="truncated"):
        pccfast.load(tmp_path / "cut.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not written by pccfast.save"):
        pccfast.load(tmp_path / "state.pt")
    (tmp_path / "noise.pt").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="not a readable"):
        pccfast.load(tmp_path / "noise.pt")
    with pytest.raises(FileNotFoundError):
        pccfast.load(tmp_path / "missing.pt")


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = vgg16_cifar(width=0.125)
    path = tmp_path / "m.pt"
    pccfast.save(model, path)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        pccfast.save(vgg16_cifar(width=0.25), path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["m.pt"]  # and no temporary file is left
    same_outputs(pccfast.load(path), model, torch.randn(2, 3, 32, 32))


def test_described_models_load_through_build_without_pickle(tmp_path):
    """A model outside the zoo marked with a description: stored as description + plans +
    weights (weights_only), rebuilt by the caller's build(), never by code the file names."""
    from pccfast.models._common import record_description

    def build(description=None):
        model = vgg16_cifar(width=0.125)
        del model._pccfast_recipe  # no zoo recipe: pccfast.save would pickle it
        return record_description(model, {"model": "mine:vgg", "width": 0.125})

    torch.manual_seed(0)
    model = build()
    pruned, _ = pccfast.prune(model, random_scores(model), tau=0.8)
    pccfast.save(pruned, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["kind"] == "external" and "module" not in payload
    assert payload["description"] == {"model": "mine:vgg", "width": 0.125}
    with pytest.raises(ValueError, match="build="):
        pccfast.load(tmp_path / "m.pt")
    seen = []
    loaded = pccfast.load(tmp_path / "m.pt", build=lambda d: seen.append(d) or build())
    assert seen == [{"model": "mine:vgg", "width": 0.125}]
    same_outputs(loaded, pruned, torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        pccfast.load(tmp_path / "m.pt", build=lambda d: None)
