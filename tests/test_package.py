"""The package layout: `thresher.<folder>` imports, and the stdlib `selectors` is never shadowed."""

import subprocess
import sys

CARD_FOLDERS = ("flows", "selectors", "generators", "filters", "schemas")


def test_card_folders_are_namespace_subpackages(repo_root):
    for folder in CARD_FOLDERS:
        assert (repo_root / folder).is_dir()
        assert not (repo_root / folder / "__init__.py").exists(), (
            f"{folder}/__init__.py would make a top-level package that can shadow the standard library")


def test_stdlib_selectors_not_shadowed_from_repo_root(repo_root):
    # `python -m pytest` puts the repo root on sys.path: asyncio must still get the stdlib module.
    code = (
        "import sys; sys.path.insert(0, '.');"
        "import selectors, asyncio; assert hasattr(selectors, 'DefaultSelector'), selectors.__file__;"
        "asyncio.run(asyncio.sleep(0));"
        "import thresher.selectors.select, thresher.flows.curate; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_subpackages_import_as_thresher_folders():
    import thresher.filters.validate as validate
    import thresher.schemas.records as records

    assert validate.ValidateStage.name == "validate"
    assert records.RECORD_SCHEMA.names[0] == "row_id"
