"""Test helpers shipped with prunekit: a seeded generator of random CNNs and the fuzzing
harness that checks the pruning engine's properties on them (:mod:`prunekit.testing.fuzz`).

Used by ``tests/test_fuzz.py`` and ``bench/fuzz.py``; nothing in the library imports it.
"""

from .fuzz import (
    FuzzNet,
    Outcome,
    build,
    calibration_set,
    check_architecture,
    random_spec,
    spec_features,
    summarise,
)

__all__ = ["FuzzNet", "Outcome", "build", "calibration_set", "check_architecture", "random_spec",
           "spec_features", "summarise"]
