"""Image labels as a model's class names.

An image folder laid out by class (torchvision's ImageFolder convention: `photos/goldfish/1.jpg`)
labels each image with its top-level subfolder (`images.ImageFolder`). Audits and ablations need
those labels as the model's own class names, and folders name classes their own way:

    goldfish, Goldfish             the class's name, any case
    great_white_shark              '_' and '-' as spaces
    n01443537                      an ImageNet-1k synset id (ILSVRC's val/ and train/ layout)
    white shark                    another ImageNet-1k synonym of the class

The last two apply when the model's classes are ImageNet-1k's (1,000 classes in ILSVRC order,
named as torchvision's weights name them); `data/imagenet_wnids.txt` is that order's synset ids
(timm's `imagenet_synsets.txt`) and `data/imagenet_labels.txt` each class's synonyms.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def normalise(text: str | None) -> str:
    """Lowercase, '_' and '-' as spaces, single spaces: the form names are compared in."""
    return " ".join(re.sub(r"[_\-]+", " ", (text or "").lower()).split())


@cache
def imagenet() -> tuple[list[str], list[list[str]]]:
    """(synset ids, normalised synonyms per class), both in ILSVRC class order."""
    wnids = (DATA / "imagenet_wnids.txt").read_text().split()
    synonyms = [[normalise(s) for s in line.split(",")]
                for line in (DATA / "imagenet_labels.txt").read_text().splitlines() if line.strip()]
    return wnids, synonyms


def is_imagenet(classes: Sequence[str]) -> bool:
    """Whether `classes` are ImageNet-1k's in ILSVRC order (each name one of its class's synonyms,
    but for a few that a library disambiguates, such as torchvision's 'crane bird')."""
    if len(classes) != 1000:
        return False
    _, synonyms = imagenet()
    return sum(normalise(c) in syn for c, syn in zip(classes, synonyms)) >= 990


def class_map(labels: Iterable[str | None], classes: Sequence[str]) -> dict[str, str]:
    """{label: the class it names} for the labels that name one of `classes`; others are left out."""
    exact = set(classes)
    by_name: dict[str, str] = {}
    for c in classes:
        by_name.setdefault(normalise(c), c)
    if is_imagenet(classes):
        wnids, synonyms = imagenet()
        for c, wnid, syn in zip(classes, wnids, synonyms):
            by_name.setdefault(wnid, c)
            for s in syn:
                by_name.setdefault(s, c)  # a synonym two classes share ('crane') names the first
    out = {}
    for label in labels:
        if label is None:
            continue
        found = label if label in exact else by_name.get(normalise(label))
        if found is not None:
            out[label] = found
    return out
