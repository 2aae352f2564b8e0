"""Comparing two API answers."""


def same_answer(a: dict, b: dict) -> bool:
    """Equal answers: everything identical except scores, which may differ by float rounding (1e-4)."""
    def strip(body):
        return {**body, "objects": [{**o, "score": None} for o in body.get("objects", [])]}

    scores_a = [o["score"] for o in a.get("objects", [])]
    scores_b = [o["score"] for o in b.get("objects", [])]
    return strip(a) == strip(b) and len(scores_a) == len(scores_b) and all(
        abs(x - y) <= 1e-4 * max(abs(x), abs(y), 1e-6) + 1e-6 for x, y in zip(scores_a, scores_b)
    )
