-- title: Evaluation summary
-- description: Explanation quality against the probe world's truth, per model and scorer: final-layer top-1/top-5 and hidden-unit agreement with the mask-IoU reference, averaged over layers.
-- param model VARCHAR = NULL: only this model (default: every model)
SELECT model, scorer,
       round(avg(value) FILTER (WHERE metric = 'top1'), 3)          AS final_top1,
       round(avg(value) FILTER (WHERE metric = 'top5'), 3)          AS final_top5,
       round(avg(value) FILTER (WHERE metric = 'iou_agreement'), 3) AS hidden_iou_agreement,
       round(avg(value) FILTER (WHERE metric = 'minilm_cosine'), 3) AS hidden_minilm_cosine,
       round(avg(value) FILTER (WHERE metric = 'interpretable'), 3) AS interpretable_frac
FROM evaluations
WHERE $model IS NULL OR model = $model
GROUP BY model, scorer
ORDER BY model, scorer
