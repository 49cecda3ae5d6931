"""Shared fixtures: tiny random models and tokenizers (tests/tiny.py), never the network."""

import os
import tempfile
import sys
from pathlib import Path

import pytest

# Tests mirror the package (tests/data, tests/losses, tests/train, tests/evaluate, tests/ship) and
# share helpers by module name (from test_loop import run_args): every folder is importable.
for folder in [Path(__file__).parent, *sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir())]:
    sys.path.insert(0, str(folder))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails fast
# Tiny models gain nothing from a second thread, and two threads fighting another process on a
# 2-core machine made the suite 4-6x slower; subprocess tests inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# train.mixed_precision=auto picks bf16 on CPUs with AVX512-BF16 / AMX: pin the answer to "no native
# bf16" so that every test computes the same on every CPU (test_precision checks both answers).
os.environ["SLIMTUNE_CPU_BF16"] = "0"
# Sources and rendered examples are cached on disk: keep the tests' copies out of the user's cache.
os.environ.setdefault("SLIMTUNE_DATA_CACHE", tempfile.mkdtemp(prefix="slimtune-test-data-"))
os.environ.setdefault("SLIMTUNE_STATES_CACHE", tempfile.mkdtemp(prefix="slimtune-test-states-"))

from tiny import make_tokenizer, save_tiny  # noqa: E402


@pytest.fixture(scope="session", params=["chatml", "llama3", "default_system", "chatml_gen"])
def family_tokenizer(request):
    """Each chat-template family in turn (see tiny.py)."""
    return make_tokenizer(request.param)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer("chatml")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny Llama + ChatML tokenizer folder, loadable by path."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", "chatml")


@pytest.fixture
def gen_cache(monkeypatch, tmp_path):
    """A fresh, empty slimtune cache (base answers of evaluate/base_vs_tuned.py land here)."""
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fresh_accelerate_state():
    """TRL's trainers set up accelerate's process-wide state; slimtune's loop sets its own: reset it
    after each test that builds a TRL trainer (`pytestmark = pytest.mark.usefixtures(...)`)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
