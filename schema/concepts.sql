-- description: A concept (word or phrase) of a vocabulary.
-- sort: vocabulary, concept
CREATE TABLE concepts (
    vocabulary   VARCHAR,    -- vocabulary name
    concept      VARCHAR,    -- the word or phrase, lowercase
    category     VARCHAR,    -- optional group, e.g. 'shape', 'colour', 'texture', 'object'
    run_id       VARCHAR     -- run that wrote the row
);
