"""bench/tracking.py's metric computation on known cases: perfect tracks, a swap, fragments, the simulated detector."""

from __future__ import annotations

import pytest

pytest.importorskip("motmetrics", reason="motmetrics is in the test extra: pip install -e .[test]")

from bench.tracking import (  # noqa: E402
    MOT,
    Edgelabel,
    Noise,
    evaluate,
    fragment_share,
    load_mot,
    perturb,
    run_tracker,
)


def box(x: float, y: float = 0.0) -> tuple[float, float, float, float]:
    return (x, y, x + 40.0, y + 100.0)


def walking(frames: int = 20) -> dict[int, list[tuple[int, tuple[float, float, float, float]]]]:
    """Two people 200 px apart walking right, 5 px a frame."""
    return {f: [(1, box(5 * f)), (2, box(200 + 5 * f))] for f in range(1, frames + 1)}


def test_perfect_tracks_score_idf1_one_and_no_switches() -> None:
    gt = walking()
    hyp = {f: [(tid + 100, b) for tid, b in rows] for f, rows in gt.items()}  # other ids, same identities
    m = evaluate(gt, hyp)
    assert m["idf1"] == pytest.approx(1.0) and m["mota"] == pytest.approx(1.0)
    assert m["switches"] == 0 and m["fragmentations"] == 0 and m["fp"] == 0 and m["misses"] == 0


def test_a_swap_halfway_is_two_switches_and_halves_idf1() -> None:
    gt = walking()
    hyp = {f: [((tid if f <= 10 else 3 - tid), b) for tid, b in rows] for f, rows in gt.items()}
    m = evaluate(gt, hyp)
    assert m["switches"] == 2 and m["idf1"] == pytest.approx(0.5) and m["mota"] == pytest.approx(1 - 2 / 40)


def test_missed_and_false_boxes_count() -> None:
    gt = walking(10)
    hyp = {f: ([(1, box(5 * f))] if f != 5 else []) + ([(9, box(900))] if f == 3 else []) for f in gt}
    m = evaluate(gt, hyp)  # person 2 never found, person 1 missed once, one false box
    assert m["misses"] == 11 and m["fp"] == 1 and m["fragmentations"] == 1


def test_fragment_share_counts_a_new_id_that_starts_where_a_track_ended() -> None:
    hyp = {f: [(1, box(5 * f))] for f in range(1, 11)}
    hyp.update({f: [(2, box(5 * f))] for f in range(12, 20)})  # the same person, new id, 2 frames later
    hyp.update({f: [(3, box(600))] for f in range(30, 40)})  # someone else, later
    assert fragment_share(hyp) == (3, 1)
    far = {f: rows for f, rows in hyp.items() if f < 12}
    far.update({f: [(2, box(5 * f))] for f in range(16, 20)})  # 6 frames later: not a fragment
    assert fragment_share(far) == (2, 0)


def test_the_simulated_detector_is_seeded_and_noise_free_gives_the_truth() -> None:
    seq = load_mot(MOT, max_frames=60)
    assert seq.fps == 30 and seq.width == 1920 and all(seq.gt[f] for f in seq.gt)
    assert min(seq.visibility.values()) >= 0.2
    exact = Noise("none", drop=0, drop_hidden=0, jitter=0, size_jitter=0, fp_per_frame=0, score_noise=0)
    dets = perturb(seq, exact)
    assert all([b for b, _ in dets[f]] == [b for _, b in seq.gt[f]] for f in seq.gt)
    noisy = Noise("n", drop=0.1, drop_hidden=0.5, jitter=0.05, size_jitter=0.05, fp_per_frame=1, score_noise=0.1)
    assert perturb(seq, noisy, seed=3) == perturb(seq, noisy, seed=3) != perturb(seq, noisy, seed=4)
    # the tracker on perfect detections: every identity kept (the first frame of a track has no id yet)
    m = evaluate(seq.gt, run_tracker(Edgelabel, dets, seq.fps))
    assert m["switches"] == 0 and m["idf1"] > 0.97 and m["fp"] == 0


def test_the_tracking_section_is_replaced_not_appended_twice(tmp_path) -> None:  # noqa: ANN001
    from bench.tracking import write_section

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n| a | b |\n\n## How to read this\n\n- note\n")
    write_section(md, "| first |", "python bench/tracking.py")
    write_section(md, "| second |", "python bench/tracking.py")
    text = md.read_text()
    assert text.count("## Tracking") == 1 and "| second |" in text and "| first |" not in text
    assert text.index("## How to read this") < text.index("## Tracking") and "- note" in text
