"""Test setup: 4 fake CPU devices (set before JAX starts) and a small prepared corpus shared by the suite."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ["FEDJAX_CODE_CACHE"] = tempfile.mkdtemp(prefix="fedjax-code-test-cache-")  # runs prepare data here
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A 2 MB corpus of the installed Python sources with a 2,048-token BPE, prepared once."""
    from fedjax_code.config import DataConfig
    from fedjax_code.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    return prepare(DataConfig(max_bytes=2_000_000, vocab_size=2048), out, progress=False)
