"""The compiled detection core (mypyc, stream_apps/detect/compiled.py): used when built from these sources, never
when stale, and the pure modules it stands in for give the same alerts.

Why: the test run exercises the compiled modules (``make test`` builds them first), so every other test of the
detection core checks the compiled path; the pure path is what runs without a build (a wheel, the image, a
stale build), and a compiled module built from an older source would run old code without saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synthwatch.settings import Settings
from synthwatch.stream_apps.detect import compiled

ROOT = Path(__file__).resolve().parents[2]


def test_the_compiled_core_is_what_the_tests_run() -> None:
    """Every test of the detection core in this run exercises the compiled modules (``make install`` built them)."""
    verdict = compiled.check()
    assert verdict.usable, f"no usable compiled detection core ({verdict.reason or 'not built'}): run `make install`"
    assert compiled.enabled(), f"{compiled.ENVIRONMENT} is off in this test run"
    from synthwatch.stream_apps.detect import alerting, novelty, region, replay, spikes

    for module in (alerting, novelty, region, replay, spikes):
        assert Path(str(module.__file__)).is_relative_to(compiled.BUILD), module.__file__
    assert compiled.in_use()


def _fake_build(tmp_path: Path, sources: Path, suffix: str | None = None) -> Path:
    """A build directory as :func:`compiled.build` leaves it, for ``sources`` (empty files for the binaries)."""
    build = tmp_path / "core"
    for name in compiled.MODULES:
        file = compiled._module_file(build, name)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"")
    shared = f"x__mypyc{compiled._suffix()}"
    (build / "src" / shared).write_bytes(b"")
    manifest = {
        "modules": {name: compiled._digest(sources / f"{name}.py") for name in compiled.MODULES},
        "suffix": suffix or compiled._suffix(),
        "shared": shared,
    }
    (build / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return build


def _sources(tmp_path: Path) -> Path:
    copy = tmp_path / "detect"
    shutil.copytree(compiled.SOURCES, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_a_build_is_used_only_while_every_source_has_the_hash_it_was_built_from(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    build = _fake_build(tmp_path, sources)
    assert compiled.check(build, sources).usable

    region = sources / "region.py"
    region.write_text(region.read_text(encoding="utf-8") + "\n# an edit after the build\n", encoding="utf-8")
    stale = compiled.check(build, sources)
    assert not stale.usable and stale.reason == "region.py changed since it was built"


def test_a_build_for_another_interpreter_or_with_files_missing_is_not_used(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    other = compiled.check(_fake_build(tmp_path / "a", sources, suffix=".cpython-399-x.so"), sources)
    assert not other.usable and other.reason is not None and "another interpreter" in other.reason

    build = _fake_build(tmp_path / "b", sources)
    compiled._module_file(build, "spikes").unlink()
    missing = compiled.check(build, sources)
    assert not missing.usable and missing.reason == "its files are missing (spikes)"

    (build / "manifest.json").write_text("{", encoding="utf-8")
    broken = compiled.check(build, sources)
    assert not broken.usable and broken.reason is not None and broken.reason.startswith("its manifest is unreadable")


def test_no_build_means_pure_python_without_a_word(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compiled.check(tmp_path / "nothing") == compiled.Verdict(False)
    assert compiled.install(tmp_path / "nothing") is False
    assert capsys.readouterr().err == ""


def test_a_stale_build_is_refused_with_one_line_saying_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build = _fake_build(tmp_path, compiled.SOURCES)
    manifest = json.loads((build / "manifest.json").read_text(encoding="utf-8"))
    manifest["modules"]["spikes"] = "0" * 64  # built from another spikes.py
    (build / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    finders = list(sys.meta_path)

    assert compiled.install(build) is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spikes.py changed since it was built" in err and "make install" in err
    assert sys.meta_path == finders  # nothing installed: the pure modules are imported


def test_the_switch_reads_the_usual_spellings_of_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for off in ("0", "false", "No", " off "):
        monkeypatch.setenv(compiled.ENVIRONMENT, off)
        assert not compiled.enabled()
    for on in ("1", "true", "yes"):
        monkeypatch.setenv(compiled.ENVIRONMENT, on)
        assert compiled.enabled()
    monkeypatch.delenv(compiled.ENVIRONMENT)
    assert compiled.enabled()
    # The one settings object documents the switch under the same name and default.
    assert f"SYNTHWATCH_{'compiled_core'.upper()}" == compiled.ENVIRONMENT
    assert Settings.model_fields["compiled_core"].default is True


_PURE_RUN = """
import sys
from synthwatch.settings import Settings
from synthwatch.stream_apps.detect import compiled
from synthwatch.stream_apps.detect.backtest import run_lines
from tests.detect.test_backtest_identical import EXPECTED, _lines, digest

assert not compiled.in_use(), "the pure modules were asked for"
for seed in sorted(EXPECTED):
    lines = _lines(seed)
    got = digest(run_lines((f"sim:{i}", line) for i, line in enumerate(lines)))
    assert got == EXPECTED[seed], (seed, got)
print("pure", sorted(EXPECTED))
"""


@pytest.mark.slow
def test_the_pure_modules_give_the_pinned_alerts_too() -> None:
    """The same pinned digests as tests/detect/test_backtest_identical.py (which runs the compiled core), from the
    pure modules in a fresh interpreter with the compiled core switched off."""
    env = {**os.environ, compiled.ENVIRONMENT: "0"}
    done = subprocess.run(
        [sys.executable, "-c", _PURE_RUN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "pure [1, 2, 3]"
