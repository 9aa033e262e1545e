-- description: A dictionary learned on a layer's activations (sparse autoencoder or NMF): its weights, provenance and quality. Its features are the units of the feature layer `layer`.
-- partition: model
-- sort: layer
CREATE TABLE dictionaries (
    layer          VARCHAR,    -- the feature layer's module path, e.g. 'conv4.topk_sae_8x' (a child of source_layer)
    source_layer   VARCHAR,    -- the layer whose output the dictionary encodes, e.g. 'conv4'
    method         VARCHAR,    -- 'topk-sae' or 'nmf'
    width          INTEGER,    -- features per unit of the source layer (n_features = width x n_units)
    k              INTEGER,    -- active features per sample (topk-sae); NULL for nmf
    threshold      FLOAT,      -- a feature is active where its pre-activation exceeds this (BatchTopK's inference rule), instead of the top k; NULL: the top k
    n_units        INTEGER,    -- units of the source layer (input dimension)
    n_features     INTEGER,    -- dictionary size: the feature layer's units
    input          VARCHAR,    -- what is encoded: 'raw' (the layer output) or 'relu' (max(output, 0), for nmf)
    dataset        VARCHAR,    -- probe set the activations came from
    n_images       INTEGER,    -- images streamed
    n_samples      INTEGER,    -- samples fitted on (spatial positions / patch tokens, subsampled)
    n_holdout      INTEGER,    -- held-out samples (from other images) the quality is measured on
    seed           INTEGER,    -- random seed of the subsample and the fit
    steps          INTEGER,    -- optimiser steps (topk-sae) or iterations (nmf)
    fve            FLOAT,      -- fraction of variance explained on the held-out samples
    l0             FLOAT,      -- mean number of active features per held-out sample
    dead_features  INTEGER,    -- features never active on any fitted or held-out sample
    dead_fraction  FLOAT,      -- dead_features / n_features
    w_enc          FLOAT[],    -- encoder weights [n_units, n_features] row-major (topk-sae); NULL for nmf
    b_enc          FLOAT[],    -- encoder bias [n_features] (topk-sae); NULL for nmf
    w_dec          FLOAT[],    -- decoder / NMF components [n_features, n_units] row-major
    b_dec          FLOAT[],    -- decoder bias [n_units], subtracted before encoding (topk-sae); zeros for nmf
    run_id         VARCHAR,    -- run that wrote the row
    model          VARCHAR     -- model id (partition)
);
