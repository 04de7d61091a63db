"""A pickle that runs code when unpickled: it creates a marker file (tests that run folders and
checkpoints are read without unpickling anything)."""

from __future__ import annotations

import io

import torch


class Planted:
    """Unpickling calls ``open(marker, "w")``: the marker file appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_model_file(path, marker) -> None:
    """A file shaped like pccfast.save's output for a model outside the zoo (a pickled module)."""
    buffer = io.BytesIO()
    torch.save(Planted(marker), buffer)
    module = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    torch.save({"format": "pccfast.model", "version": 1, "class": "VGGCifar", "kind": "module",
                "module": module}, path)


def planted_checkpoint(path, marker, stage: str) -> None:
    """A training checkpoint (any version) whose RNG state is the planted pickle."""
    from pccfast.train.checkpoint import FORMAT, VERSION

    torch.save({"format": FORMAT, "version": VERSION, "stage": stage, "epoch": 1,
                "rng": Planted(marker), "origin": None}, path)
