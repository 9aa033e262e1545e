-- description: Every label an imported method gave a unit, raw and normalised, with the method's own score: the chosen label (rank 0, the one in explanations) and, for Network Dissection, the best label of every other Broden category with its IoU and pixel counts.
-- partition: model, layer
-- sort: unit, method, rank
CREATE TABLE explanation_candidates (
    unit          INTEGER,    -- channel / neuron index, 0-based (Network Dissection's 1-based units are shifted)
    method        VARCHAR,    -- 'clip-dissect', 'milan', 'netdissect' or the name given to the import (explanations.scorer)
    rank          INTEGER,    -- 0 = the label the method chose; then the other candidates by score, best first
    category      VARCHAR,    -- Broden category ('object', 'part', 'scene', 'material', 'texture', 'color'), NULL when the method has none
    label         VARCHAR,    -- normalised label (lowercase, no '-s'/'-c' suffix, no underscores or quotes)
    label_raw     VARCHAR,    -- the label exactly as the source file spells it
    score         FLOAT,      -- the method's own score: CLIP-Dissect similarity, Network Dissection IoU; NULL for MILAN
    truth_px      BIGINT,     -- Network Dissection: pixels where the concept is present (its 'truth' column)
    active_px     BIGINT,     -- Network Dissection: pixels where the unit is active ('activation')
    intersect_px  BIGINT,     -- Network Dissection: pixels where both hold ('intersect')
    source        VARCHAR,    -- source file name
    line          INTEGER,    -- line of the source file (1 = header)
    run_id        VARCHAR,    -- run that wrote the row
    model         VARCHAR,    -- model id (partition)
    layer         VARCHAR     -- module path (partition)
);
