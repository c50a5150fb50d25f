"""Learning the user's domain from the provider calls already paid for.

* :mod:`.pairs`: the pair store, (source vector, provider vector) beside the cache;
* :mod:`.audit`: audits of the local route, the quality report and the guard;
* :mod:`.learner`: what the pipeline asks of them;
* :mod:`.adapt`: ``adapt()``, fitting a domain adapter from the pairs (imports training
  code, so it is loaded only when called).
"""

from adapted_embeddings.learning.audit import QualityFloor, QualityReport
from adapted_embeddings.learning.pairs import PairRecord, PairSet, PairStore

__all__ = ["PairRecord", "PairSet", "PairStore", "QualityFloor", "QualityReport"]
