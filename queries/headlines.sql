-- title: Headline explanations
-- description: One answer per unit (the scorers' candidate with the best held-out fidelity, see neurostore.trust), with its confidence and fidelity, the runner-up (the best candidate naming another concept) and every scorer's own label beside it.
-- param model VARCHAR = NULL: only this model, e.g. 'probe-cnn' (default: every model)
-- param layer VARCHAR = NULL: only this layer, e.g. 'conv3' (default: every layer)
-- param min_confidence DOUBLE = 0: only headlines at least this confident
SELECT h.model, h.layer, h.unit, h.concept, h.scorer, h.confidence, h.auprc, h.fidelity AS pearson,
       h.runner_up, h.runner_up_confidence,
       (SELECT list(e.scorer || ': ' || e.label || ' (' || round(e.confidence, 2) || ')' ORDER BY e.scorer)
        FROM explanations e WHERE e.model = h.model AND e.layer = h.layer AND e.unit = h.unit
          AND e.vocabulary = h.vocabulary) AS by_scorer,
       h.vocabulary, h.encoder
FROM headlines h
WHERE ($model IS NULL OR h.model = $model) AND ($layer IS NULL OR h.layer = $layer)
  AND h.confidence >= $min_confidence
ORDER BY h.model, h.layer, h.unit
