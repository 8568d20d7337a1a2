"""lorakit.cpu_kernels: the compiled kernels build on the machines that run the tests; a build is
announced once and cached per source, torch version and CPU; without a compiler or with
LORAKIT_CPU_KERNELS=0 there are none (lorakit then runs its PyTorch kernels: tests/test_attention.py)."""

from __future__ import annotations

import re

import pytest
from torch.utils import cpp_extension

from lorakit import cpu_kernels


def test_compiled_kernels_build_here():
    # these machines have a compiler: the compiled path is the one the other tests exercise
    ops = cpu_kernels.ops()
    assert ops is not None and hasattr(ops, "attention_forward") and hasattr(ops, "attention_backward")


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """An empty kernel cache under tmp_path and a stand-in for the compiler that records its calls."""
    builds = []

    def load(**kwargs):
        builds.append(kwargs)
        (tmp_path / "kernels" / kwargs["build_directory"].rsplit("/", 1)[-1] / "lorakit_cpu.so").touch()

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    return builds


def test_a_build_is_announced_once_and_cached(monkeypatch, tmp_path, fake_build):
    said = []
    assert cpu_kernels.ops(announce=said.append) is not None
    assert len(fake_build) == 1 and len(said) == 1
    directory = fake_build[0]["build_directory"]
    assert re.fullmatch(re.escape(str(tmp_path / "kernels")) + r"/lorakit_cpu-[0-9a-f]{16}", directory)
    assert said[0] == f"compiling lorakit's CPU kernels into {directory} (once, about 20 s)"
    assert "-fopenmp" in fake_build[0]["extra_cflags"] and fake_build[0]["is_python_module"] is False
    # later calls in the process reuse it; a new process finds the built library and says nothing
    cpu_kernels.ops(announce=said.append)
    assert len(fake_build) == 1
    monkeypatch.setattr(cpu_kernels, "_state", {})
    cpu_kernels.ops(announce=said.append)
    assert len(said) == 1 and fake_build[1]["build_directory"] == directory
    # another CPU model builds its own (-march=native code must not run on a different CPU)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_cpu_model", lambda: "some other CPU")
    cpu_kernels.ops(announce=said.append)
    assert len(said) == 2 and fake_build[2]["build_directory"] != directory


def test_without_a_compiler_there_are_no_kernels(monkeypatch, caplog, fake_build):
    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with caplog.at_level("WARNING", logger="lorakit.cpu_kernels"):
        assert cpu_kernels.ops() is None
        assert cpu_kernels.ops() is None
    assert caplog.text.count("could not be built (Ninja is required to load C++ extensions)") == 1


def test_switched_off(monkeypatch, fake_build):
    monkeypatch.setenv("LORAKIT_CPU_KERNELS", "0")
    assert cpu_kernels.ops() is None and not fake_build
