"""`loc3r eval --model`: a package judged through the runtime, one session per video."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from loc3r.cli import main
from loc3r.errors import Loc3rError
from loc3r.runtime.package import default_package_dir
from loc3r.runtime.session import Pipeline
from loc3r.runtime.video import open_video, sample_frames
from loc3r.synthetic.dataset import SynthOptions, synthesize
from loc3r.synthetic.eval_cli import model_predictions
from loc3r.synthetic.label_files import read_labels, read_predictions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalset") / "data"
    synthesize(out, "test", seed=3, scenes=1, options=SynthOptions(frames=6, video_size=(96, 96)), progress=False)
    return out


def test_predictions_equal_a_direct_session(dataset):
    labels = read_labels(dataset)
    preds = model_predictions(str(default_package_dir()), labels, dataset, progress=False)
    assert sorted(preds) == sorted(lab["id"] for lab in labels)

    # The same video and questions through a Session by hand.
    session = Pipeline.load(default_package_dir(), "cpu").new_session(on_notice=lambda m: None)
    for rgb, t in sample_frames(open_video(str(dataset / labels[0]["video"]))):
        session.add_frame(rgb, t)
    assert session.frames == 6
    for lab in labels[:3]:
        ans = session.ask(lab["question"], situation=lab["situation"] or None, max_new_tokens=16)
        got = preds[lab["id"]]
        assert got["answer"] == ans.answer
        if lab["situation"]:
            assert got["position"] == pytest.approx(list(ans.position), abs=1e-6)
            assert got["heading"] == pytest.approx(ans.orientation_deg, abs=1e-6)
        else:
            assert got["position"] is None and got["heading"] is None


def test_cli_scores_the_default_model_and_saves_predictions(dataset, tmp_path):
    saved = tmp_path / "preds.jsonl"
    r = CliRunner().invoke(main, ["eval", "--data", str(dataset), "--model", "default",
                                  "--save-predictions", str(saved), "--json"])
    assert r.exit_code == 0, r.output
    assert len(read_predictions(saved)) == len(read_labels(dataset))
    report = json.loads(r.stdout)
    labels = read_labels(dataset)
    assert sum(v["n"] for v in report["by_type"].values()) == len(labels)
    assert report["situations"] == len({lab["situation_id"] for lab in labels if lab["situation"]})


def test_labels_without_video_are_refused(dataset):
    labels = [dict(read_labels(dataset)[0], video=None)]
    with pytest.raises(Loc3rError, match=r"^label .* has no video \(made with --no-video\?\); --model needs the videos$"):
        model_predictions(str(default_package_dir()), labels, dataset, progress=False)


def test_save_predictions_needs_model(dataset, tmp_path):
    r = CliRunner().invoke(main, ["eval", "--data", str(dataset), "--baseline",
                                  "--save-predictions", str(tmp_path / "p.jsonl")])
    assert r.exit_code == 1
    assert "error: --save-predictions only applies to --model" in r.output
