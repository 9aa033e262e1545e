-- description: Per-pixel mask of one concept in one image (probe world ground truth).
-- sort: image_id, concept
CREATE TABLE masks (
    dataset      VARCHAR,    -- probe set id
    image_id     VARCHAR,    -- image within the dataset
    concept      VARCHAR,    -- concept word, e.g. 'circle', 'red', 'striped'
    category     VARCHAR,    -- 'shape', 'colour', 'texture', 'cue', ...
    height       INTEGER,    -- mask height in pixels
    width        INTEGER,    -- mask width in pixels
    rle          INTEGER[],  -- run lengths over the row-major mask, starting with a run of 0s
    area         INTEGER,    -- pixels set
    run_id       VARCHAR     -- run that wrote the row
);
