"""The ImageNet tagger: class list, calibrated probabilities against timm's own classifier, tags and
their thresholds, the zero-shot math, and clear errors when the class list or the file is unusable."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval.errors import InputError, ModelLoadError
from retrieval.native.imagenet import GROUPS, load_classes, timm_info_dir
from retrieval.tagging import concept_scores, concept_vectors, gate

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "indexer" / "sample_photos"


def test_class_list_names_are_readable():
    classes = load_classes()
    assert len(classes) == 1000 and len(set(classes.names)) == 1000  # duplicates ("crane", "maillot") renamed
    assert classes.names[933] == "cheeseburger" and classes.names[963] == "pizza" and classes.names[468] == "taxi"
    assert classes.prompt(963) == "pizza, pizza pie"
    assert all(0 <= c < 1000 for members in GROUPS.values() for c in members)
    assert classes.names[GROUPS["dog"][0]] == "Chihuahua" and classes.names[GROUPS["dog"][-1]] == "Mexican hairless"


def test_unusable_class_list_is_a_clear_error_at_load(tmp_path):
    with pytest.raises(ModelLoadError, match="imagenet_synsets.txt"):
        load_classes(tmp_path)
    shutil.copy(timm_info_dir() / "imagenet_synset_to_lemma.txt", tmp_path)
    (tmp_path / "imagenet_synsets.txt").write_text("n01440764\n")
    with pytest.raises(ModelLoadError, match="1000 ImageNet-1k synsets"):
        load_classes(tmp_path)
    lines = (timm_info_dir() / "imagenet_synsets.txt").read_text()
    (tmp_path / "imagenet_synsets.txt").write_text(lines)
    (tmp_path / "imagenet_synset_to_lemma.txt").write_text("n01440764\ttench\n")
    with pytest.raises(ModelLoadError, match="no names for 999"):
        load_classes(tmp_path)


def test_concept_scores_are_the_cosine_with_the_weighted_class_names():
    emb = np.eye(3, dtype=np.float32)
    classes = [[(0, 0.6), (1, 0.2)], [], [(2, 0.9)]]
    q = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    got = concept_scores(q, classes, emb)
    v0 = np.array([0.6, 0.2, 0.0]) / np.linalg.norm([0.6, 0.2])
    assert got[0] == pytest.approx(float(v0 @ q)) and np.isnan(got[1]) and got[2] == pytest.approx(0.0)
    sharp = concept_vectors(classes[:1], emb, sharpen=0.5)[0]
    expected = np.array([0.6 ** 0.5, 0.2 ** 0.5, 0]) / np.linalg.norm([0.6 ** 0.5, 0.2 ** 0.5])
    np.testing.assert_allclose(sharp, expected, rtol=1e-6)


def test_gate_ramps_from_floor_to_one():
    assert gate(0.2, 0.45, 0.7, 0.125) == 0.125 and gate(0.9, 0.45, 0.7, 0.125) == 1.0
    assert gate(0.575, 0.45, 0.7, 0.125) == pytest.approx(0.125 + 0.875 * 0.5)


@pytest.fixture(scope="module")
def tagger():
    from retrieval.native.tagger import ImageNetTagger

    return ImageNetTagger()


def test_probabilities_are_timms_classifier_at_the_calibrated_temperature(tagger):
    import timm

    from retrieval.images import load_image, to_tensor
    from retrieval.native.towers import IMAGE_MEAN, IMAGE_STD, ImageTower, efficientnet_weights_path

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    reference.load_state_dict(dict(zip(reference.state_dict().keys(), state.values())))
    reference.eval()
    x = torch.stack([to_tensor(load_image(SAMPLES / n).image, 224, IMAGE_MEAN, IMAGE_STD)
                     for n in ("pizza_pepperoni_01.jpg", "street_yellow_taxis_01.jpg")])
    with torch.inference_mode():
        expected = torch.softmax(reference(x) / tagger.temperature, dim=-1)
        got = tagger.probabilities(ImageTower().eval()(x))  # the folded tower's grid, as indexing has it
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)
    classes = tagger.classify_grid(ImageTower().eval()(x))
    assert classes[0][0][0] == 963 and classes[1][0][0] == 468  # pizza, taxi
    assert [t.name for t in tagger.tags(classes[0])] == ["pizza"]
    assert {"car", "taxi"} <= {t.name for t in tagger.tags(classes[1])}


def test_tags_follow_the_thresholds(tagger):
    dog = GROUPS["dog"]
    spread = [(dog[0], 0.3), (dog[1], 0.25), (963, 0.05)]  # no breed sure, but surely a dog
    assert [t.name for t in tagger.tags(spread)] == ["dog"]
    assert tagger.tags([(963, tagger.class_threshold - 0.01)]) == []
    sure = tagger.tags([(963, 0.9)])
    assert [(t.name, t.source) for t in sure] == [("pizza", "imagenet:963")]


def _text_page() -> Image.Image:
    im = Image.new("RGB", (600, 800), "white")
    draw = ImageDraw.Draw(im)
    for y in range(40, 780, 22):
        draw.text((40, y), "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod", fill="black")
    return im


def test_blank_and_abstract_pictures_get_no_tags(tagger):
    from retrieval.images import to_tensor
    from retrieval.native.towers import IMAGE_MEAN, IMAGE_STD, ImageTower

    rng = np.random.default_rng(0)
    pictures = [Image.new("RGB", (300, 300), (128, 128, 128)),
                Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)), _text_page()]
    x = torch.stack([to_tensor(p, 224, IMAGE_MEAN, IMAGE_STD) for p in pictures])
    with torch.inference_mode():
        classes = tagger.classify_grid(ImageTower().eval()(x))
    assert [tagger.tags(c) for c in classes] == [[], [], []]


def test_unusable_tagger_file_is_a_clear_error(tmp_path, tagger):
    from retrieval.native.imagenet import default_classes
    from retrieval.native.tagger import ImageNetTagger, create_tagger, save_tagger

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a tagger")
    with pytest.raises(ModelLoadError, match="not a pixquery tagger file"):
        ImageNetTagger(str(junk))
    with pytest.raises(ModelLoadError, match="do not exist"):
        ImageNetTagger(str(tmp_path / "missing.pt"))
    classes = default_classes()
    other = type(classes)(classes.synsets, classes.synonyms, classes.names, {"dog": (151,)})
    calibration = {k: getattr(tagger, k) for k in ("temperature", "top_k", "floor", "class_threshold",
                                                   "group_threshold", "max_class_tags", "sharpen")}
    calibration["gate"] = {"low": 0.4, "high": 0.6, "floor": 0.1}
    path = tmp_path / "other.pt"
    save_tagger(path, calibration, tagger.embeddings, other, {})
    with pytest.raises(ModelLoadError, match="another ImageNet class list"):
        ImageNetTagger(str(path))
    with pytest.raises(InputError, match="native:"):
        create_tagger("imagenet-tags-v1")
