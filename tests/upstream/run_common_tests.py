"""Runs transformers' own common tests (`ModelTesterMixin`, `ConfigTester`, `ProcessorTesterMixin`) against a tiny
Tuna-2.

The tests come from the source distribution of the installed transformers, downloaded from the package registry
with pip and extracted into a cache folder (nothing of them is kept in this repository):

    python tests/upstream/run_common_tests.py [pytest options]

The source distribution ships `tests/*.py` only. Four modules that `test_modeling_common.py`,
`test_configuration_common.py` and `test_processing_common.py` import are not in it; they are written here as
stand-ins:

- `generation/test_utils.py`: `GenerationTesterMixin` (so the generation tests cannot run: generation is covered by
  tests/test_library_contracts.py and tests/test_modeling_tuna2.py);
- `exporters/test_export.py`: `ExportTesterMixin` (so the `torch.export` tests cannot run);
- `utils/test_configuration_utils.py`: `config_common_kwargs` (read only for configurations without sub-configs;
  Tuna2Config has one);
- the repository's `utils/fetch_hub_objects_for_ci.py`: `url_to_local_path`, which maps the Hub URLs of test media to
  the copies transformers' CI downloads; the stand-in maps an image's URL to a random image of the same name written
  next to it (the tests check shapes and token counts, not pixels) and leaves other URLs (videos, audio) as they are.

`parameterized`, which the common tests need, is installed into the cache folder, not into the environment.
The cache is `$TUNA2_UPSTREAM_CACHE`, by default `~/.cache/tuna2-upstream-tests`; `--refresh` rebuilds it.
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
PACKAGE = "transformers_tests"  # the sdist's tests/, renamed so that it cannot shadow another `tests` package

STAND_INS = {
    "__init__.py": "",
    "generation/__init__.py": "",
    "generation/test_utils.py": (
        '"""Stand-in: the transformers source distribution does not ship tests/generation."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "exporters/__init__.py": "",
    "exporters/test_export.py": (
        '"""Stand-in: the transformers source distribution does not ship tests/exporters."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        '"""Stand-in: the transformers source distribution does not ship tests/utils."""\n\n'
        "config_common_kwargs = {}\n"
    ),
}
# Modules outside the sdist's tests/, by path from the cache folder.
TOP_LEVEL_STAND_INS = {
    "utils/fetch_hub_objects_for_ci.py": '''"""Stand-in: the transformers source distribution does not ship utils/."""

from pathlib import Path

import numpy as np
import PIL.Image

MEDIA = Path(__file__).parent / "media"


def url_to_local_path(url):
    if not url.endswith((".png", ".jpg", ".jpeg")):
        return url
    path = MEDIA / url.rsplit("/", 1)[-1]
    if not path.exists():
        MEDIA.mkdir(exist_ok=True)
        pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(path)
    return str(path)
''',
}
TEST_FILES = ["tuna2_common_tests.py", "tuna2_processor_common_tests.py"]


def prepare(cache: Path, version: str) -> None:
    """Downloads the transformers sdist of `version`, extracts its tests/ into `cache` and installs the tests'
    own requirements there."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            + [f"transformers=={version}", "--dest", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for member in members:
                member.name = member.name[len(prefix) :]
            # The "data" filter (no links out of the folder, no special files) where this Python has it.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(cache / PACKAGE, members=members, **safe)
    stand_ins = {Path(PACKAGE, name): text for name, text in STAND_INS.items()}
    stand_ins.update({Path(name): text for name, text in TOP_LEVEL_STAND_INS.items()})
    for name, text in stand_ins.items():
        path = cache / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(cache / "deps"), "parameterized"],
        check=True,
    )
    (cache / "ready").write_text(version)


def main(argv: list[str]) -> int:
    version = transformers.__version__
    root = Path(os.environ.get("TUNA2_UPSTREAM_CACHE", Path.home() / ".cache" / "tuna2-upstream-tests"))
    cache = root / f"transformers-{version}"
    if "--refresh" in argv or not (cache / "ready").exists():
        argv = [a for a in argv if a != "--refresh"]
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        cache.mkdir(parents=True)
        prepare(cache, version)
    env = dict(os.environ, TUNA2_UPSTREAM_TESTS=str(cache))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cache), str(cache / "deps"), env.get("PYTHONPATH")]))
    # The marks (torch_compile_test, flash_attn_test, ...) are registered by transformers' own conftest, not here.
    command = [sys.executable, "-m", "pytest", *(str(HERE / name) for name in TEST_FILES)]
    command += ["-W", "ignore::pytest.PytestUnknownMarkWarning"]
    command += argv
    return subprocess.run(command, env=env, cwd=HERE.parents[1]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
