"""The package as users get it: `pip install .` with pip's default flags, from the files a clean
clone has, into a fresh venv that already has torch; then the loss from the installed copy."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from directclr import infonce, infonce_reference, native
from directclr.spectrum import centered_gram
from tests.helpers import ROOT

SITE = Path(torch.__file__).resolve().parents[1]  # .venv's site-packages: torch and the rest

USE_INSTALLED = """
import json, sys, torch, directclr
from directclr import native
z1, z2 = (torch.randn(48, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
          for s in (1, 2))
loss = directclr.infonce(z1, z2, dim=12)
reference = directclr.infonce_reference(z1, z2, dim=12).mean()
try:
    import kernels
    top_level_kernels = kernels.__file__
except ModuleNotFoundError:
    top_level_kernels = None
print(json.dumps({"file": directclr.__file__, "loss": loss.item(), "reference": reference.item(),
                  "native": native._loaded and str(native._loaded),
                  "triton_kernels": directclr.kernels.__file__,
                  "top_level_kernels": top_level_kernels}))
"""


def _clean_clone_files(dest: Path) -> None:
    """What `git clone` of this tree would hold, with the uncommitted edits: tracked and
    untracked-but-not-ignored files (so no .venv, no build outputs), links kept as links."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = ROOT / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)


def _run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv whose site-packages sees .venv's packages (torch...) but not directclr, and
    directclr installed into it by `pip install <clone>` with pip's default flags."""
    work = tmp_path_factory.mktemp("install")
    clone = work / "clone"
    _clean_clone_files(clone)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    with_torch, torch_alone = work / "with-torch", work / "torch-alone"
    for view in (with_torch, torch_alone):
        view.mkdir()
    for entry in SITE.iterdir():  # every package but this one (its editable hook included)
        if "directclr" not in entry.name and not entry.name.endswith(".pth"):
            os.symlink(entry, with_torch / entry.name)
            if not entry.name.startswith("torchvision"):  # a user with torch alone
                os.symlink(entry, torch_alone / entry.name)
    venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True).stdout.strip())
    # pip's default flags: this machine's index and certificate settings stay, nothing that
    # would change how the package builds
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PIP_NO_BUILD_ISOLATION", "PIP_NO_DEPS",
                        "PIP_USE_PEP517", "PIP_EDITABLE")}
    # What pip would install as a user's first command: the package beside torch alone, and
    # its [train] extra beside the torch + torchvision pair installed first.
    for extra, view in (("", torch_alone), ("[train]", with_torch)):
        (venv_site / "with-torch.pth").write_text(f"{view}\n")
        report = work / f"plan{extra}.json"
        plan = _run([str(python), "-m", "pip", "install", "-q", "--dry-run", "--report",
                     str(report), f"{clone}{extra}"], env=env, cwd=work)
        assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    pip = _run([str(python), "-m", "pip", "install", "-q", str(clone)], env=env, cwd=work)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    shutil.rmtree(clone)  # the installed copy must not lean on the source tree
    return work, venv, env


def _use(installed, **env_changes):
    work, venv, env = installed
    result = _run([str(venv / "bin" / "python"), "-c", USE_INSTALLED], cwd=work,
                  env={**env, **env_changes})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_installed_copy_builds_its_cpu_kernels_and_gives_the_exact_loss(installed):
    work, venv, _ = installed
    seen, log = _use(installed, DIRECTCLR_NATIVE_CACHE=str(work / "native"))
    assert seen["file"].startswith(str(venv))
    assert seen["triton_kernels"].startswith(str(venv))
    assert seen["top_level_kernels"] is None  # no top-level `kernels` package installed
    assert seen["native"] and seen["native"].startswith(str(work / "native"))
    assert "building directclr's C++ CPU kernels" in log
    assert seen["loss"] == pytest.approx(seen["reference"], rel=1e-12, abs=0)
    again, log = _use(installed, DIRECTCLR_NATIVE_CACHE=str(work / "native"))
    assert again["native"] == seen["native"] and "building" not in log  # cached


def test_installed_copy_without_a_compiler_says_so_in_one_line_and_still_works(installed):
    work, _, _ = installed
    seen, log = _use(installed, DIRECTCLR_NATIVE_CACHE=str(work / "no-compiler"),
                     CXX="no-such-compiler")
    assert seen["native"] is None
    warnings = [line for line in log.splitlines() if "C++ CPU kernels" in line]
    assert len(warnings) == 1, log
    assert "C++20 compiler" in warnings[0] and "plain PyTorch" in warnings[0]
    assert seen["loss"] == pytest.approx(seen["reference"], rel=1e-12, abs=0)


def test_info_lists_the_backends_and_the_fix_for_each_missing_one(installed):
    work, venv, env = installed
    info = _run([str(venv / "bin" / "directclr"), "info"], cwd=work, env=env)
    assert info.returncode == 0, info.stderr
    for backend in ("C++ CPU kernels", "Triton on CUDA", "TRITON_INTERPRET", "DALI loader"):
        assert backend in info.stdout
    assert f"torch                  {torch.__version__}" in info.stdout
    broken = _run([str(venv / "bin" / "directclr"), "info", "--build"], cwd=work,
                  env={**env, "CXX": "no-such-compiler",
                       "DIRECTCLR_NATIVE_CACHE": str(work / "info-no-compiler")})
    assert broken.returncode == 1
    assert ("[ ] C++ CPU kernels    directclr's C++ CPU kernels need a C++20 compiler"
            in broken.stdout)


