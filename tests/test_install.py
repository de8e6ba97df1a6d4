"""A non-editable install ships the configs: the app runs from another folder without the checkout."""
from __future__ import annotations

import subprocess

from tests.conftest import PYTHON, REPO, TINY, subprocess_env


def test_non_editable_install_runs_from_another_directory(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run(
        [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(REPO)],
        capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )
    assert build.returncode == 0, build.stderr
    assert (site / "initsearch" / "conf" / "config.yaml").is_file()
    assert (site / "initsearch" / "conf" / "study" / "cifar_cnn.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = subprocess_env()
    env["PYTHONPATH"] = str(site)
    where = subprocess.run([PYTHON, "-c", "import initsearch; print(initsearch.__file__)"], capture_output=True, text=True, cwd=work, env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout
    cfg = subprocess.run([PYTHON, "-m", "initsearch", "study=cifar_cnn", "--cfg", "job"], capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert cfg.returncode == 0, cfg.stderr
    assert "study_name: cifar_cnn" in cfg.stdout
    run = subprocess.run([PYTHON, "-m", "initsearch", *TINY, "study_name=installed"], capture_output=True, text=True, cwd=work, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "best policy:" in run.stdout and (work / "initsearch.journal").exists()
