import pytest

from segmentation.model.tokens import box_normalized, box_to_pixels, is_valid_box, parse_objects


def locs(*bins):
    return "".join(f"<loc{b:04d}>" for b in bins)


def segs(*codes):
    return "".join(f"<seg{c:03d}>" for c in codes)


CODES = tuple(range(0, 128, 8))  # 16 codes
FULL = segs(*CODES)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # (label, locs, codes) per object
        (locs(10, 20, 30, 40) + FULL + " cat", [("cat", (10, 20, 30, 40), CODES)]),
        (locs(10, 20, 30, 40) + " cat", [("cat", (10, 20, 30, 40), None)]),  # detect output
        (
            locs(1, 2, 3, 4) + FULL + " cat ; " + locs(5, 6, 7, 8) + FULL + " dog",
            [("cat", (1, 2, 3, 4), CODES), ("dog", (5, 6, 7, 8), CODES)],
        ),
        ("some preamble " + locs(0, 0, 1023, 1023) + " cat", [("cat", (0, 0, 1023, 1023), None)]),
        (locs(10, 20, 30, 40) + FULL, [("", (10, 20, 30, 40), CODES)]),  # missing label
        (locs(10, 20, 30, 40) + FULL + " the man on the left",
         [("the man on the left", (10, 20, 30, 40), CODES)]),
        (locs(10, 20, 30, 40) + segs(*CODES[:7]), [("", (10, 20, 30, 40), None)]),  # truncated codes
        (locs(10, 20, 30, 40) + segs(*CODES, 5) + " cat", [("cat", (10, 20, 30, 40), None)]),  # 17 codes
        (locs(30, 20, 10, 40) + " cat", [("cat", (30, 20, 10, 40), None)]),  # degenerate box kept raw
        (locs(10, 20, 30) + " cat", []),  # three locs: no object
        (locs(10, 20, 30, 40) + FULL + " cat ;", [("cat", (10, 20, 30, 40), CODES)]),  # trailing separator
        (locs(10, 20, 30, 40) + FULL + " cat;" + locs(1, 1, 2, 2) + " dog",
         [("cat", (10, 20, 30, 40), CODES), ("dog", (1, 1, 2, 2), None)]),
        ("", []),
        ("no objects here", []),
        ("<loc12><seg9999> ;;; <<>> <loc99999>", []),
        ("\x00\ufffd garbage <seg001>", []),
    ],
)
def test_parse_objects(text, expected):
    got = [(o.label, o.locs, o.codes) for o in parse_objects(text)]
    assert got == expected


def test_parse_objects_spans_cover_each_object():
    text = "x " + locs(1, 2, 3, 4) + " cat ; " + locs(5, 6, 7, 8) + " dog"
    first, second = parse_objects(text)
    assert text[first.span[0]:first.span[1]].startswith("<loc0001>")
    assert "cat" in text[slice(*first.span)] and "dog" not in text[slice(*first.span)]
    assert text[slice(*second.span)].endswith("dog")


def test_parse_objects_never_raises_on_non_text():
    assert parse_objects(None) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bins", "width", "height", "expected"),
    [
        ((0, 0, 1023, 1023), 640, 480, (0, 0, 640, 480)),
        ((0, 0, 1023, 1023), 1, 1, (0, 0, 1, 1)),
        # int(512 / 1023 * 640) = int(320.31) = 320; a /1024 rule would give 320 too, so also:
        ((512, 512, 1023, 1023), 640, 480, (320, 240, 640, 480)),
        # 1000/1023*1000 = 977.5 -> 977 (with /1024 it would be 976)
        ((0, 0, 1000, 1000), 1000, 1000, (0, 0, 977, 977)),
        # y1, x1, y2, x2 order: rows come first in the tokens, x first in the box
        ((100, 200, 300, 400), 1023, 2046, (200, 200, 400, 600)),
        ((10, 10, 11, 11), 100, 100, (0, 0, 1, 1)),
        ((10, 10, 12, 12), 50, 50, (0, 0, 0, 0)),  # collapses after int()
    ],
)
def test_box_to_pixels(bins, width, height, expected):
    assert box_to_pixels(bins, width, height) == expected


def test_box_normalized_is_bin_over_1023():
    assert box_normalized((1023, 0, 0, 511)) == (0.0, 1.0, 511 / 1023, 0.0)


@pytest.mark.parametrize(
    ("box", "valid"),
    [((0, 0, 1, 1), True), ((0, 0, 0, 5), False), ((3, 3, 2, 9), False), ((0, 5, 9, 5), False)],
)
def test_is_valid_box(box, valid):
    assert is_valid_box(box) is valid
