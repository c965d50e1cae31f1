"""Fixtures of the integration tier: the sample reference documents and a migrated chDB store per test."""

from pathlib import Path

import pytest

from tally.config import load_settings
from tally.reference import load_reference_files
from tally.store import Store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "reference"


@pytest.fixture(scope="module")
def docs():
    return load_reference_files(sorted(EXAMPLES.glob("*.yaml")))


@pytest.fixture
def store(tmp_path):
    s = Store(load_settings(env={}, data_dir=tmp_path))
    s.migrate()
    yield s
    s.close()
