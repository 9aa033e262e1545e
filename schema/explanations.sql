-- description: A unit's explanation: its ranked concepts per scorer, and an optional sentence.
-- partition: model, layer
-- sort: unit, scorer
CREATE TABLE explanations (
    unit         INTEGER,    -- channel / neuron index
    scorer       VARCHAR,    -- scorer the concepts came from
    label        VARCHAR,    -- the top concept
    confidence   FLOAT,      -- P(the top concept is right): calibrated map of the null q and margin (trust.py)
    concepts     VARCHAR[],  -- top concepts, best first
    confidences  FLOAT[],    -- their confidences
    summary      VARCHAR,    -- one-sentence description (LLM), NULL when not asked for
    summary_by   VARCHAR,    -- model that wrote the summary
    vocabulary   VARCHAR,    -- vocabulary
    encoder      VARCHAR,    -- encoder id (NULL for 'iou')
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR,    -- model id (partition)
    layer        VARCHAR     -- module path (partition)
);
