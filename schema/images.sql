-- description: A probe image seen by a run.
-- sort: image_id
CREATE TABLE images (
    dataset      VARCHAR,    -- probe set id: probe world id or a hash of the image folder
    image_id     VARCHAR,    -- id within the dataset (relative path or world index)
    path         VARCHAR,    -- absolute path of the image file
    width        INTEGER,    -- pixels
    height       INTEGER,    -- pixels
    label        VARCHAR,    -- class when known (probe world: main object's shape; an image folder: the top-level subfolder the file is in)
    caption      VARCHAR,    -- caption when known
    split        VARCHAR,    -- 'train', 'test', 'probe', ...
    has_cue      BOOLEAN,    -- probe world: the spurious cue is drawn in this image
    content_hash VARCHAR,    -- hash of the file's bytes as the run read it: its vectors' key in embeddings (NULL: stores before it)
    run_id       VARCHAR     -- run that wrote the row
);
