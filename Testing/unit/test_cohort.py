"""Cohort audit (issue 19): a synthetic cohort (Testing/cohort_model.py: small ball scans with references, one file
that is not an image, one noisy case with a low Dice) through the plain loop, a killed and restarted run, and a real
``distributed.LocalCluster`` of two worker processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import cohort_model
import SegHiResCAMLib
from SegHiResCAMLib.analysis import cohort
from SegHiResCAMLib.analysis.cohort import CohortOptions, ModelSpec, read_manifest, run_cohort
from SegHiResCAMLib.analysis.cohort_cluster import local_layout, run_on_dask
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.imaging.files import read_image

OPTIONS = CohortOptions(device="cpu", threads=1)
MODEL = ModelSpec(cohort_model.SPEC)
CASES = ["clean0", "clean1", "broken", "clean2", "clean3", "degraded"]


def results(frame):
    """The table without the columns that change from run to run."""
    return frame.drop(columns=list(cohort.RUN_COLUMNS)).reset_index(drop=True)


class Counter:
    """Wraps cohort.compute_case: counts the cases computed in this process."""

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at, self.real = [], fail_at, cohort.compute_case
        monkeypatch.setattr(cohort, "compute_case", self)

    def __call__(self, case, model, options):
        self.calls.append(case.case_id)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        return self.real(case, model, options)


def folder_state(out):
    """(name, mtime_ns, inode) of every file under cases/: what a rerun must not touch."""
    found = []
    for folder, _, files in os.walk(os.path.join(out, cohort.CASES_DIR)):
        for name in files:
            info = os.stat(os.path.join(folder, name))
            found.append((os.path.relpath(os.path.join(folder, name), out), info.st_mtime_ns, info.st_ino))
    return sorted(found)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return cohort_model.write_cohort(str(tmp_path_factory.mktemp("cohort-inputs")))


@pytest.fixture(scope="module")
def first_run(manifest, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cohort-out"))
    return out, run_cohort(manifest, out, MODEL, OPTIONS, scheduler="none", progress=False)


def test_table_has_every_case_the_failure_and_the_degraded_case_ranked_worst(manifest, first_run):
    out, frame = first_run
    assert list(frame["case_id"]) == CASES
    assert list(frame.columns) == list(cohort.COLUMNS)
    rows = frame.set_index("case_id")
    assert rows.loc["broken", "status"] == "failed"
    assert rows.loc["broken", "error"].startswith("InputError: Could not read image")
    assert "broken.nii.gz" in rows.loc["broken", "error"] and bool(rows.loc["broken", "flagged"])
    done = rows[rows["status"] == "done"]
    assert len(done) == 5 and (done["error"] == "").all()
    clean = done.drop(index="degraded")
    assert (clean["dice"] > 0.95).all() and rows.loc["degraded", "dice"] < 0.8
    # the ground-truth-free score finds the bad case: lowest mean SA score, flagged
    assert rows.loc["degraded", "sa_rank"] == 1 and bool(rows.loc["degraded", "flagged"])
    assert rows.loc["degraded", "mean_sa"] < clean["mean_sa"].min() - 0.1
    assert ((done["heat_in_target"] >= 0) & (done["heat_in_target"] <= 1)).all()
    assert np.allclose(done["heat_in_target"] + done["heat_out_target"], 1.0)
    # the table on disk is the one returned
    on_disk = pd.read_csv(os.path.join(out, cohort.TABLE_FILE), keep_default_na=False, na_values=[""])
    assert list(on_disk["case_id"]) == CASES
    assert np.allclose(on_disk["mean_sa"].astype(float), frame["mean_sa"], equal_nan=True)
    assert list(on_disk["status"]) == list(frame["status"])


def test_case_outputs_lie_on_the_case_grid_with_provenance(manifest, first_run):
    out, frame = first_run
    case = read_manifest(manifest)[-1]
    image, geometry = read_image(case.images[0])
    folder = cohort.case_folder(out, "degraded")
    heat, heat_geometry = read_image(os.path.join(folder, cohort.HEATMAP_FILE))
    prediction, prediction_geometry = read_image(os.path.join(folder, cohort.PREDICTION_FILE))
    assert heat.dtype == np.float32 and heat.shape == image.shape and heat.max() == pytest.approx(1.0)
    assert heat_geometry.same_grid(geometry) and prediction_geometry.same_grid(geometry)
    assert int((prediction == 1).sum()) == frame.set_index("case_id").loc["degraded", "prediction_voxels"]
    record = json.load(open(os.path.join(folder, cohort.RESULT_FILE)))
    assert record["key"] == frame.set_index("case_id").loc["degraded", "key"]
    assert record["provenance"]["explain"]["method"] == OPTIONS.method
    assert record["provenance"]["sa_score"]["feature_layers"] == ["features", "mix"]
    failed = json.load(open(os.path.join(cohort.case_folder(out, "broken"), cohort.RESULT_FILE)))
    assert "Traceback" in failed["provenance"]["traceback"] and failed["files"]["heatmap"] is None
    assert not os.path.exists(os.path.join(cohort.case_folder(out, "broken"), cohort.HEATMAP_FILE))
    assert not [n for n in os.listdir(os.path.join(out, cohort.CASES_DIR)) if n.startswith(".")]


def test_a_second_run_does_no_work(manifest, first_run, monkeypatch):
    out, frame = first_run
    before = folder_state(out)
    counter = Counter(monkeypatch)
    loads = cohort.MODEL_LOADS[0]
    again = run_cohort(manifest, out, MODEL, OPTIONS, scheduler="none", progress=False)
    assert counter.calls == [] and cohort.MODEL_LOADS[0] == loads  # not even the model is loaded
    assert folder_state(out) == before
    assert again["reused"].all() and not frame["reused"].any()
    pd.testing.assert_frame_equal(results(again), results(frame))


def test_changed_inputs_or_options_are_computed_again(manifest, first_run, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    shutil.copytree(first_run[0], out)
    inputs = str(tmp_path / "inputs")
    shutil.copytree(os.path.dirname(manifest), inputs)
    changed = os.path.join(inputs, "scans", "clean1.nii.gz")
    image, geometry = read_image(changed)
    from SegHiResCAMLib.imaging.files import write_image
    write_image(changed, image * 1.01, geometry)  # same paths would not do: the contents count
    counter = Counter(monkeypatch)
    frame = run_cohort(os.path.join(inputs, "manifest.csv"), out, MODEL, OPTIONS, scheduler="none", progress=False)
    assert counter.calls == ["clean1"]
    assert list(frame["reused"]) == [True, False, True, True, True, True]
    counter.calls.clear()
    frame = run_cohort(os.path.join(inputs, "manifest.csv"), out, MODEL, CohortOptions(device="cpu", sa_score=False),
                       scheduler="none", progress=False)
    assert counter.calls == CASES  # other options: every case again
    assert frame["mean_sa"].isna().all() and frame.set_index("case_id").loc["clean0", "dice"] == 1.0


def test_check_quick_adds_the_verdict_and_its_numbers_and_is_part_of_the_hash(manifest, first_run, tmp_path,
                                                                              monkeypatch):
    """``--check quick`` (issue 19): every case is computed again (the option is in the case hash), the verdict and
    the check's numbers are columns of cohort.csv, equal to explain_image(check="quick") on the case, cohort.md shows
    each case's verdict, and the other columns stay those of the run without the check."""
    from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
    out = str(tmp_path / "out")
    shutil.copytree(first_run[0], out)
    counter = Counter(monkeypatch)
    assert main(["cohort", manifest, "--out", out, "--model", MODEL.spec, "--scheduler", "none", "--quiet",
                 "--device", "cpu", "--threads", "1", "--check", "quick"]) == 0
    assert counter.calls == CASES
    frame = pd.read_csv(os.path.join(out, cohort.TABLE_FILE), keep_default_na=False, na_values=[""])
    assert list(frame.columns) == list(cohort.COLUMNS)
    rows = frame.set_index("case_id")
    done = rows[rows["status"] == "done"]
    assert len(done) == 5
    assert done["check_verdict"].str.match(r"^(passes|fails) model randomisation \(rho -?[0-9.]+\); deletion AUC "
                                           r"[0-9.-]+ vs random [0-9.-]+: (no )?better than random$").all(), \
        done["check_verdict"]
    assert np.isfinite(done[["check_rho", "check_deletion_auc", "check_deletion_auc_random"]].values).all()
    assert pd.isna(rows.loc["broken", "check_verdict"]) and np.isnan(rows.loc["broken", "check_rho"])
    case = read_manifest(manifest)[0]
    image, geometry = read_image(case.images[0])
    direct = explain_image(MODEL.load(), image, geometry, [TargetSpec(class_index=1)], method=OPTIONS.method,
                           device="cpu", check="quick").metadata
    assert rows.loc[case.case_id, "check_verdict"] == direct["verdict"]
    assert rows.loc[case.case_id, "check_rho"] == pytest.approx(
        direct["check"]["model_randomization"]["spearman_in_segment"], rel=1e-6)
    assert rows.loc[case.case_id, "check_deletion_auc"] == pytest.approx(direct["check"]["deletion"]["auc"], rel=1e-6)
    assert rows.loc[case.case_id, "check_deletion_auc_random"] == pytest.approx(
        direct["check"]["deletion"]["auc_random"], rel=1e-6)
    assert np.allclose(frame["mean_sa"], first_run[1]["mean_sa"], equal_nan=True)
    assert np.allclose(frame["dice"], first_run[1]["dice"], equal_nan=True)
    report = open(os.path.join(out, "cohort.md")).read().split("## Quick check of the heatmaps")[1]
    for case_id, verdict in done["check_verdict"].items():
        assert "| %s | %s | %s |" % (case_id, done.loc[case_id, "class"], verdict) in report
    # the run without the check keeps its hash from before the option existed: its cases are reused as they were
    assert "quick_check" not in OPTIONS.describe() and "quick_check" in CohortOptions(quick_check="quick").describe()
    assert not first_run[1]["check_verdict"].astype(bool).any()
    with pytest.raises(InputError, match="checks the heatmap"):
        CohortOptions(explain=False, quick_check="quick").check()


