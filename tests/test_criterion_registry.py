"""A criterion defined outside pccfast is one class: registered (or named
"package.module:Class"), it runs through pccfast.scores, the collector, the CLI and a study
like the built-in ones; the registry's checks and its single lookup."""

from __future__ import annotations

import json

import pytest
import torch

import pccfast
from pccfast.models import resnet56_cifar, vgg16_cifar
from pccfast.prune import CRITERIA, Criterion, get_criterion, register_criterion
from pccfast.prune import criteria as criteria_module
from pccfast.prune.criteria import filter_l1
from cases import site_activations, streamed_scores

SIZE = (1, 3, 32, 32)


class InvertedL1(Criterion):
    """Keeps the smallest filters: a data-free criterion, the opposite of l1 (shifted to stay
    >= 0, as tau and budgets need)."""

    name, needs, summary = "inverted_l1", "nothing", "largest minus each filter's L1 norm"

    def layer_scores(self, model, layer, seed=0):
        norms = filter_l1(model, layer.convs, layer.width)
        return norms.max() - norms


class ChannelMean(Criterion):
    """The mean activation of each channel: a criterion that needs calibration images."""

    name, needs = "channel_mean", "images"

    def image_scores(self, activation, grad=None, backend="auto"):
        return activation.detach().mean(dim=(2, 3), dtype=torch.float64)


SPEC = f"{__name__}:InvertedL1"  # importable: tests/ is on the path (conftest.py)


@pytest.fixture
def registered(monkeypatch):
    """InvertedL1 and ChannelMean in the registry for one test (taken out again after)."""
    for cls in (InvertedL1, ChannelMean):
        monkeypatch.setitem(criteria_module._REGISTRY, cls.name, cls)
    yield


def test_every_form_of_a_new_criterion_gives_its_scores(registered):
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.125)
    l1 = pccfast.scores(model, criterion="l1", input_size=SIZE)
    for form in ("inverted_l1", SPEC, InvertedL1, InvertedL1()):
        got = pccfast.scores(model, criterion=form, input_size=SIZE)
        assert got.keys() == l1.keys(), form
        assert all(torch.equal(got[k], l1[k].max() - l1[k]) for k in l1), form
    col = pccfast.ScoreCollector(model, SPEC, input_size=SIZE)
    assert col.criterion == SPEC and not col.needs_data  # asked of the object, not the name
    col.remove()
    assert pccfast.ScoreCollector(model, InvertedL1(), input_size=SIZE).criterion == "inverted_l1"


def test_an_activation_criterion_is_streamed_like_ci(registered):
    torch.manual_seed(1)
    model = resnet56_cifar(width=0.25).double()  # float64: batch splits round alike
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    scores, groups = streamed_scores(model, "channel_mean", images, SIZE)
    stream = groups["layer1"]
    acts = site_activations(model, stream + ["layer3.2.relu1"], images)
    expected = {m: a.mean((2, 3)).mean(0) for m, a in acts.items()}
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores["layer1"], torch.stack([expected[s] for s in stream]).mean(0),
                               **close)
    torch.testing.assert_close(scores["layer3.2.conv1"], expected["layer3.2.relu1"], **close)
    assert float(scores["layer1"].max()) > 0
    # the same through the one-call API and a (images, labels) loader
    again = pccfast.scores(model, [(images, torch.zeros(3, dtype=torch.long))],
                           criterion=ChannelMean)
    assert all(torch.allclose(again[k], scores[k], rtol=1e-12, atol=0) for k in scores)


def test_the_registry_refuses_what_it_cannot_run():
    class NoMethod(Criterion):
        name, needs = "no_method", "images"

    class BadNeeds(Criterion):
        name, needs = "bad_needs", "labels"

        def image_scores(self, activation, grad=None, backend="auto"):
            return activation.mean((2, 3))

    class Taken(InvertedL1):
        name = "l1"

    with pytest.raises(TypeError, match="must implement image_scores"):
        register_criterion(NoMethod)
    with pytest.raises(ValueError, match="needs must be one of"):
        register_criterion(BadNeeds)
    with pytest.raises(ValueError, match="'l1' is registered already"):
        register_criterion(Taken)
    with pytest.raises(TypeError, match="Criterion subclass"):
        register_criterion(ChannelMean())
    assert "no_method" not in CRITERIA and "bad_needs" not in CRITERIA
    assert list(CRITERIA)[:5] == ["ci", "l1", "hrank", "taylor", "random"]
    with pytest.raises(ValueError, match="criterion must be one of"):
        get_criterion("snip")
    with pytest.raises(ValueError, match="cannot import Nope from no_such_module"):
        get_criterion("no_such_module:Nope")
    with pytest.raises(ValueError, match="is a function, not a pccfast.prune.Criterion"):
        get_criterion("pccfast:pcc")
    with pytest.raises(TypeError, match="must implement image_scores"):
        pccfast.ScoreCollector(vgg16_cifar(width=0.125), NoMethod)
    with pytest.raises(TypeError):
        CRITERIA["mine"] = InvertedL1  # read-only: register_criterion is the way in


