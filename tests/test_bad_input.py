"""The bad-input matrix: every CLI answers bad input with one `error:` line and exit status 2, and loses nothing."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fsynth import generate, report, tags, train, tune
from fsynth.cli import run_main
from fsynth.config import build_config
from fsynth.data import cli as data_cli
from fsynth.jobs import plan as plan_module
from fsynth.jobs.tracking import end_run, resolve_tracking_uri, start_run
from fsynth.stages import ensure_fewshot
from tests.data.fake_roots import make_root, write_split_zhou

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
MAINS = {"fsynth.data": data_cli.main, "fsynth.generate": generate.main, "fsynth.train": train.main,
         "fsynth.tune": tune.main, "fsynth.report": report.main}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU: this machine has one")


@dataclass(frozen=True)
class Case:
    """One bad command line: `argv` words with {w} for the previous-work tree; `expect` a regex of the error."""

    id: str
    cli: str
    argv: str
    expect: str
    marks: tuple = ()

    def words(self, w: Path) -> list[str]:
        return [word.replace("{w}", str(w)) for word in self.argv.split()]


FOLDER = "--dataset folder --root {w}/data/folder"
TRAIN = f"{FOLDER} --set data.shots=2 --out {{w}}/runs/train"
GEN = f"{FOLDER} --set data.shots=2 --out {{w}}/runs/synthetic"
TUNE = f"{FOLDER} --space demo --shots 2 --out {{w}}/runs"
PREP = "prepare --out {w}/runs/data/new"
CASES = [
    # fsynth.data
    Case("data-unknown-dataset", "fsynth.data", f"{PREP} --dataset imagenett",
         r"unknown dataset 'imagenett'; known datasets: imagenet.*fsynth\.data list"),
    Case("data-root-missing", "fsynth.data", f"{PREP} --dataset eurosat --root {{w}}/data/nowhere",
         r"data root .*/nowhere does not exist; pass --root DIR"),
    Case("data-partial-root", "fsynth.data", f"{PREP} --dataset eurosat --root {{w}}/data/eurosat-partial",
         r"EuroSAT not found under .*eurosat/2750.*; put it there"),
    Case("data-split-file-names-missing-image", "fsynth.data", f"{PREP} --dataset dtd --root {{w}}/data/dtd",
         r"1 images named in split_zhou_DescribableTextures\.json are missing .*; the dataset root is incomplete"),
    Case("data-corrupt-image", "fsynth.data", f"{PREP} --dataset folder --root {{w}}/data/corrupt --shots 2",
         r"cannot read image .*/lynx/img\d\.jpg \(UnidentifiedImageError\); replace or delete the file"),
    Case("data-empty-class", "fsynth.data", f"{PREP} --dataset folder --root {{w}}/data/emptyclass --shots 2",
         r"class 'snow leopard' has no training image .*; the root is incomplete: add that class's images"),
    Case("data-shots-more-than-class", "fsynth.data", f"{PREP} {FOLDER} --shots 9",
         r"has only \d training images, fewer than the 9 shots asked .*; pass --shots \d or fewer"),
    Case("data-shots-zero", "fsynth.data", f"{PREP} {FOLDER} --shots 0",
         r"data\.shots must be at least 1, got 0; ask for 1, 2, 4, 8 or 16 shots"),
    Case("data-shots-negative", "fsynth.data", f"{PREP} {FOLDER} --shots -4",
         r"data\.shots must be at least 1, got -4; ask for"),
    Case("data-shots-not-a-number", "fsynth.data", f"{PREP} {FOLDER} --shots two",
         r"argument --shots: invalid int value: 'two'; run with --help"),
    Case("data-out-under-a-file", "fsynth.data", f"prepare {FOLDER} --shots 2 --out {{w}}/afile/fewshot",
         r"--out .*/afile/fewshot cannot be a folder: .*/afile is a file; pass a folder path"),
    Case("data-no-command", "fsynth.data", "",
         r"the following arguments are required: command; run with --help"),
    Case("data-unknown-command", "fsynth.data", "frobnicate",
         r"argument command: invalid choice: 'frobnicate'.*; run with --help"),
    Case("data-dataset-missing", "fsynth.data", "prepare --root {w}/data/folder",
         r"the following arguments are required: --dataset; run with --help"),
    # fsynth.generate
    Case("generate-images-per-class-zero", "fsynth.generate", f"{GEN} --images-per-class 0",
         r"generator\.images_per_class must be at least 1, got 0; set --set generator\.images_per_class=N"),
    Case("generate-actors-zero", "fsynth.generate", f"{GEN} --actors 0",
         r"--actors must be at least 1, got 0; pass --actors 1 or more"),
    Case("generate-unknown-backend", "fsynth.generate", f"{GEN} --backend dalle",
         r"argument --backend: invalid choice: 'dalle'.*; run with --help"),
    Case("generate-malformed-yaml", "fsynth.generate", f"{GEN} --config {{w}}/configs/malformed.yaml",
         r"config file .*malformed\.yaml is not valid YAML at line \d+; fix its syntax"),
    Case("generate-unknown-key-in-yaml", "fsynth.generate", f"{GEN} --config {{w}}/configs/unknown-key.yaml",
         r"unknown config key 'generator\.stepz'; valid keys in generator: .*did you mean 'generator\.steps'\?"),
    Case("generate-model-folder-missing", "fsynth.generate",
         f"{GEN} --backend sd --set generator.model={{w}}/models/no-such-pipeline --direct",
         r"generator model path .*no-such-pipeline does not exist; pass a diffusers pipeline folder or a hub id"),
    Case("generate-hub-id-offline", "fsynth.generate",
         f"{GEN} --backend sd --set generator.model=fsynth-test/not-cached --direct",
         r"fsynth-test/not-cached is not in the local Hugging Face cache .*offline.*; download it .*hf download"),
    Case("generate-gpu-without-gpu", "fsynth.generate",
         f"{GEN} --backend ddpm --set resources.gpus_per_generator_actor=1",
         r"resources\.gpus_per_generator_actor=1 asks for a GPU but this machine has 0; set --set "
         r"resources\.gpus_per_generator_actor=0", (NO_GPU,)),
    Case("generate-out-under-a-file", "fsynth.generate", f"{FOLDER} --out {{w}}/afile/synthetic --direct",
         r"--out .*/afile/synthetic cannot be a folder: .*/afile is a file"),
    Case("generate-strength-zero", "fsynth.generate", f"{GEN} --set generator.init_from=shots "
         "--set generator.strength=0", r"generator\.strength must lie in \(0, 1\], got 0\.0; e\.g\. 0\.5"),
    Case("generate-strength-above-one", "fsynth.generate", f"{GEN} --set generator.strength=1.5",
         r"generator\.strength must lie in \(0, 1\], got 1\.5; e\.g\. 0\.5"),
    Case("generate-img2img-no-denoising-step", "fsynth.generate",
         f"{GEN} --set generator.init_from=shots --set generator.strength=0.01",
         r"generator\.strength=0\.01 with generator\.steps=\d+ leaves no denoising step .*; raise "
         r"generator\.strength to at least"),
    Case("generate-init-from-unknown", "fsynth.generate", f"{GEN} --set generator.init_from=photo",
         r"config key 'generator\.init_from' must be one of 'noise', 'shots', got 'photo'; fix the value"),
    # fsynth.train
    Case("train-lr-not-a-number", "fsynth.train", f"{TRAIN} --set training.lr=abc",
         r"config key 'training\.lr' must be float, got 'abc'; fix the value"),
    Case("train-unknown-key", "fsynth.train", f"{TRAIN} --set training.lrr=1e-4",
         r"unknown config key 'training\.lrr'; valid keys in training: .*did you mean 'training\.lr'\?"),
    Case("train-unknown-preset", "fsynth.train", f"{TRAIN} --preset huge",
         r"unknown preset 'huge'; valid presets: embedded, full, lightweight"),
    Case("train-config-missing", "fsynth.train", f"{TRAIN} --config {{w}}/configs/nope.yaml",
         r"config file .*nope\.yaml does not exist; pass an existing YAML file"),
    Case("train-negative-lambda", "fsynth.train", f"{TRAIN} --set loss.lambda_discrepancy=-1",
         r"loss\.lambda_discrepancy must be 0 or positive, got -1\.0; pass 0 to switch the term off"),
    Case("train-cluster-multiple-zero", "fsynth.train", f"{TRAIN} --set partition.cluster_multiple=0",
         r"partition\.cluster_multiple must be positive, got 0\.0; e\.g\. 1, 2 or 4"),
    Case("train-epochs-negative", "fsynth.train", f"{TRAIN} --set training.epochs=-1",
         r"training\.epochs must be 0 \(zero-shot\) or positive, got -1"),
    Case("train-needs-synthetic", "fsynth.train", f"{TRAIN} --baseline method",
         r"baseline 'method' trains on synthetic images; pass --synthetic MANIFEST"),
    Case("train-weights-file-missing", "fsynth.train",
         f"{TRAIN} --baseline real-only --set model.pretrained=/no/such/file.safetensors",
         r"model\.pretrained /no/such/file\.safetensors is not a weights file .*; pass an existing weights file"),
    Case("train-hub-id-offline", "fsynth.train",
         f"{TRAIN} --baseline real-only --set model.arch=hf-hub:fsynth-test/not-cached --set model.head=zeroshot",
         r"cannot fetch open_clip_config\.json of hf-hub:fsynth-test/not-cached .*HF_HUB_OFFLINE is set; run"),
    Case("train-gpu-without-gpu", "fsynth.train", f"{TRAIN} --baseline real-only --set resources.gpus_per_worker=1",
         r"resources\.gpus_per_worker=1 asks for a GPU but this machine has 0; set --set "
         r"resources\.gpus_per_worker=0 to run on the CPUs", (NO_GPU,)),
    Case("train-partial-root", "fsynth.train",
         "--dataset fashion-mnist --root {w}/data/fashion-partial --baseline real-only --out {w}/runs/train",
         r"fashion-mnist: train-labels-idx1-ubyte\(\.gz\) is missing .*; the dataset root is incomplete: copy"),
    Case("train-out-under-a-file", "fsynth.train", f"{FOLDER} --baseline real-only --out {{w}}/afile/train",
         r"--out .*/afile/train cannot be a folder: .*/afile is a file"),
    Case("train-unknown-baseline", "fsynth.train", f"{TRAIN} --baseline best",
         r"argument --baseline: invalid choice: 'best'.*; run with --help"),
    # fsynth.tune
    Case("tune-unknown-sampler", "fsynth.tune", f"{FOLDER} --space {{w}}/spaces/normal.yaml --out {{w}}/runs",
         r"normal\.yaml: sampled key 'training\.lr' got \{'normal': .*\}, not a sampler; it needs exactly one of grid"),
    Case("tune-space-key-not-in-config", "fsynth.tune",
         f"{FOLDER} --space {{w}}/spaces/unknown-key.yaml --out {{w}}/runs",
         r"unknown-key\.yaml: 'training\.learning_rate' is not a config key; valid keys here: .*training\.lr"),
    Case("tune-space-missing", "fsynth.tune", f"{FOLDER} --space {{w}}/spaces/nope.yaml --out {{w}}/runs",
         r"search space .*nope\.yaml does not exist; choose one of ablation, default"),
    Case("tune-seeds-zero", "fsynth.tune", f"{TUNE} --seeds 0",
         r"--seeds must be at least 1, got 0; pass --seeds 1 or more"),
    Case("tune-num-samples-negative", "fsynth.tune", f"{TUNE} --num-samples -1",
         r"--num-samples must be at least 1, got -1"),
    Case("tune-shots-zero", "fsynth.tune", f"{TUNE} --shots 0", r"--shots must be at least 1, got 0"),
    Case("tune-mistyped-value", "fsynth.tune", f"{TUNE} --set training.epochs=two",
         r"config key 'training\.epochs' must be int, got 'two'; fix the value"),
    Case("tune-negative-lambda", "fsynth.tune", f"{TUNE} --set loss.lambda_robustness=-0.5",
         r"loss\.lambda_robustness must be 0 or positive, got -0\.5"),
    Case("tune-more-clusters-than-images", "fsynth.tune", f"{TUNE} --set partition.cluster_multiple=100",
         r"partition\.cluster_multiple=100 makes K = 300 regions for only 198 training images \(3 classes\); "
         r"lower partition\.cluster_multiple to 66 or less"),
    Case("tune-set-of-a-sampled-key", "fsynth.tune", f"{TUNE} --set training.lr=1e-3",
         r"--set training\.lr has no effect: demo\.yaml samples training\.lr in every trial; drop the --set"),
    Case("tune-gpu-without-gpu", "fsynth.tune", f"{TUNE} --set resources.gpus_per_worker=1",
         r"resources\.gpus_per_worker=1 asks for a GPU but this machine has 0", (NO_GPU,)),
    Case("tune-file-store-uri", "fsynth.tune", f"{TUNE} --tracking-uri ./mlruns",
         r"tracking\.uri '\./mlruns' is an MLflow file store.*; leave tracking\.uri empty"),
    Case("tune-tracking-server-unreachable", "fsynth.tune", f"{TUNE} --tracking-uri http://u:pw@127.0.0.1:9",
         r"MLflow tracking server http://u:\*\*\*@127\.0\.0\.1:9 is unreachable \(.*\); start it"),
    Case("tune-tracking-store-under-a-file", "fsynth.tune",
         f"{TUNE} --tracking-uri sqlite:///{{w}}/afile/mlflow.db",
         r"cannot create the MLflow store's folder .*/afile \(File exists\); pass --tracking-uri"),
    Case("tune-storage-under-a-file", "fsynth.tune", f"{TUNE} --storage {{w}}/afile/tune",
         r"--storage .*/afile/tune cannot be a folder: .*/afile is a file"),
    Case("tune-weights-file-missing", "fsynth.tune", f"{TUNE} --set model.pretrained={{w}}/models/none.pt",
         r"model\.pretrained .*/models/none\.pt is not a weights file .*; pass an existing weights file"),
    Case("tune-dataset-missing", "fsynth.tune", "--space demo",
         r"the following arguments are required: --dataset; run with --help"),
    Case("tune-unknown-flag", "fsynth.tune", f"{TUNE} --backend ddpm",
         r"unrecognized arguments: --backend ddpm; run with --help"),
    # fsynth.report
    Case("report-no-store", "fsynth.report", "--storage {w}/data --out {w}/out/results.md",
         r"no MLflow store at .*/data/mlflow\.db; run python -m fsynth\.tune first"),
    Case("report-no-experiment", "fsynth.report", "--storage {w}/runs --experiment nope --out {w}/out/results.md",
         r"experiment 'nope' does not exist in sqlite:.*; run python -m fsynth\.tune first"),
    Case("report-no-final-runs", "fsynth.report",
         "--storage {w}/runs --experiment sweeps-only --out {w}/out/results.md",
         r"experiment 'sweeps-only' in .* has no final runs; run python -m fsynth\.tune first"),
    Case("report-dataset-without-runs", "fsynth.report", "--storage {w}/runs --dataset dtd --out {w}/out/results.md",
         r"no final runs for dtd in experiment 'fsynth' .*; datasets with runs: folder"),
    Case("report-file-store-uri", "fsynth.report", "--tracking-uri ./mlruns --out {w}/out/results.md",
         r"tracking\.uri '\./mlruns' is an MLflow file store"),
    Case("report-tracking-server-unreachable", "fsynth.report",
         "--tracking-uri http://127.0.0.1:9 --out {w}/out/results.md",
         r"MLflow tracking server http://127\.0\.0\.1:9 is unreachable \(.*\); start it"),
    Case("report-remote-storage-without-uri", "fsynth.report",
         "--storage s3://bucket/runs --out {w}/out/results.md",
         r"tracking\.storage 's3://bucket/runs' is remote, so there is no local mlflow\.db; pass --tracking-uri "),
    Case("report-out-not-a-page", "fsynth.report", "--storage {w}/runs --out {w}/out",
         r"--out names the results page, a \.md file .*; the CSVs and figures go to a folder"),
    Case("report-out-under-a-file", "fsynth.report", "--storage {w}/runs --out {w}/afile/results.md",
         r"--out .*/afile/results cannot be a folder: .*/afile is a file"),
    Case("report-unknown-flag", "fsynth.report", "--storage {w}/runs --format html",
         r"unrecognized arguments: --format html; run with --help"),
]
SUBPROCESS_CASES = ("data-corrupt-image", "generate-hub-id-offline", "train-negative-lambda", "tune-unknown-sampler",
                    "report-dataset-without-runs")


# --------------------------------------------------------------------------------------- the previous-work tree


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bad_roots(data: Path) -> None:
    """Roots that are wrong in one way each: a corrupt class, an empty class, half a dataset, a stale split."""
    make_root("folder", data / "corrupt", per_class=10)
    for image in (data / "corrupt" / "lynx").iterdir():
        image.write_bytes(b"not an image")
    make_root("folder", data / "emptyclass", per_class=10)
    (data / "emptyclass" / "snow_leopard").mkdir()
    (data / "eurosat-partial" / "eurosat").mkdir(parents=True)
    make_root("fashion-mnist", data / "fashion-partial", per_class=2)
    (data / "fashion-partial" / "train-labels-idx1-ubyte.gz").unlink()
    make_root("dtd", data / "dtd", per_class=3)
    images = data / "dtd" / "dtd" / "images"
    names = tuple(p.name for p in sorted(images.iterdir()))
    write_split_zhou(data / "dtd" / "dtd" / "split_zhou_DescribableTextures.json", images, names,
                     {"train": 1, "val": 1, "test": 1})
    next(images.iterdir()).joinpath("img0.jpg").unlink()


def _tracking_store(runs: Path) -> None:
    """A sqlite store as fsynth.tune leaves it: a finished final run of `folder`; a sweep with no finals yet."""
    uri = resolve_tracking_uri("", runs)
    final = start_run(uri, "fsynth", "final-seed0", tags={tags.KIND: "final", tags.DATASET: "folder"})
    end_run(uri, final)
    sweep = start_run(uri, "sweeps-only", "sweep", tags={tags.KIND: "sweep", tags.DATASET: "folder"})
    end_run(uri, sweep, "KILLED")


def build_previous_work(w: Path) -> Path:
    """What earlier commands computed, for every case to point at: data roots, few-shot sets, a tracking store,
    cached regions; plus the bad inputs (configs, spaces, a file where a folder should be)."""
    make_root("folder", w / "data" / "folder", per_class=10)
    _bad_roots(w / "data")
    assert run_main(data_cli.main, ["prepare", "--dataset", "folder", "--root", str(w / "data" / "folder"),
                                    "--shots", "2", "--out", str(w / "runs" / "data" / "folder")]) == 0
    train_cfg = build_config("embedded", extra={"data": {"dataset": "folder", "root": str(w / "data" / "folder")}},
                             overrides=["data.shots=2"])
    ensure_fewshot(train_cfg, w / "runs" / "train" / "fewshot")
    plan = plan_module.resolve(tune.build_parser().parse_args(Case("", "", TUNE, "").words(w)))
    ensure_fewshot(plan.cfg, plan.out / "synthetic" / "fewshot")
    _tracking_store(w / "runs")
    _write(w / "runs" / "cache" / "regions-0123456789abcdef" / "key.json", '{"k": 30}\n')
    _write(w / "runs" / "cache" / "regions-0123456789abcdef" / "regions.json", '{"assignments": [0, 1, 2]}\n')
    _write(w / "afile", "a file where a folder is expected\n")
    _write(w / "configs" / "malformed.yaml", "training:\n  lr: [1e-4,\n")
    _write(w / "configs" / "unknown-key.yaml", "generator:\n  stepz: 10\n")
    _write(w / "spaces" / "normal.yaml", "preset: embedded\nsample:\n  training.lr: {normal: [1.0e-4, 1.0e-5]}\n")
    _write(w / "spaces" / "unknown-key.yaml", "preset: embedded\nsample:\n  training.learning_rate: {grid: [1, 2]}\n")
    (w / "out").mkdir()
    return w


def snapshot(w: Path) -> dict[str, tuple[str, int]]:
    """Every file under `w`: relative path -> (sha256, mtime in ns)."""
    files = {}
    for folder, _, names in os.walk(w):
        for name in names:
            path = Path(folder) / name
            files[str(path.relative_to(w))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return build_previous_work(tmp_path_factory.mktemp("previous-work"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No tracking server or cluster from the caller's shell; relative paths land in an empty folder."""
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------------- the tests


