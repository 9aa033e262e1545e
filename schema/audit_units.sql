-- description: A unit that drives a class in a spurious-concept audit (neurostore audit): its contributions, the effect of zeroing it, its explanation and how related that is to the class name.
-- partition: model
-- sort: class, rank
CREATE TABLE audit_units (
    class             VARCHAR,    -- output class audited
    rank              INTEGER,    -- 0 = the unit with the largest grad_x_act toward the class
    layer             VARCHAR,    -- module path
    unit              INTEGER,    -- channel / neuron index
    grad_x_act        FLOAT,      -- gradient x activation toward the class logit, summed over positions, mean over the class's probe images
    weight_x_act      FLOAT,      -- classifier weight x pooled activation, mean over the class's probe images (NULL unless the layer feeds the head)
    share             FLOAT,      -- grad_x_act / sum of the positive grad_x_act of all units of the layer for the class
    ablation_effect   FLOAT,      -- class accuracy change when this unit alone is zeroed (ablated - baseline)
    label             VARCHAR,    -- the unit's explanation (top concept) under `scorer`
    label_confidence  FLOAT,      -- confidence of the label in [0, 1]
    relatedness       FLOAT,      -- MiniLM cosine of the label and the class name
    threshold         FLOAT,      -- relatedness below this flags the unit (see neurostore.analysis.audit)
    selectivity       FLOAT,      -- AUROC of the unit's per-image peak activation, the class's probe images against the others' (0.5: fires alike on every class)
    cue_effect        FLOAT,      -- probe world: mean rise of the unit's per-image peak when the cue is drawn on other-class scenes, in SDs of the peak over the probe images; NULL elsewhere
    flagged           BOOLEAN,    -- the unit drives the class, fires selectively on it (selectivity >= 0.9), its label is unrelated to the class name and, where cue_effect is known, it is >= 1
    scorer            VARCHAR,    -- scorer whose explanations were used
    n_images          INTEGER,    -- probe images of the class the figures are over
    dataset           VARCHAR,    -- probe set id
    run_id            VARCHAR,    -- run that wrote the row
    model             VARCHAR     -- model id (partition)
);
