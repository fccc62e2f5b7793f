"""`flowsim reproduce`: every reproduction at its quick size asserts its verdicts.

Each experiment runs once through the Python API at its default seed count (exactly what
`flowsim reproduce NAME --quick` runs); the CLI is exercised once on the cheapest one, plus its
error paths.
"""

import json

import pytest

from flowsim import reproduce
from flowsim.cli import main as cli_main

NAMES = ("du2018-fig1", "du2018-fig2", "du2018-thm31", "du2018-thm32", "ji2018-alignment",
         "boursier2022-orthogonal")


def test_registry_lists_every_experiment():
    assert set(reproduce.names()) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_quick_reproduction_passes(name, tmp_path):
    report = reproduce.run(name, tmp_path, quick=True)
    assert report.seeds == reproduce.EXPERIMENTS[name].default_seeds
    failed = [f"{c.name}: {c.measured:.4g} {c.relation} {c.threshold:.4g}"
              for c in report.claims if not c.passed]
    assert not failed, f"{name} quick verdicts failed: {failed}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is True and summary["quick"] is True
    assert summary["seeds"] == reproduce.EXPERIMENTS[name].default_seeds
    assert len(summary["claims"]) >= 3
    for c in summary["claims"]:
        assert {"name", "measured", "relation", "threshold", "passed"} <= set(c)
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)
    assert sorted(p.name for p in pngs) == sorted(summary["figures"])


def test_cli_runs_and_lists(tmp_path, capsys):
    assert cli_main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)
    rc = cli_main(["reproduce", "du2018-thm32", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    seeds = reproduce.EXPERIMENTS["du2018-thm32"].default_seeds
    assert f"{seeds} seeds" in out and "linear_rate" in out and "pass" in out
    assert (tmp_path / "summary.json").exists() and (tmp_path / "thm32.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "no-such-paper", "--quick"], "unknown reproduction"),
    (["reproduce"], "give a reproduction NAME"),
    (["reproduce", "du2018-thm32", "--seeds", "0"], "--seeds"),
])
def test_cli_usage_errors(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_config_overrides_are_checked(tmp_path):
    with pytest.raises(ValueError, match="no setting 'stepz'"):
        reproduce.run("du2018-thm32", tmp_path, quick=True, seeds=2, config={"stepz": 3})
