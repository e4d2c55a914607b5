"""Annotation readers on small hand-written files in every layout, good and bad, and splits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.labels import (
    AUS,
    EXPRESSION_SETS,
    EXPRESSIONS,
    AnnotationError,
    Labels,
    concat,
    detect_format,
    load_annotations,
    read_csv,
    read_mtl_file,
    read_task_file,
    restrict_expressions,
)
from tests.splits import folds, read_video_list, split_videos

VA_HEAD = "valence,arousal"
EXPR_HEAD = ",".join(EXPRESSIONS)
AU_HEAD = ",".join(AUS)


def write(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def au_row(*ones: int, fill: int = 0) -> str:
    return ",".join("1" if j in ones else str(fill) for j in range(12))


@pytest.fixture()
def tasks_root(tmp_path: Path) -> Path:
    """Per-task layout: video a has all tasks with lengths 4/3/4, the two-person video b has a
    left and a right file for VA only, video c is in the validation split."""
    root = tmp_path / "ann"
    va, ex, au = (root / d / "Train_Set" for d in
                  ("VA_Estimation_Challenge", "EXPR_Recognition_Challenge", "AU_Detection_Challenge"))
    write(va / "a.txt", VA_HEAD, "0.5,-0.25", "-5,-5", "1,-1", "0,0")
    write(ex / "a.txt", EXPR_HEAD, "0", "-1", "7")
    write(au / "a.txt", AU_HEAD, au_row(0), au_row(fill=-1), au_row(11), au_row())
    write(va / "b_left.txt", VA_HEAD, "0.1,0.2")
    write(va / "b_right.txt", VA_HEAD, "-0.1,-0.2", "0.3,0.3")
    write(root / "VA_Estimation_Challenge" / "Validation_Set" / "c.txt", VA_HEAD, "0.9,0.9")
    return root


def test_per_task_layout(tasks_root: Path) -> None:
    labels = load_annotations(tasks_root, "train")
    assert sorted(labels) == ["a", "b_left", "b_right"]
    a = labels["a"]
    assert len(a) == 4 and a.va.dtype == np.float32 and a.expr.dtype == np.int64 and a.au.dtype == np.int64
    np.testing.assert_allclose(a.va[0], [0.5, -0.25])
    np.testing.assert_array_equal(a.valid("va"), [True, False, True, True])
    # the expression file is one row shorter: its last frame is invalid
    np.testing.assert_array_equal(a.expr, [0, -1, 7, -1])
    np.testing.assert_array_equal(a.valid("au"), [True, False, True, True])
    assert a.au[2, 11] == 1 and a.au[0, 0] == 1 and a.au[3].sum() == 0
    # a task without a file is all invalid
    b = labels["b_right"]
    assert len(b) == 2 and not b.valid("expr").any() and not b.valid("au").any()
    assert b.counts() == {"va": 2, "expr": 0, "au": 0}
    assert list(load_annotations(tasks_root, "val")) == ["c"]
    assert detect_format(tasks_root) == "abaw_tasks"
    assert split_videos(tasks_root, "train") == ["a", "b_left", "b_right"]


def test_abaw3_expression_folder_name(tmp_path: Path) -> None:
    write(tmp_path / "EXPR_Classification_Challenge" / "Validation_Set" / "v.txt", EXPR_HEAD, "3", "4")
    np.testing.assert_array_equal(load_annotations(tmp_path, "val")["v"].expr, [3, 4])


@pytest.mark.parametrize(
    ("task", "lines", "message"),
    [
        ("va", ["valence;arousal", "0,0"], ":1: header"),
        ("va", ["arousal,valence", "0,0"], ":1: header"),
        ("expr", [VA_HEAD, "0,0"], ":1: header"),
        ("va", [VA_HEAD, "0,0", "0.1"], ":3: 1 fields, expected 2"),
        ("va", [VA_HEAD, "0,0", "0.1,0.2,0.3"], ":3: 3 fields"),
        ("va", [VA_HEAD, "0,1.5"], ":2: arousal = 1.5"),
        ("va", [VA_HEAD, "-4,0"], ":2: valence = -4"),
        ("va", [VA_HEAD, "abc,0"], ":2: 'abc' is not a number"),
        ("expr", [EXPR_HEAD, "1", "8"], ":3:"),
        ("expr", [EXPR_HEAD, "2.5"], ":2:"),
        ("au", [AU_HEAD, au_row(), au_row(fill=2)], ":3: AU1 = 2"),
        ("au", [AU_HEAD, ",".join(["0"] * 11)], ":2: 11 fields, expected 12"),
        ("au", [AU_HEAD, au_row(), "", au_row()], ":3: 1 fields"),
    ],
)
def test_bad_task_file(tmp_path: Path, task: str, lines: list[str], message: str) -> None:
    path = write(tmp_path / "v.txt", *lines)
    with pytest.raises(AnnotationError, match=message) as err:
        read_task_file(path, task)
    assert str(path) in str(err.value)


def test_task_file_edge_cases(tmp_path: Path) -> None:
    # header only: a video with no frames; trailing blank lines and a BOM are tolerated
    assert read_task_file(write(tmp_path / "e.txt", EXPR_HEAD), "expr").shape == (0,)
    path = tmp_path / "bom.txt"
    path.write_text("\ufeff" + VA_HEAD + "\r\n0.1,0.2\r\n\r\n", encoding="utf-8")
    np.testing.assert_allclose(read_task_file(path, "va"), [[0.1, 0.2]], rtol=1e-6)
    with pytest.raises(AnnotationError, match="not found"):
        read_task_file(tmp_path / "missing.txt", "va")
    with pytest.raises(AnnotationError, match="empty file"):
        read_task_file(write(tmp_path / "blank.txt", ""), "va")


MTL_HEAD = "image,valence,arousal,expression,aus"


def mtl_row(image: str, v: str = "0.1", a: str = "0.2", e: str = "3", au: str = au_row(1)) -> str:
    return f"{image},{v},{a},{e},{au}"


def test_abaw3_mtl_layout(tmp_path: Path) -> None:
    write(tmp_path / "MTL_Challenge" / "train_set.txt", MTL_HEAD,
          mtl_row("vid1/00001.jpg"), mtl_row("vid1/00004.jpg", "-5", "-5", "-1", au_row(fill=-1)),
          mtl_row("vid2_left/00002.jpg", "0.5", "-0.5", "7", au_row(0, 11)))
    write(tmp_path / "MTL_Challenge" / "validation_set.txt", MTL_HEAD, mtl_row("vid3/00001.jpg"))
    assert detect_format(tmp_path) == "abaw3_mtl"
    labels = load_annotations(tmp_path, "train")
    assert sorted(labels) == ["vid1", "vid2_left"]
    v1 = labels["vid1"]
    # 00004.jpg is frame 3; frames 1 and 2 are not listed and so invalid
    assert len(v1) == 4
    np.testing.assert_array_equal(v1.valid("va"), [True, False, False, False])
    np.testing.assert_array_equal(v1.expr, [3, -1, -1, -1])
    assert v1.au[0].tolist() == [int(j == 1) for j in range(12)]
    v2 = labels["vid2_left"]
    assert len(v2) == 2 and not v2.valid("va")[0] and v2.expr[1] == 7 and v2.au[1, [0, 11]].tolist() == [1, 1]
    assert list(load_annotations(tmp_path, "val")) == ["vid3"]


def test_abaw4_mtl_layout(tmp_path: Path) -> None:
    # the AU names in place of "aus" are accepted too
    write(tmp_path / "training_set_annotations_22.txt", "image,valence,arousal,expression," + AU_HEAD,
          mtl_row("x/00002.jpg", e="5"), mtl_row("x/00001.jpg", e="4"))
    write(tmp_path / "validation_set_annotations_22.txt", MTL_HEAD, mtl_row("y/00001.jpg"))
    assert detect_format(tmp_path) == "abaw4_mtl"
    np.testing.assert_array_equal(load_annotations(tmp_path, "train", "abaw4_mtl")["x"].expr, [4, 5])
    assert list(load_annotations(tmp_path, "val")) == ["y"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["image,valence,arousal,expression", mtl_row("v/00001.jpg")], ":1: header"),
        ([MTL_HEAD, mtl_row("v/00001.jpg"), "v/00002.jpg,0.1,0.2,3"], ":3: 4 fields, expected 16"),
        ([MTL_HEAD, mtl_row("v/00001.jpg", au=",".join(["0"] * 11))], ":2: 15 fields"),
        ([MTL_HEAD, mtl_row("v/00001.jpg", v="1.2")], ":2: valence = 1.2"),
        ([MTL_HEAD, mtl_row("v/00001.jpg"), mtl_row("v/00002.jpg", e="9")], ":3: expression = 9"),
        ([MTL_HEAD, mtl_row("v/00001.jpg", au=au_row(fill=3))], ":2: AU1 = 3"),
        ([MTL_HEAD, mtl_row("00001.jpg")], ":2: image '00001.jpg'"),
        ([MTL_HEAD, mtl_row("v/00001.jpg"), mtl_row("w/00001.jpg"), mtl_row("v/00001.jpg")],
         ":4: frame 0 of v"),
    ],
)
def test_bad_mtl_file(tmp_path: Path, lines: list[str], message: str) -> None:
    path = write(tmp_path / "train_set.txt", *lines)
    with pytest.raises(AnnotationError, match=message) as err:
        read_mtl_file(path)
    assert str(path) in str(err.value)


def test_csv_layout(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "video,frame,valence,arousal,expression,AU12",
          "p,0,0.5,0.5,1,1", "p,2,,,6,", "q,1,0.1,,,0")
    assert detect_format(tmp_path) == "csv"
    labels = load_annotations(tmp_path, "train")
    p, q = labels["p"], labels["q"]
    assert len(p) == 3 and len(q) == 2
    np.testing.assert_array_equal(p.expr, [1, -1, 6])
    np.testing.assert_array_equal(p.valid("va"), [True, False, False])
    # only AU12 is given: its column is read, the other AUs stay invalid
    assert p.au[0, AUS.index("AU12")] == 1 and (np.delete(p.au[0], AUS.index("AU12")) == -1).all()
    assert p.au[2, AUS.index("AU12")] == -1
    # a frame needs both valence and arousal
    assert not q.valid("va").any()
    np.testing.assert_array_equal(load_annotations(tmp_path / "train.csv", "val")["p"].expr, [1, -1, 6])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["frame,video,valence", "0,p,0.1"], ":1: header"),
        (["video,frame,valence,happiness", "p,0,0.1,1"], ":1: header"),
        (["video,frame,valence", "p,0,0.1,0.2"], ":2: 4 fields, expected 3"),
        (["video,frame,expression", "p,0,1", "p,1,-2"], ":3: expression = -2"),
        (["video,frame,valence", "p,-1,0.1"], ":2: frame -1"),
        (["video,frame,valence", "p,0,0.1", "p,0,0.2"], ":3: frame 0 of p is listed twice"),
    ],
)
def test_bad_csv(tmp_path: Path, lines: list[str], message: str) -> None:
    path = write(tmp_path / "val.csv", *lines)
    with pytest.raises(AnnotationError, match=message):
        read_csv(path)


def test_unknown_layout_and_split(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="no known annotation layout"):
        detect_format(tmp_path)
    with pytest.raises(FileNotFoundError):
        detect_format(tmp_path / "nope")
    with pytest.raises(ValueError, match="split 'test'"):
        load_annotations(tmp_path, "test")
    with pytest.raises(ValueError, match="annotation format"):
        load_annotations(tmp_path, "train", "abaw9")


def test_fit_cuts_or_pads_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    lab = Labels(np.zeros((5, 2)), np.arange(5) % 8, np.ones((5, 12)))
    with caplog.at_level(logging.WARNING):
        short = lab.fit(3, "vidA")
        long = lab.fit(7, "vidB")
        same = lab.fit(5, "vidC")
    assert same is lab
    assert len(short) == 3 and short.expr.tolist() == [0, 1, 2]
    assert len(long) == 7 and long.valid("expr").tolist() == [True] * 5 + [False] * 2
    assert not long.valid("va")[5:].any() and not long.valid("au")[5:].any()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and "vidA" in warned[0] and "vidB" in warned[1]


def test_labels_shapes_and_concat() -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        Labels(np.zeros((3, 2)), np.zeros(2), np.zeros((3, 12)))
    both = concat([Labels.empty(2), Labels(np.zeros((1, 2)), [4], np.zeros((1, 12)))])
    assert len(both) == 3 and both.expr.tolist() == [-1, -1, 4]
    with pytest.raises(ValueError, match="unknown task"):
        both.valid("pose")


def test_folds_by_recording() -> None:
    videos = [f"v{i}" for i in range(9)] + ["duo_left", "duo_right"]
    splits = folds(videos, 3, seed=1)
    assert len(splits) == 3
    vals = [set(val) for _, val in splits]
    # every video is validated exactly once, and never trained on in its own fold
    assert sorted(v for val in vals for v in val) == sorted(videos)
    for train, val in splits:
        assert set(train).isdisjoint(val) and set(train) | set(val) == set(videos)
        assert ("duo_left" in val) == ("duo_right" in val)
    assert max(map(len, vals)) - min(map(len, vals)) <= 2
    assert folds(videos, 3, seed=1) == splits
    assert any(folds(videos, 3, seed=s) != splits for s in range(2, 6))
    with pytest.raises(ValueError, match="cannot make 11 folds from 10 recordings"):
        folds(videos, 11)


def test_video_lists(tmp_path: Path) -> None:
    path = write(tmp_path / "val.txt", "# held out", "a", "", "b  # noisy", "c")
    assert read_video_list(path) == ["a", "b", "c"]
    assert read_video_list(["x", " y "]) == ["x", "y"]
    with pytest.raises(ValueError, match="more than once"):
        read_video_list(["x", "x"])


def test_basic7_restriction_drops_other_and_keeps_indices(tmp_path: Path) -> None:
    assert EXPRESSION_SETS["basic7"] == EXPRESSIONS[:7] and EXPRESSION_SETS["abaw8"] == EXPRESSIONS
    lab = Labels(np.zeros((6, 2)), [0, 7, 6, -1, 7, 3], np.ones((6, 12)))
    basic = restrict_expressions(lab, "basic7")
    assert basic.expr.tolist() == [0, -1, 6, -1, -1, 3]
    assert lab.expr.tolist() == [0, 7, 6, -1, 7, 3]  # the original is left alone
    np.testing.assert_array_equal(basic.au, lab.au)
    assert basic.counts() == {"va": 6, "expr": 3, "au": 6}
    assert restrict_expressions(lab, "abaw8").expr.tolist() == lab.expr.tolist()
    with pytest.raises(ValueError, match="choose one of abaw8, basic7"):
        restrict_expressions(lab, "basic6")
    # a per-task file may carry the seven names; its classes are then 0..6
    head7 = ",".join(EXPRESSIONS[:7])
    assert read_task_file(write(tmp_path / "b.txt", head7, "6", "-1", "0"), "expr").tolist() == [6, -1, 0]
    with pytest.raises(AnnotationError, match=r"b7.txt:3: .*0..6"):
        read_task_file(write(tmp_path / "b7.txt", head7, "1", "7"), "expr")
