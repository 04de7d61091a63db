"""``pccfast.prune``: both the pruning call and the pruning package's namespace.

``pccfast.prune(model, scores, rates=...)`` is :func:`pccfast.prune.pruner.prune`, and
``pccfast.prune.CIImportance``, ``pccfast.prune.Plan``, ``pccfast.prune.build_graph`` (any name
of the :mod:`pccfast.prune` package and its submodules) are the package's. A package cannot be
called, so ``pccfast.prune`` is this small object instead of the package (``import
pccfast.prune.graph`` and ``from pccfast.prune import Plan`` import the package as usual; only
the attribute ``pccfast.prune`` is this object): calls go to the function, attributes to the
package.
"""

from __future__ import annotations

import sys

from .prune import pruner


class PruneEntry:
    """Call it to prune; read any other name from the :mod:`pccfast.prune` package."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        return pruner.prune(*args, **kwargs)

    @staticmethod
    def _package():
        return sys.modules["pccfast.prune"]

    def __getattr__(self, name: str):
        return getattr(self._package(), name)

    def __setattr__(self, name: str, value) -> None:  # monkeypatching reaches the package
        setattr(self._package(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._package(), name)

    def __dir__(self):
        return dir(self._package())

    def __repr__(self) -> str:
        return ("<pccfast.prune: call it to prune (pccfast.prune.pruner.prune); other names "
                "are the pccfast.prune package's>")


prune = PruneEntry()
