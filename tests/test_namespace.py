"""The project installs under one import namespace, `curvtrain.*`, so it lives beside other packages
named `distributed` (Dask), `models` or `optim`: both import, and the bare folder names are not ours."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

OURS = ("launcher", "distributed", "optim", "models")


def run_outside_checkout(code: str, tmp_path: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """Python in a folder outside the repository, so only the installed packages are importable."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_bare_folder_names_are_not_installed(tmp_path):
    result = run_outside_checkout(f"""
        import importlib.util
        import curvtrain.launcher.cli, curvtrain.distributed.config, curvtrain.optim, curvtrain.models.llama
        print([n for n in {OURS!r} if importlib.util.find_spec(n) is not None])
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_conflicting_top_level_distributed_package_imports_beside_ours(tmp_path):
    """A stand-in for Dask's `distributed` (and other packages' `models`, `optim`) on sys.path first."""
    site = tmp_path / "site"
    for name in OURS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'other {name}'\n")
    result = run_outside_checkout("""
        import distributed, models, optim, launcher
        from curvtrain.distributed.config import TrainConfig
        from curvtrain.optim import OptimizerConfig
        from curvtrain.models.llama import llama_config
        cfg = TrainConfig()
        print(distributed.WHO, models.WHO, optim.WHO, launcher.WHO, cfg.optimizer.name, llama_config("tiny").hidden_size)
    """, tmp_path, extra_path=site)
    assert result.returncode == 0, result.stderr
    *others, optimizer, hidden = result.stdout.split()
    assert others == ["other", "distributed", "other", "models", "other", "optim", "other", "launcher"]
    assert optimizer == "adamw" and int(hidden) > 0
