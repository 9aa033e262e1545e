-- description: A concept vocabulary and where it came from.
CREATE TABLE vocabularies (
    vocabulary   VARCHAR,    -- name, e.g. 'probe', 'imagenet', 'english-3k', 'llm:birds-3f2a'
    source       VARCHAR,    -- 'builtin', 'file:/path', 'llm:<model>'
    description  VARCHAR,    -- what it covers (for LLM vocabularies, the prompt's domain)
    n_concepts   INTEGER,    -- number of concepts
    run_id       VARCHAR     -- run that wrote the row
);
