"""lorakit.cpu_math: oneMKL's vector-math functions are each called once, single-threaded, before the
first model is loaded."""

import re
from pathlib import Path

import pytest
import torch

from helpers import save_model_folder, tiny_llama
from lorakit import cpu_math

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without oneMKL")


def _header_functions() -> set[str]:
    header = Path(torch.__file__).parent / "include" / "ATen" / "cpu" / "vml.h"
    if not header.exists():
        pytest.skip("this torch ships no ATen headers")
    # IMPLEMENT_VML_MKL(cos, Cos) at the start of a line; the commented-out ones are not compiled
    return set(re.findall(r"^IMPLEMENT_VML_MKL\((\w+),", header.read_text(), flags=re.MULTILINE))


@needs_mkl
def test_the_list_is_the_installed_torchs():
    # a torch that sends another function to oneMKL (or stops sending one) shows here
    assert set(cpu_math.VML_FUNCTIONS) == _header_functions()


@needs_mkl
def test_settling_calls_every_function_in_both_dtypes_on_one_element(monkeypatch):
    monkeypatch.setattr(cpu_math, "_settled", False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        assert cpu_math.settle_vector_math() is True
    called = {(e.name, e.input_shapes[0][0] if e.input_shapes and e.input_shapes[0] else None) for e in prof.events()}
    for name in cpu_math.VML_FUNCTIONS:
        # one call a dtype, each on a single element, so that oneMKL runs it on this thread alone
        assert (f"aten::{name}", 1) in called, name
    names = [e.name for e in prof.events() if e.name.removeprefix("aten::") in cpu_math.VML_FUNCTIONS]
    assert len(names) == 2 * len(cpu_math.VML_FUNCTIONS)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as again:
        assert cpu_math.settle_vector_math() is True
    assert not [e for e in again.events() if e.name.removeprefix("aten::") in cpu_math.VML_FUNCTIONS]  # once a process


def test_without_onemkl_nothing_is_called(monkeypatch):
    monkeypatch.setattr(cpu_math, "_settled", False)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert cpu_math.settle_vector_math() is False
    assert not [e for e in prof.events() if e.name.removeprefix("aten::") in cpu_math.VML_FUNCTIONS]


def test_both_model_loaders_settle_before_the_model_exists(tmp_path, monkeypatch):
    from lorakit import models, quant

    folder = save_model_folder(tmp_path / "model", tiny_llama())
    seen = []
    monkeypatch.setattr(models, "settle_vector_math", lambda: seen.append("load_model"))
    monkeypatch.setattr(quant, "settle_vector_math", lambda: seen.append("load_model_4bit"))
    models.load_model(folder)
    quant.load_model_4bit(folder, compute_dtype=torch.float32)
    assert seen == ["load_model", "load_model_4bit"]
