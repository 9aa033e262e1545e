-- description: A vector of a patch, a whole image or a concept, per encoder.
-- sort: encoder, kind, item_id
CREATE TABLE embeddings (
    encoder      VARCHAR,    -- encoder id, e.g. 'open_clip:ViT-B-32/laion2b_s34b_b79k', 'minilm:all-MiniLM-L6-v2'
    kind         VARCHAR,    -- 'patch', 'image', 'concept' or 'cell' (encoder_iou's windows)
    item_id      VARCHAR,    -- content key: patch_id (crop hash), image file SHA-1 (16 hex), the concept text, or
                             -- 'image hash/geometry/cell' (encoder_iou's window around one cell of the image)
    vector       FLOAT[],    -- unit-length embedding, the same length for every row of one encoder
    run_id       VARCHAR     -- run that wrote the row
);
