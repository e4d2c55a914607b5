"""ABAW submissions: one row per listed image in the list's order, frames without a prediction filled
from the nearest predicted frame or the training prior, never a sentinel; and the validator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import submit
from pipeline.config import InputError, load_config
from pipeline.labels import AUS, EXPRESSIONS, Labels
from pipeline.writers import read_predictions
from tests.synthetic import TASK_FILES, learnable_set, write_annotations

ROOT = Path(__file__).resolve().parents[1]
VA_HEADER = "image_location,valence,arousal"
EXPR_HEADER = "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
AU_HEADER = "image_location,AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    """Predictions as `make predict` writes them for two videos, and training annotations.

    ``clip``: frames 0-9 predicted but 4 and 5 (no face there): VA (k/10, -k/10), expression k mod 8,
    AU1 probability 0.9 on even frames and 0.1 on odd ones, the other AUs 0.2. ``noface``: no face
    anywhere, 3 rows of sentinels. The training split: VA (0.2, -0.4) on every frame, expression
    3 on 3 frames of 4 and 5 on the fourth, AU1 and AU4 always present, the other AUs never.
    """
    preds = tmp_path / "preds"
    va = [f"{k / 10:.6f},{-k / 10:.6f}" for k in range(10)]
    expr = [str(k % 8) for k in range(10)]
    au = [",".join(["1" if k % 2 == 0 else "0"] + ["0"] * 11) for k in range(10)]
    for k in (4, 5):
        va[k], expr[k], au[k] = "-5,-5", "-1", ",".join(["-1"] * 12)
    rows = {"va": va, "expr": expr, "au": au}
    for task, (folder, header) in TASK_FILES.items():
        (preds / folder).mkdir(parents=True)
        (preds / folder / "clip.txt").write_text("\n".join([header, *rows[task]]) + "\n")
        empty = {"va": "-5,-5", "expr": "-1", "au": ",".join(["-1"] * 12)}[task]
        (preds / folder / "noface.txt").write_text("\n".join([header, *[empty] * 3]) + "\n")
    annotations = tmp_path / "annotations"
    au_train = np.zeros((4, len(AUS)), np.int64)
    au_train[:, [0, 2]] = 1
    write_annotations(annotations, "train", {"train_a": Labels(np.tile([[0.2, -0.4]], (4, 1)), [3, 3, 5, 3], au_train)})
    return {"preds": preds, "annotations": annotations, "root": tmp_path}


def write_list(path: Path, header: str, images: list[str], placeholder: str = "") -> Path:
    path.write_text("\n".join([header, *(f"{i}{placeholder}" for i in images)]) + "\n")
    return path


# shuffled, with frames the predictions lack (4, 5: no face; 10, 11: past the last predicted frame)
IMAGES = ["clip/00006.jpg", "clip/00001.jpg", "noface/00002.jpg", "clip/00011.jpg", "clip/00005.jpg",
          "clip/00012.jpg", "clip/00003.jpg", "noface/00001.jpg", "clip/00007.jpg"]
# the predicted frame each listed clip frame takes its values from: itself, else the nearest
SOURCE = {5: 6, 0: 0, 10: 9, 4: 3, 11: 9, 2: 2, 6: 6}


def run_submit(data: dict[str, Path], listing: Path, layout: str, out: Path) -> int:
    return submit.main(load_config("submit", overrides=[
        f"predictions={data['preds']}", f"list={listing}", f"layout={layout}", f"out={out}",
        f"data.annotations={data['annotations']}", "data.format=abaw_tasks"]))


@pytest.mark.parametrize(("task", "header"), [("va", VA_HEADER), ("expr", EXPR_HEADER), ("au", AU_HEADER)])
def test_each_challenge_file_holds_every_listed_frame_in_order_filled_never_a_sentinel(
        data: dict[str, Path], task: str, header: str) -> None:
    listing = write_list(data["root"] / f"sample_{task}.txt", header, IMAGES, placeholder=",")
    out = data["root"] / f"{task}.txt"
    assert run_submit(data, listing, "abaw5_tasks", out) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == header and [ln.split(",")[0] for ln in lines[1:]] == IMAGES
    assert submit.check(out, submit.read_listing(listing, "abaw5_tasks")) is None
    got = read_predictions(out)  # what make evaluate reads
    for line_no, image in enumerate(IMAGES, start=1):
        video, number = image.split("/")
        frame = int(number[:5]) - 1
        cells = lines[line_no].split(",")[1:]
        if video == "noface":  # the training prior
            want = {"va": ["0.200000", "-0.400000"], "expr": ["3"], "au": ["1", "0", "1"] + ["0"] * 9}[task]
        else:
            k = SOURCE[frame]
            want = {"va": [f"{k / 10:.6f}", f"{-k / 10:.6f}"], "expr": [str(k % 8)],
                    "au": ["1" if k % 2 == 0 else "0"] + ["0"] * 11}[task]
        assert cells == want, image
        dense = got[video][task][frame]
        assert (dense != -1).all() if task != "va" else np.isfinite(dense).all()


def test_the_multi_task_file_holds_the_listed_images_in_order(data: dict[str, Path]) -> None:
    listing = write_list(data["root"] / "mtl_test_set.txt", "image", IMAGES)
    out = data["root"] / "mtl.txt"
    assert run_submit(data, listing, "abaw_mtl", out) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "image,valence,arousal,expression,aus"
    assert lines[7] == "clip/00003.jpg,0.200000,-0.200000,2,1,0,0,0,0,0,0,0,0,0,0,0"
    assert lines[4] == "clip/00011.jpg,0.900000,-0.900000,1,0,0,0,0,0,0,0,0,0,0,0,0"  # past the end: frame 9's
    assert lines[3] == "noface/00002.jpg,0.200000,-0.400000,3,1,0,1,0,0,0,0,0,0,0,0,0"
    assert submit.check(out, submit.read_listing(listing, "abaw_mtl")) is None
    assert sorted(read_predictions(out)) == ["clip", "noface"]


def test_a_list_naming_a_video_the_predictions_lack_is_refused_and_nothing_is_written(data) -> None:
    listing = write_list(data["root"] / "sample_va.txt", VA_HEADER, [*IMAGES, "ghost/00001.jpg"], ",")
    out = data["root"] / "va.txt"
    with pytest.raises(InputError, match="ghost") as refused:
        run_submit(data, listing, "abaw5_tasks", out)
    assert "\n" not in str(refused.value) and not out.exists()
    for folder in ("VA_Estimation_Challenge",):  # predictions without VA: a VA file would be the prior alone
        for f in (data["preds"] / folder).iterdir():
            f.rename(data["root"] / f"{folder}_{f.name}")
    with pytest.raises(InputError, match="asks for va, which the predictions hold for no frame"):
        run_submit(data, write_list(data["root"] / "sample_va2.txt", VA_HEADER, IMAGES, ","), "abaw5_tasks", out)
    assert not out.exists()
    bad = write_list(data["root"] / "bad.txt", VA_HEADER, ["clip/frame1.jpg"])
    with pytest.raises(InputError, match=r"bad.txt:2: .*not an image name"):
        run_submit(data, bad, "abaw5_tasks", out)


def edited(lines: list[str], how: str) -> list[str]:
    lines = list(lines)
    if how == "header":
        lines[0] = "image,valence,arousal"
    elif how == "missing":
        del lines[3]
    elif how == "extra":
        lines.append("clip/00002.jpg,0.1,0.1")
    elif how == "order":
        lines[1], lines[2] = lines[2], lines[1]
    elif how == "sentinel":
        lines[2] = lines[2].split(",")[0] + ",-5,-5"
    elif how == "range":
        lines[2] = lines[2].split(",")[0] + ",1.5,0.2"
    return lines


@pytest.mark.parametrize(("how", "said"), [
    ("header", "header 'image,valence,arousal', not 'image_location,valence,arousal'"),
    ("missing", "no row for noface/00002.jpg"),
    ("extra", "extra row clip/00002.jpg"),
    ("order", "clip/00001.jpg out of the list's order (expected clip/00006.jpg)"),
    ("sentinel", "the sentinel -5"),
    ("range", "outside [-1, 1]"),
])
def test_the_validator_refuses_in_one_line(data: dict[str, Path], how: str, said: str) -> None:
    listing = write_list(data["root"] / "sample_va.txt", VA_HEADER, IMAGES, ",")
    good = data["root"] / "va.txt"
    assert run_submit(data, listing, "abaw5_tasks", good) == 0
    bad = data["root"] / f"va_{how}.txt"
    bad.write_text("\n".join(edited(good.read_text().splitlines(), how)) + "\n")
    problem = submit.check(bad, submit.read_listing(listing, "abaw5_tasks"))
    assert problem is not None and said in problem and "\n" not in problem
    if how == "order":  # the same from the command line, as a user checks a file made elsewhere
        done = subprocess.run([sys.executable, "-m", "pipeline.submit", "--check", str(bad), "--list", str(listing)],
                              cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 1 and said in done.stdout and len(done.stdout.strip().splitlines()) == 1
        assert submit.main(load_config("submit", overrides=[f"check={good}", f"list={listing}"])) == 0


def test_the_validator_refuses_sentinels_and_classes_outside_the_set(data: dict[str, Path]) -> None:
    listing = submit.read_listing(write_list(data["root"] / "sample_expr.txt", EXPR_HEADER, IMAGES[:2], ","),
                                  "abaw5_tasks")
    for value, said in (("-1", "sentinel -1"), ("8", f"not a class 0-{len(EXPRESSIONS) - 1}")):
        bad = data["root"] / "expr.txt"
        bad.write_text("\n".join([EXPR_HEADER, f"{IMAGES[0]},{value}", f"{IMAGES[1]},0"]) + "\n")
        assert said in submit.check(bad, listing)
    ok = data["root"] / "expr_ok.txt"
    ok.write_text("\n".join([EXPR_HEADER, f"{IMAGES[0]},7", f"{IMAGES[1]},0"]) + "\n")
    assert submit.check(ok, listing) is None


def test_a_runs_validation_predictions_give_its_scores_again_with_a_video_without_any_face(tmp_path: Path) -> None:
    import h5py

    from pipeline import evaluate, train
    from tests.test_gpu_path import FAST

    syn = learnable_set(tmp_path / "syn", frames=48, dim=8)
    with h5py.File(syn["cache"], "r+") as f:
        f["v5"]["present"][:] = False  # a validation video where no face was found: scored with the prior
    run = tmp_path / "run"
    assert train.main(load_config("train", overrides=[
        *FAST, f"runs_dir={syn['runs']}", "data.name=syn", f"data.annotations={syn['annotations']}",
        "data.format=abaw_tasks", f"out_dir={run}"])) == 0
    printed = json.loads((run / "scores.json").read_text())
    assert printed["filled_va"] > 0  # the prior was used for v5
    for task, (folder, _) in TASK_FILES.items():
        rows = (run / "predictions" / folder / "v5.txt").read_text().splitlines()[1:]
        assert rows and not any(cell in ("-5", "-1") for row in rows for cell in row.split(",")), task
    assert evaluate.main(load_config("evaluate", overrides=[
        f"predictions={run / 'predictions'}", f"annotations={syn['annotations']}", "format=abaw_tasks",
        f"output={tmp_path / 'scores.json'}"])) == 0
    again = json.loads((tmp_path / "scores.json").read_text())["scores"]
    for key in ("ccc_v", "ccc_a", "f1_expr", "f1_au", "p_mtl"):
        assert again[key] == pytest.approx(printed[key], abs=1e-5), key


def test_abaw3_per_video_files_hold_the_decoder_count_plus_one_rows(data: dict[str, Path]) -> None:
    listing = data["root"] / "Valence_Arousal_Estimation_Challenge_test_set_release.txt"
    listing.write_text("noface\nclip\n")
    out = data["root"] / "abaw3"
    assert run_submit(data, listing, "abaw3_tasks", out) == 0
    clip = (out / "VA_Estimation_Challenge" / "clip.txt").read_text().splitlines()
    # ten predicted frames are ten decoded ones; the organisers' files have one row more (README)
    assert clip[0] == "valence,arousal" and len(clip) == 1 + 11
    assert clip[1 + 4] == "0.300000,-0.300000" and clip[-1] == "0.900000,-0.900000"  # no face: frame 3's; the last
    assert (out / "VA_Estimation_Challenge" / "noface.txt").read_text().splitlines()[1:] == ["0.200000,-0.400000"] * 4
    parsed = submit.read_listing(listing, "abaw3_tasks")
    assert parsed.tasks == ("va",) and parsed.listed == ("noface", "clip")
    assert submit.check(out, parsed) is None
    counts = {"noface": 4, "clip": 11}
    assert submit.check(out, parsed, counts) is None
    (out / "VA_Estimation_Challenge" / "ghost.txt").write_text("valence,arousal\n0,0\n")
    assert "ghost is not in the list" in submit.check(out, parsed)
    (out / "VA_Estimation_Challenge" / "ghost.txt").unlink()
    (out / "VA_Estimation_Challenge" / "clip.txt").write_text("\n".join([*clip[:-1], "-5,-5"]) + "\n")
    assert "sentinel -5" in submit.check(out, parsed, counts)
    (out / "VA_Estimation_Challenge" / "clip.txt").write_text("\n".join(clip[:-1]) + "\n")
    assert "10 rows, 11 expected" in submit.check(out, parsed, counts)
    expr_list = data["root"] / "video_list.txt"
    expr_list.write_text("clip\n")
    with pytest.raises(InputError, match="give task=va, expr or au"):
        run_submit(data, expr_list, "abaw3_tasks", out)
