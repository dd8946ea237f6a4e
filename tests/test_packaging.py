"""What an installed headprune has without the repository: its configs by name, `python -m
headprune`, `--version`, and a wheel that carries them and the license."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import headprune
from conftest import one_line_error
from headprune.cli import parser
from headprune.config import SHIPPED_CONFIGS, SweepConfig, build_config

ROOT = Path(__file__).resolve().parents[1]


def test_a_shipped_config_is_named_without_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: no configs/ here
    by_name = build_config(SweepConfig, parser().parse_args(["sweep", "--config", "sweep-subjectivity"]))
    by_path = build_config(SweepConfig, parser().parse_args(["sweep", "--config", str(ROOT / "configs" /
                                                                                      "sweep-subjectivity.yaml")]))
    assert by_name == by_path and by_name.dataset == "offline:subjectivity"
    # the repository's configs/ is the package's
    assert sorted(p.name for p in (ROOT / "configs").iterdir()) == sorted(p.name for p in SHIPPED_CONFIGS.iterdir())
    (tmp_path / "sweep-subjectivity").mkdir()  # a folder of that name (a run's) is no config
    assert build_config(SweepConfig, parser().parse_args(["sweep", "--config", "sweep-subjectivity"])) == by_path
    (tmp_path / "rotten-tomatoes").write_text("ks: [5]\n")  # a file of that name here is the one read
    assert build_config(SweepConfig, parser().parse_args(["sweep", "--config", "rotten-tomatoes"])).ks == [5]


def test_a_config_that_is_not_there_is_one_line_naming_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, ["prune", "--config", "configs/rotten-tomatoes.yaml", "--k", "12"])
    assert line == ("headprune: error: cannot read config file configs/rotten-tomatoes.yaml: no such file "
                    "(headprune ships digits-vit, ding-de-en, rotten-tomatoes, smollm2, subjectivity, "
                    "sweep-digits-vit, sweep-ding-de-en, sweep-rotten-tomatoes, sweep-smollm2, sweep-subjectivity: "
                    "name one without .yaml)")


def test_python_dash_m_and_the_version():
    out = subprocess.run([sys.executable, "-m", "headprune", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == f"headprune {headprune.__version__}"


def test_the_wheel_carries_the_configs_the_entry_points_and_the_license(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "headprune"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("headprune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"headprune/configs/{p.name}" for p in SHIPPED_CONFIGS.glob("*.yaml")} <= set(names)
    assert "headprune/__main__.py" in names and f"headprune-{headprune.__version__}.dist-info/licenses/LICENSE" in names
    assert wheel.name.startswith(f"headprune-{headprune.__version__}-")  # the version is the package's
