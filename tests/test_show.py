"""gopt eval --show-dir: panels with wrong pixels marked, the N worst images, the confusion files."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from gopt_adapter.data import get_dataset
from gopt_adapter.train.engine import evaluate
from gopt_adapter.cli.show import ShowWriter, write_confusion_csv
from gopt_adapter.data.transforms import build_transforms
from gopt_adapter.cli.visualize import (
    VOID_COLOUR,
    WRONG_COLOUR,
    class_palette,
    colorize_truth,
    display_zoom,
    mark_wrong,
)

SIZE = 24
NUM_CLASSES = 8  # the synthetic depth world's


def synthetic_val(length=4):
    return get_dataset("synthetic", split="val", mode="depth", size=SIZE, length=length, seed=0,
                       transform=build_transforms("synthetic", False))


def independent_miou(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean IoU over the classes in the ground truth or the prediction, 255 ignored (numpy)."""
    keep = label != 255
    ious = []
    for cls in range(num_classes):
        truth, predicted = (label == cls) & keep, (prediction == cls) & keep
        union = (truth | predicted).sum()
        if union:
            ious.append((truth & predicted).sum() / union)
    return float(np.mean(ious))


def test_wrong_pixels_are_hatched_and_ignored_truth_is_void():
    palette = class_palette(3)
    truth = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 255, 255],
                      [2, 2, 255, 255]])
    prediction = np.array([[0, 1, 1, 1],
                           [1, 0, 1, 2],
                           [2, 0, 0, 1],
                           [0, 0, 2, 2]])
    wrong = {(0, 1), (1, 0), (1, 3), (2, 1), (3, 0), (3, 1)}  # by hand; (2, 2) (2, 3) (3, 2) (3, 3) are ignored
    pane = mark_wrong(prediction, truth, palette)
    white = (pane == WRONG_COLOUR).all(-1)
    marked = {tuple(int(v) for v in p) for p in np.argwhere(white)}
    # the stripes: row + column 0 or 1 modulo 4; wrong (2, 1) and (3, 0) lie between them
    assert marked == {(r, c) for r, c in wrong if (r + c) % 4 < 2} == {(0, 1), (1, 0), (1, 3), (3, 1)}
    assert (pane[~white] == palette[prediction][~white]).all()  # every other pixel in its class colour
    truth_pane = colorize_truth(truth, palette)
    assert (truth_pane[truth == 255] == VOID_COLOUR).all() and (truth_pane[truth != 255] == palette[truth[truth != 255]]).all()


def corrupted(label: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``label`` with the first ``fraction`` of its pixels (a random order) set to the next class."""
    flat = label.copy().ravel()
    order = np.random.default_rng(seed).permutation(flat.size)[: int(fraction * flat.size)]
    flat[order] = (flat[order] + 1) % NUM_CLASSES
    return flat.reshape(label.shape)


def test_panels_one_per_image_with_four_panes(tmp_path):
    data = synthetic_val(3)
    names = list(data.class_names)
    writer = ShowWriter(tmp_path / "show", data, names)
    for index in range(len(data)):
        label = data[index]["label"]
        writer(index, torch.from_numpy(corrupted(label.numpy(), 0.3, index)), label)
    panels = writer.finish(np.eye(NUM_CLASSES, dtype=int).tolist())
    assert sorted(p.name for p in panels) == sorted(f"{data.load(i)['meta']['stem']}.png" for i in range(3))
    assert sorted(p.name for p in (tmp_path / "show").iterdir()) == sorted(
        [p.name for p in panels] + ["confusion.csv", "confusion.png"])
    pane = SIZE * display_zoom(SIZE)
    for path in panels:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.width > 4 * pane and pane < image.height < 2 * pane
            assert (np.array(image) == WRONG_COLOUR).all(-1).any()  # the hatching shows in the panel


def test_show_worst_keeps_the_images_of_lowest_miou(tmp_path):
    data = synthetic_val(6)
    labels = [data[index]["label"].numpy() for index in range(6)]
    fractions = [0.1, 0.6, 0.0, 0.45, 0.8, 0.2]
    predictions = [corrupted(label, fraction, index) for index, (label, fraction) in enumerate(zip(labels, fractions))]
    mious = [independent_miou(p, label, NUM_CLASSES) for p, label in zip(predictions, labels)]
    worst = sorted(range(6), key=lambda index: mious[index])[:2]
    writer = ShowWriter(tmp_path, data, data.class_names, worst=2)
    for index in range(6):
        writer(index, torch.from_numpy(predictions[index]), torch.from_numpy(labels[index]))
    assert not list(tmp_path.glob("synthetic_*.png"))  # nothing is drawn before the end
    panels = writer.finish(np.eye(NUM_CLASSES, dtype=int).tolist())
    assert [p.name for p in panels] == [f"{data.load(i)['meta']['stem']}.png" for i in worst]  # worst first
    assert sorted(tmp_path.glob("synthetic_*.png")) == sorted(panels)
    with pytest.raises(ValueError):
        ShowWriter(tmp_path, data, data.class_names, worst=0)


def read_csv(path):
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


def test_confusion_csv_is_row_normalised_with_pixel_counts_and_empty_rows_for_absent_classes(tmp_path):
    confusion = [[3, 1, 0], [0, 0, 0], [2, 2, 4]]  # class 1 has no pixels
    write_confusion_csv(tmp_path / "confusion.csv", confusion, ["a", "b, with a comma", "c"])
    header, rows = read_csv(tmp_path / "confusion.csv")
    assert header == ["ground truth \\ prediction", "pixels", "a", "b, with a comma", "c"]
    assert rows[0] == ["a", "4", "0.750000", "0.250000", "0.000000"]
    assert rows[1] == ["b, with a comma", "0", "", "", ""]
    assert [float(v) for v in rows[2][2:]] == [0.25, 0.25, 0.5]


class ThresholdModel(torch.nn.Module):
    """Class 2 where the normalised red channel is positive, else class 5 (one-hot logits)."""

    def forward(self, rgb, aux):
        classes = torch.where(rgb[:, 0] > 0, 2, 5)  # [B, H, W]
        return torch.nn.functional.one_hot(classes, NUM_CLASSES).permute(0, 3, 1, 2).float()


def test_confusion_files_from_an_evaluation_match_a_hand_count(tmp_path):
    data = synthetic_val(3)
    writer = ShowWriter(tmp_path, data, data.class_names, worst=1)
    metrics = evaluate(ThresholdModel(), data, NUM_CLASSES, on_prediction=writer)
    writer.finish(metrics["confusion"])
    expected = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for index in range(len(data)):
        sample = data[index]
        predicted = np.where(sample["rgb"][0].numpy() > 0, 2, 5)
        np.add.at(expected, (sample["label"].numpy().ravel(), predicted.ravel()), 1)
    header, rows = read_csv(tmp_path / "confusion.csv")
    assert header[2:] == list(data.class_names) and [row[0] for row in rows] == list(data.class_names)
    assert [int(row[1]) for row in rows] == expected.sum(1).tolist()
    for row, counts in zip(rows, expected):
        if counts.sum():
            shares = np.array([float(v) for v in row[2:]])
            assert shares.sum() == pytest.approx(1, abs=1e-5)
            np.testing.assert_allclose(shares, counts / counts.sum(), atol=1e-6)
        else:
            assert row[2:] == [""] * NUM_CLASSES
    with Image.open(tmp_path / "confusion.png") as image:
        assert image.mode == "RGB" and image.width > NUM_CLASSES * 12 and image.height > NUM_CLASSES * 12
