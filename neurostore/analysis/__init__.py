"""The questions the store exists to answer (issue #5), each a function over a store:

    find(store, phrase)            concept -> neurons: exact, semantic and open-vocabulary matches,
                                   with where in each network the concept lives
    compare(store, a, b)           model vs model: coverage, concept differences, unit matching
    audit(store, model, classes)   spurious-concept audit, verified by ablation
    ablate(store, model, units)    zero units, per-class accuracy change

Each returns a Python object with `to_dict()` (what `--json` prints); compare, audit and ablate
also write their findings to the store with the run's provenance, so `neurostore query` answers
later without recomputing.
"""

from .ablate import ablate
from .audit import audit
from .compare import compare
from .find import find

__all__ = ["find", "compare", "audit", "ablate"]