@pytest.mark.parametrize("variant", ["cross", "ntxent"])
def test_pytorch_fallback_equals_the_cpp_kernels(variant):
    native.load()
    gen = torch.Generator().manual_seed(3)
    z1, z2 = (torch.randn(40, 24, dtype=torch.float64, generator=gen) for _ in range(2))
    z1[3] *= 2.0**600  # scaled by a power of two in either's subvectors (kernels/cpu/rows.cpp)
    z2[5, :16] = 0.0  # under the norm floor: a zero gradient
    weights = torch.rand(40, dtype=torch.float64, generator=gen)
    results = []
    for available in (True, False):
        with mock.patch.object(native, "available", lambda: available):
            a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
            loss = infonce(a, b, dim=16, variant=variant, reduction="none")
            loss.backward(weights)
            gram = centered_gram(z1, z1.mean(0))
            results.append((loss.detach(), a.grad, b.grad, *gram))
    for cpp, fallback in zip(*results):
        torch.testing.assert_close(fallback, cpp, rtol=1e-12, atol=1e-14)
    reference = infonce_reference(z1, z2, dim=16, variant=variant)
    torch.testing.assert_close(results[1][0], reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("extra", ["", "[train]"])
def test_install_never_replaces_torch(installed, extra):
    """Beside an installed torch (and torchvision, for [train]), pip plans no torch,
    torchvision, triton or nvidia-* package: a torchvision in the core dependencies, or an
    unbounded one, would pull the newest torch, a CUDA build of several GB, over the user's."""
    work, _, _ = installed
    planned = [item["metadata"]["name"].lower()
               for item in json.loads((work / f"plan{extra}.json").read_text())["install"]]
    assert "directclr" in planned
    replaced = [name for name in planned if name in ("torch", "torchvision", "triton")
                or name.startswith("nvidia")]
    assert not replaced, planned


def test_info_survives_a_torchvision_built_for_another_torch(installed, tmp_path):
    """A torchvision that fails inside its own import (as a build for another torch does:
    "operator torchvision::nms does not exist") is one line in `info`, which goes on, and one
    line from the commands that need it, before anything is made."""
    work, venv, env = installed
    fake = tmp_path / "fake"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    (fake / "torchvision-0.99.0.dist-info").mkdir()
    (fake / "torchvision-0.99.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
    broken = {**env, "PYTHONPATH": str(fake)}
    directclr = str(venv / "bin" / "directclr")
    info = _run([directclr, "info"], cwd=work, env=broken)
    assert info.returncode == 0 and "Traceback" not in info.stderr, info.stderr
    (line,) = [row for row in info.stdout.splitlines() if "training stack" in row]
    assert "[ ]" in line and "torchvision 0.99.0 does not work with torch" in line
    assert "C++ CPU kernels" in info.stdout  # and the report went on
    out = tmp_path / "run"
    run = _run([directclr, "pretrain", "--data", str(tmp_path), "--out", str(out)], cwd=work,
               env=broken)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "torchvision 0.99.0 does not work" in run.stderr and not out.exists()


def quickstart_commands() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- quickstart -->", 1)[1].split("<!-- /quickstart -->", 1)[0]
    return block.split("```bash\n", 1)[1].split("```", 1)[0]


def test_readme_quick_start_runs_verbatim(installed, tmp_path):
    """README's quick start, as written, with the installed `directclr` on PATH, in an empty
    folder; what each command promises is there afterwards."""
    _, venv, env = installed
    script = tmp_path / "quickstart.sh"
    script.write_text("set -euo pipefail\n" + quickstart_commands())
    path = f"{venv / 'bin'}:{env.get('PATH', '')}"
    done = _run(["bash", str(script)], cwd=tmp_path, env={**env, "PATH": path})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "quick"
    for name in ("backbone.pt", "metrics.jsonl", "probe-backbone.json", "spectrum.json",
                 "spectrum.png", "loss.png", "lr.png", "probe.png", "rank.png"):
        assert (run / name).is_file(), name
    probe = json.loads((run / "probe-backbone.json").read_text())
    assert probe["top1_best"] > 0.5  # 4 classes: well above chance (25%)
    assert "d0 = 45" in done.stderr and "wrote " + str(Path("runs/quick/probe-backbone.json")) \
        in done.stdout


def test_a_checkout_on_pythonpath_imports_the_kernels_under_the_installed_name(installed):
    """kernels/ is installed as directclr.kernels (package-dir, no link in the tree); a checkout
    used without installing, as on a GPU host with a fixed image, imports the same names."""
    work, venv, env = installed
    probe = ("import directclr.kernels.infonce as k, directclr.kernels.cpu as c, json; "
             "print(json.dumps([k.__file__, list(c.__path__)]))")
    seen = _run([str(venv / "bin" / "python"), "-c", probe], cwd=work,
                env={**env, "PYTHONPATH": str(ROOT)})
    assert seen.returncode == 0, seen.stderr[-2000:]
    infonce_file, cpu_path = json.loads(seen.stdout)
    assert infonce_file == str(ROOT / "kernels" / "infonce.py")
    assert cpu_path == [str(ROOT / "kernels" / "cpu")]
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, check=True, text=True,
                            capture_output=True).stdout.splitlines()
    assert not [line for line in staged if line.startswith("120000")]  # no link in the tree
