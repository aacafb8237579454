"""``sd-generalization-eos`` at the paper's MLP size: 784 -> 16 -> 16 -> 10 (no bias, 12,960 parameters)
on the digits upsampled bilinearly to 28 x 28 (rank <= 64 inputs: the exact SD's structured first-layer
route reduces the first layer to 16 x rank(X_B) parameters, so the grid costs about what the 8 x 8 one
does). Same grid, seeds, epochs, measures and verdict (see :mod:`.sd_generalization_eos`)."""

from __future__ import annotations

from pathlib import Path

from . import sd_generalization_eos as _eos

NAME = "sd-generalization-paper"
TITLE = ("SD vs generalization at the edge of stability on the paper's MLP size (784-16-16-10, 12,960 parameters, "
         "digits upsampled to 28x28): the sd-generalization-eos grid")
CLAIM = _eos.CLAIM


def run(out: Path, quick: bool, store, log) -> dict:
    return _eos.run(out, quick, store, log, size=28)
