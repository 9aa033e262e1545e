-- title: Concepts similar to a phrase
-- description: Stored concepts nearest to free text by MiniLM similarity (run store.embed_concepts() first).
-- param phrase VARCHAR: any words, e.g. 'zebra stripes'
-- param k INTEGER = 10: how many concepts
SELECT * FROM similar_concepts($phrase, k := $k)