def test_failed_cases_are_kept_and_retried_on_request(manifest, first_run, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    shutil.copytree(first_run[0], out)
    counter = Counter(monkeypatch)
    frame = run_cohort(manifest, out, MODEL, OPTIONS, scheduler="none", progress=False, retry_failed=True)
    assert counter.calls == ["broken"]
    assert frame.set_index("case_id").loc["broken", "status"] == "failed"


def test_an_interrupted_case_writes_nothing_and_the_rerun_finishes(manifest, first_run, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    counter = Counter(monkeypatch, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        run_cohort(manifest, out, MODEL, OPTIONS, scheduler="none", progress=False)
    assert sorted(os.listdir(os.path.join(out, cohort.CASES_DIR))) == ["broken", "clean0", "clean1"]
    assert not os.path.exists(os.path.join(out, cohort.TABLE_FILE))
    counter = Counter(monkeypatch)
    frame = run_cohort(manifest, out, MODEL, OPTIONS, scheduler="none", progress=False)
    assert counter.calls == ["clean2", "clean3", "degraded"]
    pd.testing.assert_frame_equal(results(frame), results(first_run[1]))


#: the ``seghirescam cohort`` process of the kill test: the real command, except that it stops for good while it
#: writes the result.json of its 4th case (clean2; the file is open, its images are in its temporary folder) and says
#: so with a marker file. The kill then always lands at the same point, however loaded the machine is.
HELD_RUN = """
import sys, time
from SegHiResCAMLib.analysis import cohort
from SegHiResCAMLib.cli import main
marker, real, written = sys.argv.pop(1), cohort.dumps, []

def held(record, **kw):
    if isinstance(record, dict) and "row" in record:
        written.append(record["row"]["case_id"])
        if len(written) == 4:
            open(marker, "w").close()
            while True:
                time.sleep(60)
    return real(record, **kw)

cohort.dumps = held
sys.exit(main())
"""


def test_a_killed_run_restarted_computes_only_the_unfinished_cases(manifest, first_run, tmp_path, monkeypatch):
    """A ``seghirescam cohort`` process killed with SIGKILL in the middle of its 4th case (clean2: its temporary
    folder half written) after three finished ones; the rerun (command line, in this process) computes the others
    only, leaves the finished folders untouched, removes the half-made folder and writes the full table."""
    out = str(tmp_path / "out")
    run = ["--model", cohort_model.SPEC, "--model-args", '{"delay": 0.05}', "--device", "cpu", "--threads", "1",
            "--scheduler", "none"]
    source = os.path.dirname(os.path.dirname(os.path.abspath(SegHiResCAMLib.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([source] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    marker, log = str(tmp_path / "held"), str(tmp_path / "stderr.txt")
    with open(log, "wb") as stderr:  # a file, not a pipe: a chatty child never blocks on a full pipe
        process = subprocess.Popen([sys.executable, "-c", HELD_RUN, marker, "cohort", manifest, "--out", out,
                                    "--quiet", "--no-report"] + run, env=env, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    deadline = time.time() + 600  # only against a hang: the loop ends when the child holds (or exits)
    try:
        while time.time() < deadline and process.poll() is None and not os.path.exists(marker):
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert os.path.exists(marker), "the child did not reach its 4th case (exit %s): %s" % (
        process.returncode, open(log).read())
    cases = os.path.join(out, cohort.CASES_DIR)
    finished = sorted(n for n in os.listdir(cases) if not n.startswith("."))
    assert finished == ["broken", "clean0", "clean1"], open(log).read()
    half = [n for n in os.listdir(cases) if n.startswith(".tmp-") and n.endswith("-clean2")]
    assert len(half) == 1  # its images written, its result.json opened but still empty
    assert os.path.getsize(os.path.join(cases, half[0], cohort.RESULT_FILE)) == 0
    assert os.path.getsize(os.path.join(cases, half[0], cohort.HEATMAP_FILE)) > 0
    def finished_files():
        return [entry for entry in folder_state(out) if entry[0].split(os.sep)[1] in finished]

    before = finished_files()
    assert len(before) == 2 * 3 + 1  # prediction, heatmap, result.json of clean0 and clean1; broken's result.json
    counter = Counter(monkeypatch)
    assert main(["cohort", manifest, "--out", out, "--quiet"] + run) == 0
    assert counter.calls == ["clean2", "clean3", "degraded"]
    assert finished_files() == before
    frame = pd.read_csv(os.path.join(out, cohort.TABLE_FILE), keep_default_na=False, na_values=[""])
    assert list(frame["case_id"]) == CASES and list(frame["reused"]) == [c in finished for c in CASES]
    assert np.allclose(frame["mean_sa"], first_run[1]["mean_sa"], equal_nan=True)
    assert not [n for n in os.listdir(cases) if n.startswith(".")]  # the killed run's temporary folder is gone
    for name in ("cohort.md", "sa_vs_dice.png", "ranking.png", "gallery.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    report = open(os.path.join(out, "cohort.md")).read()
    assert "| 1 | degraded |" in report and "broken" in report.split("## Failed cases")[1]


def test_a_local_cluster_of_two_worker_processes_gives_the_identical_table(manifest, first_run, tmp_path):
    from distributed import Client, LocalCluster
    out = str(tmp_path / "out")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        frame = run_cohort(manifest, out, MODEL, CohortOptions(device="cpu"), scheduler=cluster.scheduler_address,
                           progress=False)
        with Client(cluster) as client:
            loads = client.run(lambda: __import__("SegHiResCAMLib.analysis.cohort", fromlist=["x"]).MODEL_LOADS[0])
            pids = client.run(os.getpid)
    pd.testing.assert_frame_equal(results(frame), results(first_run[1]))
    records = [cohort.read_result(out, c) for c in CASES]
    workers = {r["worker"]["pid"] for r in records}
    assert workers <= set(pids.values()) and os.getpid() not in workers
    assert sorted(loads.values()) in ([0, 1], [1, 1])  # one model load per worker that ran a case
    cores = len(os.sched_getaffinity(0))
    assert {r["worker"]["threads"] for r in records} == {max(1, cores // 2)}


def test_manifest_errors_are_one_clear_line(tmp_path, capsys):
    def manifest(text):
        path = tmp_path / "m.csv"
        path.write_text(text)
        return str(path)

    for text, message in [("id,image\na,x.nii\n", "it needs case_id and image"),
                          ("case_id,image\na,x.nii\na,y.nii\n", "occurs twice"),
                          ("case_id,image\n../a,x.nii\n", "not a folder name"),
                          ("case_id,image,image_2\na,x.nii,\n", "an image column (image, image_2) is empty"),
                          ("case_id,image,label\na,x.nii,liver\n", "label must be a number"),
                          ("case_id,image\n", "lists no cases")]:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_manifest(manifest(text))
    assert main(["cohort", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o"), "--model", MODEL.spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not os.path.exists(tmp_path / "o")
    cases = read_manifest(manifest("case_id,image_2,image_1,reference,class\nc,b.nii,a.nii,r.nii,liver\n"))
    assert cases[0].images == (str(tmp_path / "a.nii"), str(tmp_path / "b.nii")) and cases[0].class_ == "liver"


def test_cluster_choices_fail_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if not installed
    with pytest.raises(InputError, match="needs dask-jobqueue"):
        run_on_dask(len, [("x",)], print, cluster="slurm")
    with pytest.raises(InputError, match="--scheduler must be local, none or a scheduler address"):
        run_on_dask(len, [("x",)], print, scheduler="my-cluster")
    assert local_layout(cores=8, memory=64 * 2 ** 30, worker_memory=16 * 2 ** 30)[:2] == (3, 2)
    assert local_layout(workers=3, cores=8, memory=30 * 2 ** 30)[:2] == (3, 2)


def test_report_correlations_equal_scipy():
    from scipy import stats
    from SegHiResCAMLib.reporting.cohort import correlations
    rng = np.random.RandomState(3)
    x = np.round(rng.rand(20), 1)  # ties
    y = x + 0.3 * rng.rand(20)
    x[4] = np.nan
    keep = np.isfinite(x)
    n, r, rho = correlations(x, y)
    assert n == 19
    assert r == pytest.approx(stats.pearsonr(x[keep], y[keep])[0], abs=1e-12)
    assert rho == pytest.approx(stats.spearmanr(x[keep], y[keep])[0], abs=1e-12)


def test_model_files_are_sent_to_workers_by_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text("def make():\n    pass\n")
    (tmp_path / "w.pt").write_bytes(b"0")
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec("net.py:make", weights="w.pt").absolute()
    assert spec.spec == str(tmp_path / "net.py") + ":make" and spec.weights == str(tmp_path / "w.pt")
    assert ModelSpec("hd-bet").absolute().spec == "hd-bet"
    # the files' contents are part of the model's identity
    before = ModelSpec("net.py:make", weights="w.pt").fingerprint()
    (tmp_path / "w.pt").write_bytes(b"1")
    assert ModelSpec("net.py:make", weights="w.pt").fingerprint() != before


def _fails_on_two(value, options):
    if value == 2:
        raise RuntimeError("task %d lost" % value)
    return {"value": value, "threads": options.threads}


def test_a_task_that_fails_on_dask_is_recorded_and_the_others_go_on():
    from distributed import LocalCluster
    got, errors = [], []

    def on_error(job, exc):
        errors.append((job[0], str(exc)))
        return {"value": job[0], "failed": True}

    jobs = [(1, CohortOptions()), (2, CohortOptions()), (3, CohortOptions())]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        run_on_dask(_fails_on_two, jobs, got.append, scheduler=cluster.scheduler_address, threads=1,
                    on_error=on_error, log=lambda text: None)
        with pytest.raises(RuntimeError, match="task 2 lost"):
            run_on_dask(_fails_on_two, jobs, lambda row: None, scheduler=cluster.scheduler_address, threads=1,
                        log=lambda text: None)
    assert sorted(r["value"] for r in got) == [1, 2, 3] and errors == [(2, "task 2 lost")]
    assert [r["threads"] for r in got if "threads" in r] == [1, 1]


def test_record_failure_writes_a_failed_case_folder(manifest, tmp_path):
    case = read_manifest(manifest)[0]
    row = cohort.record_failure((case, MODEL, OPTIONS, str(tmp_path), "k1"), RuntimeError("worker died"))
    assert row["status"] == "failed" and row["error"] == "RuntimeError: worker died"
    record = cohort.read_result(str(tmp_path), case.case_id)
    assert record["key"] == "k1" and record["row"]["error"] == "RuntimeError: worker died"
    assert os.listdir(cohort.case_folder(str(tmp_path), case.case_id)) == [cohort.RESULT_FILE]


def test_a_bad_scheduler_fails_before_any_output(manifest, tmp_path):
    with pytest.raises(InputError, match="--scheduler must be local, none or a scheduler address"):
        run_cohort(manifest, str(tmp_path / "out"), MODEL, OPTIONS, scheduler="my-cluster", progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_command_line_interrupt_says_the_finished_cases_are_kept(manifest, tmp_path, monkeypatch, capsys):
    Counter(monkeypatch, fail_at=2)
    out = str(tmp_path / "out")
    assert main(["cohort", manifest, "--out", out, "--model", MODEL.spec, "--scheduler", "none", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "cohort interrupted; the finished cases are kept" in err and "nothing was written" not in err
    assert sorted(os.listdir(os.path.join(out, cohort.CASES_DIR))) == ["clean0"]


def test_several_image_columns_are_the_channels_of_one_case(tmp_path):
    import SimpleITK as sitk
    rng = np.random.RandomState(0)
    for name, spacing in (("a", (1.0, 1.0, 1.0)), ("b", (1.0, 1.0, 1.0)), ("c", (2.0, 1.0, 1.0))):
        image = sitk.GetImageFromArray(rng.rand(8, 12, 10).astype(np.float32))
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(tmp_path / (name + ".nii.gz")))
    segment = np.zeros((8, 12, 10), np.uint8)
    segment[2:6, 3:9, 2:8] = 2
    sitk.WriteImage(sitk.GetImageFromArray(segment), str(tmp_path / "seg.nii.gz"))
    (tmp_path / "m.csv").write_text("case_id,image_1,image_2,segment,label\nok,a.nii.gz,b.nii.gz,seg.nii.gz,2\n"
                                    "off-grid,a.nii.gz,c.nii.gz,seg.nii.gz,2\n")
    model = ModelSpec("toy_models:unet3d", model_args=json.dumps({"in_channels": 2}))
    frame = run_cohort(str(tmp_path / "m.csv"), str(tmp_path / "out"), model,
                       CohortOptions(device="cpu", sa_score=False), scheduler="none", progress=False)
    rows = frame.set_index("case_id")
    assert rows.loc["ok", "status"] == "done", rows.loc["ok", "error"]
    assert rows.loc["ok", "prediction_voxels"] >= 0
    assert rows.loc["off-grid", "status"] == "failed" and "must share one grid" in rows.loc["off-grid", "error"]
    heat, _ = read_image(os.path.join(cohort.case_folder(str(tmp_path / "out"), "ok"), cohort.HEATMAP_FILE))
    assert heat.shape == (8, 12, 10)
    inside = heat[segment == 2].sum() / heat.sum()  # the segment (label 2) is the explained target
    assert rows.loc["ok", "heat_in_target"] == pytest.approx(inside, rel=1e-5)


def test_a_2d_cohort_gets_its_report(tmp_path):
    import SimpleITK as sitk
    rng = np.random.RandomState(1)
    rows = []
    for i in range(3):
        disc = (np.hypot(*np.indices((24, 20)) - np.array([12, 10])[:, None, None]) < 6 + i).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray((disc + 0.1 * rng.randn(24, 20)).astype(np.float32)),
                        str(tmp_path / ("s%d.nii.gz" % i)))
        sitk.WriteImage(sitk.GetImageFromArray(disc), str(tmp_path / ("r%d.nii.gz" % i)))
        rows.append("s%d,s%d.nii.gz,r%d.nii.gz,r%d.nii.gz" % (i, i, i, i))
    (tmp_path / "m.csv").write_text("case_id,image,reference,segment\n" + "\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    assert main(["cohort", str(tmp_path / "m.csv"), "--out", out, "--model", "toy_models:unet2d", "--scheduler",
                 "none", "--quiet", "--device", "cpu"]) == 0
    frame = pd.read_csv(os.path.join(out, cohort.TABLE_FILE))
    assert list(frame["status"]) == ["done"] * 3 and frame["mean_sa"].notna().all()
    assert os.path.getsize(os.path.join(out, "gallery.png")) > 0


def test_the_default_local_cluster_splits_the_cores_between_its_workers(manifest, first_run, tmp_path, monkeypatch):
    from SegHiResCAMLib.analysis import cohort_cluster
    monkeypatch.setattr(cohort_cluster, "machine", lambda: (4, 16 * 2 ** 30))  # sizes the cluster, not the run
    notes = []
    cases = read_manifest(manifest)[:2]
    frame = run_cohort(cases, str(tmp_path / "out"), MODEL, CohortOptions(device="cpu"), workers=2,
                       progress=False, log=notes.append)
    assert notes == ["seghirescam: local Dask cluster: 2 worker processes, 2 torch threads each, 6.4 GiB memory "
                     "limit each"]
    assert {cohort.read_result(str(tmp_path / "out"), c.case_id)["worker"]["threads"] for c in cases} == {2}
    pd.testing.assert_frame_equal(results(frame).drop(columns=["sa_rank", "flagged"]),
                                  results(first_run[1]).iloc[:2].drop(columns=["sa_rank", "flagged"]))
