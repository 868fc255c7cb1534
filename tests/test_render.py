"""Drawn detections: captions placed where they overlap no other caption, inside the image."""

import torch

from tools.plot import draw_detections, place_captions


def rects(places, sizes):
    return [(x, y, x + w, y + h) for (x, y), (w, h) in zip(places, sizes, strict=True)]


def within(rect, width: int, height: int) -> bool:
    x0, y0, x1, y1 = rect
    return min(x0, y0) >= 0 and x1 <= width and y1 <= height


def disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_captions_of_boxes_on_one_object_do_not_overlap():
    boxes = [[40, 60, 200, 180], [42, 61, 199, 182], [41, 59, 201, 181]]
    sizes = [(60, 12)] * 3
    places = place_captions(boxes, sizes, (256, 256))
    drawn = rects(places, sizes)
    assert all(disjoint(a, b) for i, a in enumerate(drawn) for b in drawn[i + 1 :])
    assert all(within(rect, 256, 256) for rect in drawn)
    assert places[0] == (40, 48)  # the first caption just above its box


def test_a_caption_stays_in_the_image_at_its_edges():
    sizes = [(50, 12), (50, 12)]
    places = place_captions([[0, 0, 30, 30], [230, 240, 256, 256]], sizes, (256, 256))
    assert all(within(rect, 256, 256) for rect in rects(places, sizes))


def test_a_crowded_small_image_still_places_every_caption():
    boxes = [[4 * i, 4 * i, 4 * i + 20, 4 * i + 20] for i in range(8)]
    sizes = [(30, 10)] * 8
    places = place_captions(boxes, sizes, (64, 64))
    assert len(places) == 8
    drawn = rects(places, sizes)
    assert all(within(rect, 64, 64) for rect in drawn)
    assert sum(disjoint(a, b) for i, a in enumerate(drawn) for b in drawn[i + 1 :]) >= 20


def test_overlapping_detections_get_two_readable_captions():
    image = torch.full((3, 128, 128), 200, dtype=torch.uint8)
    boxes = torch.tensor([[30.0, 40.0, 100.0, 110.0], [31.0, 41.0, 101.0, 109.0]])
    drawn = draw_detections(image, boxes, torch.tensor([1, 2]), torch.tensor([0.99, 0.98]), {})
    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape
    # Each caption patch is filled with its box's colour: two distinct colours above and below
    # the first box's top edge, where one torchvision caption would overwrite the other.
    above, inside = drawn[:, 30:38, 32:40], drawn[:, 44:50, 32:40]
    assert not torch.equal(above, image[:, 30:38, 32:40])
    assert not torch.equal(inside, image[:, 44:50, 32:40])
    assert not torch.equal(above.float().mean((1, 2)), inside.float().mean((1, 2)))
