-- description: A spurious-concept finding (neurostore audit): a concept unrelated to a class whose units (or, in a ViT, whose residual-stream direction) drive it, verified by removing them and measuring the model's reliance on the cue.
-- partition: model
-- sort: class, rank
CREATE TABLE audit_findings (
    class               VARCHAR,    -- output class the concept drives
    concept             VARCHAR,    -- the driving concept: the shared explanation label of the flagged units
    rank                INTEGER,    -- 0 = the class's finding with the largest contribution
    neurons             VARCHAR[],  -- the flagged units with this label, as 'layer/unit' (empty for a direction finding)
    n_units             INTEGER,    -- len(neurons)
    contribution        FLOAT,      -- sum of the units' grad_x_act toward the class (a direction: grad x act along it)
    relatedness         FLOAT,      -- MiniLM cosine of the concept and the class name
    threshold           FLOAT,      -- relatedness threshold of the audit
    accuracy_before     FLOAT,      -- the class's accuracy on its probe images
    accuracy_after      FLOAT,      -- the same with the units zeroed together
    cue_flip_before     FLOAT,      -- probe world: fraction of other-class scenes predicted as the class once the cue is added (world.cue_pairs); NULL elsewhere
    cue_flip_after      FLOAT,      -- the same with the units zeroed
    cued_accuracy_before FLOAT,     -- probe world: accuracy on other-class scenes with the cue drawn
    cued_accuracy_after FLOAT,      -- the same with the units zeroed
    cue_gain_before     FLOAT,      -- probe world: mean rise of the class logit when the cue is drawn on other-class scenes
    cue_gain_after      FLOAT,      -- the same with the units zeroed
    reliance_drop       FLOAT,      -- cue_flip_before - cue_flip_after
    verified            BOOLEAN,    -- removing the finding removed reliance: reliance_drop >= max(0.05, 0.3 x cue_flip_before) and the cue gain fell by half; NULL without cue pairs
    ablation            VARCHAR,    -- how the finding was removed: 'units' (zeroed), 'units+tokens' (token models: zeroed, and the patch tokens they fire on mean-ablated where tokens enter the blocks) or 'direction' (the concept's residual direction projected out after direction_layer)
    direction_layer     VARCHAR,    -- ablation 'direction': the block whose output had the concept's residual direction projected out (token models); NULL otherwise
    headline            BOOLEAN,    -- the model's main finding: the verified finding with the largest relative cue-gain drop (else the largest contribution)
    scorer              VARCHAR,    -- scorer whose explanations were used
    n_images            INTEGER,    -- probe images of the class
    n_pairs             INTEGER,    -- paired clean/cued scenes used for the cue flip rate
    dataset             VARCHAR,    -- probe set id
    run_id              VARCHAR,    -- run that wrote the row
    model               VARCHAR     -- model id (partition)
);
