"""CI (or any pccfast criterion) as a Torch-Pruning importance, for users of its pruners.

    imp = pccfast.prune.CIImportance(model, calibration_loader)      # scores the model once
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()

The scores come from the same single streaming pass as :class:`~pccfast.prune.ScoreCollector`
(per-channel mean CI over the calibration images, residual streams aggregated the same way), and
are attached to the convs whose output channels they rank. For a Torch-Pruning group, the
importance of each of its channels is the score of the scored conv(s) in the group that write
that channel (the mean where several do, e.g. the blocks of a residual stream); channels no
scored conv writes (a group with no scored layer, or an unscored part of a concatenation) get
``+inf`` when the group has some score, so they are never chosen for removal, and a group with
none is left to Torch-Pruning (``None``: not pruned). CI is a per-layer score, so use it with
``global_pruning=False`` (the default), or ``normalize=True`` to compare layers by their scores
relative to the layer's mean.

The scores describe the model as it was scored: a pruner that prunes in several steps
(``iterative_steps > 1``) must re-score between steps, and CIImportance refuses a conv whose
width has changed since, a conv replaced since (another module under a scored name), a group of
layers that are not the scored model's (a pruner on a copy or on another model would otherwise
prune nothing, silently), and a pruner with ``global_pruning=True`` unless ``normalize=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from .scores import DEFAULT_IMAGES, ScoreCollector


class CIImportance:
    """A Torch-Pruning importance (``importance(group) -> (channels,) tensor or None``).

    model: the network Torch-Pruning will prune (scored now, in eval mode, unchanged).
    loader: calibration batches (images, or (images, labels) for ``taylor``); ``l1`` and
      ``random`` only need it (or ``input_size``) for the input's shape.
    criterion, max_images, seed, backend, input_size, device: as :class:`ScoreCollector`.
    normalize: divide each group's importance by its mean (for ``global_pruning=True``).
    """

    def __init__(self, model: nn.Module, loader=None, *, criterion="ci",
                 max_images: int = DEFAULT_IMAGES, seed: int = 0, backend: str = "auto",
                 input_size=None, device=None, normalize: bool = False, progress: bool = False):
        collector = ScoreCollector(model, criterion, max_images=max_images, backend=backend,
                                   input_size=input_size, progress=progress, seed=seed)
        try:
            if collector.needs_data or input_size is None:
                if loader is None:
                    raise ValueError(f"CIImportance with criterion {collector.criterion!r} "
                                     "needs a loader "
                                     "(calibration images)" if collector.needs_data
                                     else "CIImportance needs a loader or input_size")
                collector.run(loader, device)
            scores = collector.scores()
            convs = dict(collector.convs)
        finally:
            collector.remove()
        self.criterion = collector.criterion
        self.normalize = bool(normalize)
        self.scores = scores  # layer -> (C,) float64, as pccfast.prune takes them
        # conv module -> (its layer's scores, the width it had when scored)
        self._by_module: dict[nn.Module, tuple[str, torch.Tensor]] = {}
        self._model = model  # (to tell its modules from another model's, and replacements)
        modules = dict(model.named_modules())
        for layer, names in convs.items():
            for name in names:
                conv = modules.get(name)
                if isinstance(conv, nn.Conv2d) and conv.out_channels == scores[layer].numel():
                    self._by_module[conv] = (name, scores[layer])

    def __call__(self, group) -> torch.Tensor | None:
        import torch_pruning as tp

        out_fns = (tp.pruner.function.prune_conv_out_channels,)
        self._check_pruner(tp)
        self._check_layers(group, out_fns)
        width = len(group[0].root_idxs)
        total = torch.zeros(width, dtype=torch.float64)
        count = torch.zeros(width, dtype=torch.float64)
        for i, (dep, idxs) in enumerate(group):
            found = self._by_module.get(dep.layer)
            if found is None or dep.pruning_fn not in out_fns:
                continue
            name, score = found
            if dep.layer.out_channels != score.numel():
                raise ValueError(
                    f"CIImportance scored {name} with {score.numel()} output channels, it now has "
                    f"{dep.layer.out_channels}: the model was pruned since; score it again "
                    "(e.g. one CIImportance per pruning step)")
            roots = torch.as_tensor(group[i].root_idxs, dtype=torch.long)
            total.index_add_(0, roots, score[torch.as_tensor(idxs, dtype=torch.long)])
            count.index_add_(0, roots, torch.ones(len(roots), dtype=torch.float64))
        if not bool((count > 0).any()):
            return None
        imp = torch.where(count > 0, total / count.clamp_min(1),
                          torch.full_like(total, float("inf")))
        if self.normalize:
            scored = imp[count > 0]
            mean = scored.mean()
            if mean > 0:
                imp = imp / mean
        return imp.float()

    def _check_layers(self, group, out_fns) -> None:
        """The group's layers are the scored model's, and its scored convs are the ones scored."""
        current = {id(m): name for name, m in self._model.named_modules()}
        scored = {name for name, _ in self._by_module.values()}
        layers = [dep.layer for dep, _ in group if isinstance(dep.layer, nn.Module)
                  and next(dep.layer.parameters(recurse=False), None) is not None]
        if layers and not any(id(m) in current for m in layers):
            raise ValueError(
                f"CIImportance scored a {type(self._model).__name__}, but this group's layers "
                f"({', '.join(type(m).__name__ for m in layers[:3])}...) are not its modules: the "
                "pruner prunes another model (or a copy); build CIImportance(model, ...) on the "
                "model the pruner prunes")
        for dep, _ in group:
            name = current.get(id(dep.layer))
            if (dep.pruning_fn in out_fns and dep.layer not in self._by_module
                    and name in scored):
                raise ValueError(f"CIImportance scored {name}, but {name} was replaced since by "
                                 "another module: its scores no longer describe it; score the "
                                 "model again (a new CIImportance)")

    def _check_pruner(self, tp) -> None:
        """Raw CI of different layers are not comparable: a global ranking needs normalize."""
        if self.normalize:
            return
        import sys

        kinds = tuple(k for k in (getattr(tp.pruner, "BasePruner", None),
                                  getattr(tp.pruner, "MetaPruner", None)) if k is not None)
        frame = sys._getframe(2)
        for _ in range(4):  # (Torch-Pruning's estimate_importance calls the importance)
            if frame is None or not kinds:
                return
            pruner = frame.f_locals.get("self")
            if isinstance(pruner, kinds):
                if getattr(pruner, "global_pruning", False):
                    raise ValueError(
                        "CIImportance(normalize=False) with global_pruning=True would rank the "
                        "channels of all layers by raw scores, which are not comparable across "
                        "layers: pass normalize=True (scores relative to each layer's mean) or "
                        "use global_pruning=False")
                return
            frame = frame.f_back
