"""Three published methods on the same ResNet-50, side by side, in SQL.

CLIP-Dissect, MILAN and Network Dissection each explained the neurons of torchvision's ImageNet
ResNet-50 and published their labels. This imports the three files into one store and asks real
questions of the real model (nothing is downloaded; the files ship in ../shared/data/field-results):

    python examples/field_results_resnet50.py --store field-store
    neurostore serve --store field-store      # a neuron's page shows every method's label

Each question is plain DuckDB SQL over the store's views; `explanations.scorer` holds the method.
"""

import argparse
from pathlib import Path

from neurostore.classeval import evaluate_classes
from neurostore.fieldresults import import_results
from neurostore.store import Store

FIELD = Path(__file__).resolve().parents[2] / "shared/data/field-results"


def show(title: str, table) -> None:
    print(f"\n## {title}\n")
    print(table.to_pandas().to_string(index=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="field-store", help="store folder (created if missing)")
    ap.add_argument("--files", type=Path, default=FIELD, help="folder with the published result files")
    args = ap.parse_args()

    store = Store.open(args.store)
    f = args.files
    for fmt, files in (("clip-dissect", [f / "clip-dissect_resnet50_imagenet.csv"]),
                       ("milan", [f / "milan-base_resnet50_imagenet.csv"]),
                       ("netdissect", sorted(f.glob("netdissect_resnet50_imagenet_*.csv")))):
        res = import_results(store, fmt, files, model="resnet50")
        print(f"imported {fmt}: {res.rows['explanations']} units from {len(files)} file(s), run {res.run_id}")

    # 1. Which layer4 units do CLIP-Dissect and Network Dissection agree on?
    show("layer4 units where CLIP-Dissect and Network Dissection give the same label", store.sql("""
        SELECT c.unit, c.label, nd.category AS broden_category, round(nd.score, 4) AS netdissect_iou,
               round(cd.score, 4) AS clipdissect_similarity
        FROM explanations c
        JOIN explanations n USING (model, layer, unit)
        JOIN explanation_candidates nd ON nd.model = n.model AND nd.layer = n.layer AND nd.unit = n.unit
             AND nd.method = 'netdissect' AND nd.rank = 0
        JOIN explanation_candidates cd ON cd.model = c.model AND cd.layer = c.layer AND cd.unit = c.unit
             AND cd.method = 'clip-dissect' AND cd.rank = 0
        WHERE c.model = 'resnet50' AND c.layer = 'layer4' AND c.scorer = 'clip-dissect' AND n.scorer = 'netdissect'
          AND c.label = n.label
        ORDER BY nd.score DESC LIMIT 15"""))
    show("agreement per layer (named query method_agreement: same label, mean MiniLM similarity)",
         store.query("method_agreement", {"model": "resnet50", "method_a": "clip-dissect", "method_b": "netdissect"}))

    # 2. Which concepts does MILAN find in layer4 that CLIP-Dissect never names (in any layer)?
    #    MILAN writes phrases; a concept here is a MILAN label none of whose words (or their singular)
    #    is a CLIP-Dissect label.
    show("MILAN layer4 descriptions whose words CLIP-Dissect never uses as a label (most frequent first)", store.sql("""
        WITH cd AS (SELECT DISTINCT label FROM explanations WHERE model = 'resnet50' AND scorer = 'clip-dissect'),
             m AS (SELECT unit, label, string_split_regex(label, '[^a-z]+') AS words FROM explanations
                   WHERE model = 'resnet50' AND layer = 'layer4' AND scorer = 'milan')
        SELECT label AS milan_description, count(*) AS units, min(unit) AS example_unit
        FROM m
        WHERE NOT EXISTS (SELECT 1 FROM cd WHERE cd.label = m.label  -- 'dogs' is named by 'dog' too
                          OR list_has_any(m.words, [cd.label, cd.label || 's', cd.label || 'es']))
        GROUP BY label ORDER BY units DESC, label LIMIT 15"""))

    # 3. Where along the depth does "dog" appear for each method?
    show("units whose label names 'dog', per method and layer (named query label_depth_profile)",
         store.query("label_depth_profile", {"concept": "dog", "model": "resnet50"}))

    # 4. How do the final-layer labels compare with the ImageNet class each unit stands for?
    res = evaluate_classes(store, "resnet50", "fc", "imagenet")
    print(f"\n## fc labels vs ImageNet class names ({res.text_model})\n")
    for m in res.methods:
        print(f"  {m['method']:<11} top-1 {m['top1']:.3f}  class cosine {m['class_cosine']:.4f}  over {m['n']} units")

    # 5. Where do the methods contradict each other most on layer4?
    show("layer4 units where CLIP-Dissect and MILAN disagree most (named query method_disagreements)",
         store.query("method_disagreements", {"model": "resnet50", "method_a": "clip-dissect", "method_b": "milan",
                                              "layer": "layer4", "top": 8}))


if __name__ == "__main__":
    main()