class PerBatch(ChannelMean):
    name = "per_batch"

    def image_scores(self, activation, grad=None, backend="auto"):
        return activation.mean(dim=(0, 2, 3))  # (C,): one score per batch, not per image


class Scalar(InvertedL1):
    name = "scalar"

    def layer_scores(self, model, layer, seed=0):
        return 1.0


def test_scores_of_the_wrong_shape_are_named():
    model = vgg16_cifar(width=0.125)
    with pytest.raises(ValueError, match=r"'per_batch': image_scores must return an \(N, C\)"):
        pccfast.scores(model, [torch.randn(2, 3, 32, 32)], criterion=PerBatch)
    with pytest.raises(ValueError, match="'scalar': layer_scores must return a"):
        pccfast.scores(model, criterion=Scalar, input_size=SIZE)


def test_cli_and_study_take_package_module_class(tmp_path, capsys):
    from pccfast.cli import main
    from pccfast.study import Study, StudyConfig
    from pccfast.study.runner import read_rows

    out = tmp_path / "run"
    flags = ["--data", "digits", "--train-limit", "256", "--test-limit", "64", "--model",
             "vgg16_cifar", "--width", "0.125", "--epochs", "1", "--finetune-epochs", "0",
             "--target-flops", "0.3", "--calib-images", "32", "--no-progress"]
    assert main(["run", *flags, "--criterion", SPEC, "--out", str(out)]) == 0
    assert f"scores    {SPEC}:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score_criterion"] == SPEC and summary["score_images"] == 0
    assert json.loads((out / "plan.json").read_text())["criterion"] == SPEC
    assert "- inverted_l1 scores:" in (out / "report.md").read_text()
    saved = torch.load(out / "scores.pt", weights_only=True)["scores"]
    l1 = pccfast.scores(pccfast.load(out / "pretrained.pt"), criterion="l1", input_size=SIZE)
    assert saved.keys() == l1.keys()
    assert all(torch.equal(saved[k], l1[k].max() - l1[k]) for k in l1)
    # a stage command with an activation criterion from this file: calibration images used
    assert main(["scores", "--out", str(out), "--criterion", f"{__name__}:ChannelMean",
                 "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["score_images"] == 32
    with pytest.raises(SystemExit) as exc:  # refused while parsing, in one line
        main(["run", "--out", str(out), "--criterion", "no_such_module:X"])
    assert exc.value.code == 2
    assert "cannot import X from no_such_module" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scores", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "hrank (feature-map rank)" in text and "package.module:Class" in text

    from test_study import TINY  # the tiny digits study, one arm, one seed, one target

    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    tree["study"] = {"seeds": [0], "criteria": ["l1", SPEC], "targets": [0.5],
                     "finetune_targets": []}
    tree["arms"] = {"no_pcc": {"pcc": {"weight": 0.0}}}
    Study(StudyConfig.from_dict(tree), tmp_path / "study", progress=False, echo=None).run()
    rows = read_rows(tmp_path / "study" / "study.csv")
    pruned = {r["criterion"]: r for r in rows if r["stage"] == "pruned"}
    assert pruned.keys() == {"l1", SPEC}
    for r in pruned.values():
        assert abs(float(r["flops_removed"]) - 0.5) <= 0.005
    assert pruned[SPEC]["acc"] != "" and "inverted_l1" not in CRITERIA  # not registered
    cached, = (tmp_path / "study").rglob("scores-*InvertedL1.pt")  # the study's own scores
    found = torch.load(cached, weights_only=True)["scores"]
    expected = pccfast.scores(pccfast.load(cached.parent / "pretrained.pt"), criterion=InvertedL1,
                              input_size=SIZE)
    assert found.keys() == expected.keys()
    assert all(torch.equal(found[k], expected[k]) for k in found)
    tree["study"]["criteria"] = ["no_such_module:X"]
    with pytest.raises(ValueError, match="unknown criterion 'no_such_module:X'"):
        StudyConfig.from_dict(tree)



def test_the_one_by_one_warning_is_asked_of_the_criterion():
    """Criterion.spatial (the score reads each map as a whole) decides the 1x1-map warning."""
    import warnings

    from torch import nn

    class Spatial(ChannelMean):
        name, spatial = "spatial_mean", True

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(5, 2))
    for criterion, warned in ((ChannelMean, 0), (Spatial, 2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pccfast.scores(model, [torch.randn(3, 3, 1, 1)], criterion=criterion)
        messages = [str(w.message) for w in caught if "1x1 maps" in str(w.message)]
        assert len(messages) == warned, messages