def run_case(case: Case, w: Path, capfd) -> tuple[int, str, str]:
    code = run_main(MAINS[case.cli], case.words(w))
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_error_line(case: Case, code: int, out: str, err: str) -> str:
    assert "Traceback" not in out + err, (case.id, err[-3000:])
    assert code == 2, (case.id, code, err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), (case.id, err[-3000:])
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], (case.id, err)
    assert re.search(case.expect, lines[-1]), (case.id, lines[-1])
    return lines[-1]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_status_2_and_loses_nothing(case, work, capfd):
    before = snapshot(work)
    code, out, err = run_case(case, work, capfd)
    assert_one_error_line(case, code, out, err)
    after = snapshot(work)
    assert sorted(set(before) - set(after)) == [], "deleted"
    assert sorted(k for k in before if k in after and before[k] != after[k]) == [], "modified"
    assert sorted(set(after) - set(before)) == [], "written"


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_the_real_command_answers_the_same(case_id, work, tmp_path):
    """As a user runs it: a fresh interpreter, `python -m fsynth.<cli>`, exit status 2 and one error line."""
    case = next(c for c in CASES if c.id == case_id)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HOME": os.environ.get("HOME", str(tmp_path))}
    result = subprocess.run([sys.executable, "-m", case.cli, *case.words(work)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=env)
    assert_one_error_line(case, result.returncode, result.stdout, result.stderr)


def test_the_matrix_covers_every_cli_and_the_doc_lists_every_case():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.cli for c in CASES} == set(MAINS)
    assert {c.cli for c in CASES if c.id in SUBPROCESS_CASES} == set(MAINS)
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([\w-]+)` \|", section, flags=re.M)
    assert sorted(listed) == sorted(c.id for c in CASES)
    stated = re.search(r"(\d+) cases tried, (\d+) answered with one line and exit status 2, files lost: 0", section)
    assert stated and int(stated[1]) == int(stated[2]) == len(CASES), stated
