-- description: One headline explanation per unit, chosen across scorers by calibrated confidence from held-out encoder fidelity and agreement (no ground truth).
-- partition: model, layer
-- sort: unit
CREATE TABLE headlines (
    unit         INTEGER,    -- channel / neuron index
    concept      VARCHAR,    -- the headline concept
    scorer       VARCHAR,    -- scorer that proposed it
    rank         INTEGER,    -- its rank among that scorer's concepts for the unit (0 = label)
    confidence   FLOAT,      -- P(the headline is right): the headline map of neurostore/trust.py (what chose it)
    fidelity     DOUBLE,     -- held-out Pearson of activation with encoder presence
    auprc        DOUBLE,     -- held-out AUPRC with encoder presence
    candidates   INTEGER,    -- how many (scorer, concept) candidates it was chosen from
    runner_up    VARCHAR,    -- the best candidate naming another concept (NULL: every candidate names this one)
    runner_up_scorer VARCHAR,  -- scorer that proposed the runner-up
    runner_up_confidence FLOAT,  -- its confidence as a headline (the same map)
    dataset      VARCHAR,    -- probe set whose held-out images gave the fidelity
    vocabulary   VARCHAR,    -- vocabulary of the concept
    encoder      VARCHAR,    -- encoder id of the presence
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR,    -- model id (partition)
    layer        VARCHAR     -- module path (partition)
);
