-- description: A metric of explanations (or models) against ground truth.
-- partition: model
CREATE TABLE evaluations (
    layer        VARCHAR,    -- module path, or NULL for model-level metrics
    scorer       VARCHAR,    -- scorer evaluated, or NULL
    metric       VARCHAR,    -- e.g. 'top1', 'top5', 'iou_agreement', 'minilm_cosine'
    value        DOUBLE,     -- the figure
    n            INTEGER,    -- units or images it is over
    dataset      VARCHAR,    -- probe set id
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR     -- model id (partition)
);
