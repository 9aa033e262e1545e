"""Explain ResNet-50's neurons with OpenCLIP, on your own folder of photos.

This is the real-world path: torchvision's ImageNet weights and OpenCLIP ViT-B-32 (LAION-2B) are
downloaded once by torchvision / OpenCLIP (internet needed the first time; both cache them).

    python examples/resnet50_openclip.py ~/photos --store resnet-store
    neurostore serve --store resnet-store            # then browse neurons and their patches

Hidden layers are explained with 10,000 common English words; the final layer with the ImageNet
class names, so its units can be checked against the class they stand for.
"""

import argparse

from neurostore.analysis import find
from neurostore.pipeline import dissect
from neurostore.store import Store

MODEL = "torchvision:resnet50@IMAGENET1K_V2"
ENCODER = "open_clip:ViT-B-32/laion2b_s34b_b79k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", help="folder of images (searched recursively); a few thousand works well")
    ap.add_argument("--store", default="resnet-store", help="store folder (created if missing)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    store = Store.open(args.store)
    hidden = dissect(store, MODEL, images=args.images, layers=["layer2", "layer3", "layer4"],
                     vocabulary="english", encoder=ENCODER, k=10, batch_size=args.batch_size)
    print(f"hidden layers: {hidden['units']} units, {hidden['patches']} patches, run {hidden['run_id']}")
    final = dissect(store, MODEL, images=args.images, layers=["fc"], vocabulary="imagenet",
                    encoder=ENCODER, scorers=["soft_wpmi", "cos_cubed"], k=10, batch_size=args.batch_size)
    print(f"final layer: {final['units']} units, run {final['run_id']}")

    # How often is a logit unit explained by its own class name?
    print(store.sql("""
        SELECT e.scorer, avg(CAST(e.label = m.classes[e.unit + 1] AS DOUBLE)) AS top1
        FROM explanations e JOIN models m USING (model)
        WHERE e.model = $m AND e.layer = 'fc' GROUP BY e.scorer""", {"m": final["model"]}).to_pandas())

    # The most confident explanations of layer4.
    print(store.sql("""
        SELECT unit, label, round(confidence, 3) AS confidence, concepts[2:3] AS runners_up
        FROM explanations WHERE model = $m AND layer = 'layer4' AND scorer = 'soft_wpmi'
        ORDER BY confidence DESC LIMIT 15""", {"m": hidden["model"]}).to_pandas())

    # Concept -> neurons, including an open-vocabulary phrase no vocabulary holds.
    for phrase in ("dog", "striped", "a rusty bicycle"):
        r = find(store, phrase, top=5)
        print(phrase, [(h["model"], h["layer"], h["unit"], h["method"]) for h in r.to_dict()["units"][:5]])


if __name__ == "__main__":
    main()
