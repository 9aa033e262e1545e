-- description: A fidelity metric of one explanation (unit, scorer, concept) on held-out probe images, or its null q-value.
-- partition: model, layer
-- sort: unit, scorer, concept, metric
CREATE TABLE explanation_scores (
    unit         INTEGER,    -- channel / neuron index
    scorer       VARCHAR,    -- scorer whose explanation it is
    concept      VARCHAR,    -- the explained concept
    rank         INTEGER,    -- its rank among the scorer's concepts for the unit (0 = label)
    metric       VARCHAR,    -- 'pearson' or 'auprc' (unit activation vs concept presence); 'cosine_pearson' (encoder: vs the raw cosine); 'concept_peak' (encoder: log max/mean of the concept's zero-shot p over held-out images, a property of the concept); 'null_q' (BH q against random directions)
    presence     VARCHAR,    -- what gave the concept's presence: 'encoder' (zero-shot p(concept | image) from the image-concept cosine) or 'masks' (truth); 'null' for null_q
    value        DOUBLE,     -- the figure (NULL when the concept is absent from every held-out image)
    n_images     INTEGER,    -- held-out images it is over
    method       VARCHAR,    -- how it was computed, e.g. 'pooled act_mean, heldout sha1(image_id) < 0.2'
    dataset      VARCHAR,    -- probe set id
    vocabulary   VARCHAR,    -- vocabulary of the concept
    encoder      VARCHAR,    -- encoder id of the presence (NULL for 'masks')
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR,    -- model id (partition)
    layer        VARCHAR     -- module path (partition)
);
