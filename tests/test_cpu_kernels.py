"""lorakit.cpu_kernels: the compiled kernels build on the machines that run the tests; a build is
announced once, renamed into place whole, and cached per source, torch version and CPU; a failed
build leaves nothing; without a compiler or with LORAKIT_CPU_KERNELS=0 there are none (lorakit then
runs its PyTorch kernels: tests/test_attention.py, tests/test_fused.py). The attention kernel refuses
segments outside the batch, and its own bf16 GEMMs are at least as close to fp64 as oneDNN's. The
loss kernel's cross-entropy and gradient are within a rounding of fp64. The dropout kernel's
keep-mask is SplitMix64's, bit for bit, keeps the asked-for share of elements independently, and
does not depend on the thread count. The rotary-embedding kernel is transformers' formula and autograd's
gradient of it, bit for bit. The LoRA rank-r product kernels round once (x @ A^T) or not at all
(the adapter gradients)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils import cpp_extension

from helpers import splitmix_keep_mask, training_workspace
from lorakit import cpu_kernels
from lorakit.cli import main


def test_compiled_kernels_build_here():
    # these machines have a compiler: the compiled path is the one the other tests exercise
    ops = cpu_kernels.ops()
    assert ops is not None and hasattr(ops, "attention_forward") and hasattr(ops, "attention_backward")


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """An empty kernel cache under tmp_path, and stand-ins for the compiler and the library loader
    that record their calls (builds: the compiler's keyword arguments; loads: library paths)."""
    builds, loads = [], []

    def load(**kwargs):
        builds.append(kwargs)
        (Path(kwargs["build_directory"]) / "lorakit_cpu.so").write_text("built")

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(torch.ops, "load_library", loads.append)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    return builds, loads


def test_a_build_is_announced_once_and_cached(monkeypatch, tmp_path, fake_build):
    builds, loads = fake_build
    said = []
    assert cpu_kernels.ops(announce=said.append) is not None
    library = tmp_path / "kernels" / re.search(r"lorakit_cpu-[0-9a-f]{16}\.so", said[0]).group(0)
    assert said == [f"compiling lorakit's CPU kernels into {library} (once, about 20 s)"]
    assert len(builds) == 1 and "-fopenmp" in builds[0]["extra_cflags"] and builds[0]["is_python_module"] is False
    # built in a private folder, then renamed into place: nothing else is left in the cache
    assert library.read_text() == "built" and sorted(p.name for p in library.parent.iterdir()) == [library.name]
    # later calls in the process reuse it; a new process loads the file without compiling
    cpu_kernels.ops(announce=said.append)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    cpu_kernels.ops(announce=said.append)
    assert len(builds) == 1 and loads == [str(library)] and len(said) == 1
    # another CPU model builds its own (-march=native code must not run on a different CPU)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_cpu_model", lambda: "some other CPU")
    cpu_kernels.ops(announce=said.append)
    assert len(builds) == 2 and len(said) == 2 and str(library) not in said[1]


def test_a_cached_library_others_can_write_is_never_loaded(monkeypatch, tmp_path, caplog, fake_build):
    import os

    builds, loads = fake_build
    old = os.umask(0o002)  # a build under a permissive umask is still private
    try:
        assert cpu_kernels.ops() is not None
    finally:
        os.umask(old)
    library = cpu_kernels._library_path()
    assert (library.stat().st_mode & 0o022, library.parent.stat().st_mode & 0o022) == (0, 0)
    library.chmod(0o666)  # another user of a shared LORAKIT_CACHE could have put their library here
    monkeypatch.setattr(cpu_kernels, "_state", {})
    with caplog.at_level("WARNING", logger="lorakit.cpu_kernels"):
        assert cpu_kernels.ops() is None
    assert f"not loaded: {library} is writable by other users (mode 666)" in caplog.text
    assert loads == [] and len(builds) == 1  # (the build loads its own library through the compiler)
    library.chmod(0o644)
    library.rename(library.with_name("elsewhere.so"))
    library.symlink_to(library.with_name("elsewhere.so"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.ops() is None and f"{library} is a symbolic link" in caplog.text and loads == []


def test_a_library_that_appears_while_waiting_for_the_build_lock_is_checked_too(fake_build, caplog):
    import fcntl
    import threading

    builds, loads = fake_build
    library = cpu_kernels._library_path()
    library.parent.mkdir(parents=True)
    results = []
    with open(library.with_name(f".{library.name}.lock"), "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # someone holds the build lock ...
        waiting = threading.Thread(target=lambda: results.append(cpu_kernels.ops()))
        with caplog.at_level("WARNING", logger="lorakit.cpu_kernels"):
            waiting.start()
            waiting.join(0.5)
            library.write_text("not ours")
            library.chmod(0o666)  # ... and leaves a library anyone could have written
            fcntl.flock(other, fcntl.LOCK_UN)
            waiting.join(30)
    assert results == [None] and loads == [] and builds == []
    assert "is writable by other users (mode 666)" in caplog.text


def test_a_process_waits_for_another_ones_build_and_loads_it(fake_build):
    import fcntl
    import threading

    builds, loads = fake_build
    library = cpu_kernels._library_path()
    library.parent.mkdir(parents=True)
    with open(library.with_name(f".{library.name}.lock"), "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process (a torchrun rank) is building
        waiting = threading.Thread(target=cpu_kernels.ops)
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and builds == []  # it waits rather than compile beside the other
        library.write_text("built")
        fcntl.flock(other, fcntl.LOCK_UN)
    waiting.join(30)
    assert not waiting.is_alive() and builds == [] and loads == [str(library)]
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # the lock file goes with the build


def test_a_failed_build_leaves_nothing_behind(monkeypatch, tmp_path, fake_build):
    def broken_compiler(**kwargs):
        (Path(kwargs["build_directory"]) / "attention_cpu.o").write_text("half done")
        raise RuntimeError("Error building extension 'lorakit_cpu'")

    monkeypatch.setattr(cpp_extension, "load", broken_compiler)
    assert cpu_kernels.ops() is None
    assert list((tmp_path / "kernels").iterdir()) == []


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
    assert cpu_kernels.ops() is None and fake_build == ([], [])


@pytest.mark.parametrize("segment", [(0, 5, 9), (1, 0, 4), (0, 3, 3), (0, -1, 2)])
def test_attention_kernel_refuses_segments_outside_the_batch(segment):
    # the kernel writes where the segments say: out-of-range ones must fail before any write
    ops = cpu_kernels.ops()
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="is empty or outside the \\(1, 8\\) batch"):
        ops.attention_forward(q, k, k, list(segment), 0.5, 64, True)
    out, probs = ops.attention_forward(q, k, k, [0, 0, 8], 0.5, 64, True)
    with pytest.raises(RuntimeError, match="must be \\(B, T, H, D\\)"):
        ops.attention_backward(out[:, :4], q, k, k, out, probs, [0, 0, 8], 0.5, 64, True)


def _per_segment_sdpa(q, k, v, grad, segments, scale):
    """fp64 reference for the attention kernel: causal SDPA over each (row, start, end) segment;
    returns the output and dQ as (B, T, H, D), dK and dV as (B, H_kv, T, D), zero outside segments."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=torch.float64)
    total = 0
    for row, start, end in zip(segments[0::3], segments[1::3], segments[2::3]):
        o = F.scaled_dot_product_attention(
            q[row : row + 1, :, start:end], k[row : row + 1, :, start:end], v[row : row + 1, :, start:end],
            is_causal=True, scale=scale, enable_gqa=True,
        )[0].transpose(0, 1)  # fmt: skip
        out[row, start:end] = o.detach()
        total = total + (o * grad[row, start:end].double()).sum()
    total.backward()
    return out, q.grad.transpose(1, 2), k.grad, v.grad


# the benchmark's layout; odd head dims, block rows and group sizes, and gaps between examples
@pytest.mark.parametrize(
    "batch,heads,kv_heads,length,dim,segments,block_rows",
    [
        (2, 12, 4, 512, 64, [0, 0, 377, 0, 377, 512, 1, 0, 135, 1, 135, 512], 64),
        (1, 6, 2, 77, 16, [0, 0, 77], 7),
        (1, 3, 1, 45, 7, [0, 0, 20, 0, 25, 45], 5),
        (2, 4, 4, 33, 9, [0, 0, 33, 1, 3, 30], 64),
        (1, 2, 1, 19, 64, [0, 0, 19], 1),
    ],
)
def test_attention_kernel_bf16_gemms_close_to_fp64(batch, heads, kv_heads, length, dim, segments, block_rows):
    # lorakit's AVX512-BF16 GEMMs (fp32 sums, each result rounded once) against the fp64 result,
    # next to the same kernel with oneDNN's GEMMs (which round every block product to bf16)
    ops = cpu_kernels.ops()
    if not ops.bf16_gemm_available():
        pytest.skip("this build has no AVX512-BF16 GEMMs (the CPU lacks the instructions)")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, length, heads, dim, generator=gen).transpose(1, 2).bfloat16()
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen).bfloat16() for _ in range(2))
    grad = torch.randn(batch, length, heads, dim, generator=gen).bfloat16()
    scale = dim**-0.5
    inside = torch.zeros(batch, length, dtype=torch.bool)
    for row, start, end in zip(segments[0::3], segments[1::3], segments[2::3]):
        inside[row, start:end] = True
    exact = _per_segment_sdpa(q, k, v, grad, segments, scale)
    errors = {}
    for bf16_gemm in (True, False):
        out, probs = ops.attention_forward(q, k, v, segments, scale, block_rows, bf16_gemm)
        grads = ops.attention_backward(grad, q, k, v, out, probs, segments, scale, block_rows, bf16_gemm)
        results = [out, grads[0], grads[1].transpose(1, 2), grads[2].transpose(1, 2)]
        wants = [exact[0], exact[1], exact[2].transpose(1, 2), exact[3].transpose(1, 2)]
        for name, got, want in zip(("output", "grad q", "grad k", "grad v"), results, wants):
            assert got.dtype == torch.bfloat16
            assert not got[~inside].any(), name  # nothing written outside the segments
            got, want = got[inside].double(), want[inside]
            errors[bf16_gemm, name] = float((got - want).norm() / want.norm())
    for name in ("output", "grad q", "grad k", "grad v"):
        ours, onednn = errors[True, name], errors[False, name]
        assert ours < 6e-3, (name, ours)
        assert ours <= 1.02 * onednn, (name, ours, onednn)


def _cross_entropy_fp64(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Summed cross-entropy (ignore_index -100) and its gradient, in fp64."""
    x = logits.double().requires_grad_(True)
    loss = F.cross_entropy(x, targets, ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.item(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 15, 16, 1000 + 7, 32000])  # below, at and past a 16-lane vector
def test_cross_entropy_kernel_close_to_fp64(dtype, vocab):
    ops = cpu_kernels.ops()
    torch.manual_seed(0)
    logits = (torch.randn(37, vocab) * 4).to(dtype)
    logits[3, : vocab // 2] = -float("inf")  # masked-out vocabulary entries: probability 0, no NaN
    logits[5] += 60.0  # large logits: the row's maximum is taken out before exp
    targets = torch.randint(0, vocab, (37,))
    targets[3] = vocab - 1
    targets[::6] = -100
    want_loss, want_grad = _cross_entropy_fp64(logits, targets)
    block = logits.clone()
    loss = ops.cross_entropy_rows(block, targets, -100, True)
    assert loss.dtype == torch.float32 and abs(loss.item() - want_loss) <= 2e-6 * abs(want_loss) + 1e-6
    # bf16: the fp64 gradient rounded once (within half a unit in the last place); fp32: within the
    # 1e-5 the fused paths are held to (PyTorch's own fp32 softmax is 8e-6 off at vocab 32000). The
    # target's p - 1 is computed in fp32 either way, so 1e-7 absolute on top.
    tol = 2.0**-8 + 1e-6 if dtype == torch.bfloat16 else 1e-5
    assert ((block.double() - want_grad).abs() <= tol * want_grad.abs() + 1e-7).all()
    assert (block[targets == -100] == 0).all()
    # without a gradient the block is left as it was and the loss is the same
    block = logits.clone()
    assert ops.cross_entropy_rows(block, targets, -100, False).item() == loss.item()
    assert torch.equal(block, logits)
    # each row's loss on its own (DPO's per-answer sums), the same rows the total adds up
    rows = ops.cross_entropy_losses(logits.clone(), targets, -100, False)
    want_rows = F.cross_entropy(logits.double(), targets, ignore_index=-100, reduction="none")
    assert rows.dtype == torch.float32 and rows.shape == (37,) and (rows[targets == -100] == 0).all()
    assert ((rows.double() - want_rows).abs() <= 2e-6 * want_rows.abs() + 1e-6).all()
    assert rows.double().sum().float().item() == loss.item()


def test_cross_entropy_kernel_gaps_nan_and_bad_targets():
    ops = cpu_kernels.ops()
    # a logit gap of 300: the target's probability underflows to 0 in fp32, its loss is still exact
    logits = torch.zeros(2, 40)
    logits[:, 0] = 300.0
    loss = ops.cross_entropy_rows(logits.clone(), torch.tensor([1, 0]), -100, False)
    assert abs(loss.item() - _cross_entropy_fp64(logits, torch.tensor([1, 0]))[0]) <= 1e-4
    # a NaN logit makes its row's loss NaN (the trainer stops on a non-finite loss); an ignored row
    # contributes 0 whatever its logits
    logits = torch.randn(3, 40)
    logits[1, 17] = float("nan")
    assert torch.isnan(ops.cross_entropy_rows(logits.clone(), torch.tensor([0, 1, 2]), -100, False))
    assert torch.isfinite(ops.cross_entropy_rows(logits.clone(), torch.tensor([0, -100, 2]), -100, True))
    with pytest.raises(RuntimeError, match="target 40 of row 1 is outside the vocabulary"):
        ops.cross_entropy_rows(logits.clone(), torch.tensor([0, 40, 2]), -100, True)
    with pytest.raises(RuntimeError, match="target -1 of row 0"):
        ops.cross_entropy_rows(logits.clone(), torch.tensor([-1, 0, 2]), -100, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 2, 63, 64, 65, 1000 + 3])  # one pair, a 64-element block and around it
def test_dropout_kernel_is_splitmix64_bit_for_bit(dtype, numel):
    ops = cpu_kernels.ops()
    torch.manual_seed(0)
    x = torch.randn(numel, dtype=dtype) * 3
    seed, keep = 0x1234_5678_9ABC_DEF0, 0.7
    want_kept = splitmix_keep_mask(seed, numel, keep)
    # kept elements are x * scale rounded once to x's dtype, as PyTorch's x * mask * scale rounds
    want = torch.where(want_kept, x * (1 / keep), torch.zeros((), dtype=dtype))
    got = ops.dropout_mask_mul(x, seed, keep, 1 / keep)
    assert got.dtype == dtype and torch.equal(got, want)
    # scale 1: the mask alone; the same seed gives the same mask, another seed another one
    assert torch.equal(ops.dropout_mask_mul(x, seed, keep, 1.0), x * want_kept)
    if numel > 60:
        assert not torch.equal(ops.dropout_mask_mul(x, seed + 1, keep, 1.0), x * want_kept)


def test_dropout_kernel_statistics_threads_and_edges():
    ops = cpu_kernels.ops()
    n = 1 << 22
    ones = torch.ones(n)
    for keep in (0.95, 0.5, 0.1):
        kept = ops.dropout_mask_mul(ones, 7, keep, 1.0).bool()
        sigma = (keep * (1 - keep) / n) ** 0.5
        assert abs(kept.float().mean().item() - keep) < 6 * sigma, keep
        # neighbours (two halves of one 64-bit output, and across outputs) are kept independently
        for a, b in ((kept[0::2], kept[1::2]), (kept[1:-1:2], kept[2::2])):
            both = (a & b).float().mean().item()
            assert abs(both - keep * keep) < 6 * (keep * keep * (1 - keep * keep) / a.numel()) ** 0.5, keep
        # rows of a (T, in) mask are not copies of each other
        rows = kept[: 64 * 768].view(64, 768)
        assert (rows[1:] != rows[:-1]).any(dim=1).all()
    # the same mask on one thread as on two (a function of the element index, not of the split)
    x = torch.randn(3, 100_003, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.dropout_mask_mul(x, 11, 0.9, 1 / 0.9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ops.dropout_mask_mul(x, 11, 0.9, 1 / 0.9))
    # a kept NaN stays NaN; a dropped element is 0, NaN or not (the base layer's output carries it)
    nans = ops.dropout_mask_mul(torch.full((64,), float("nan"), dtype=torch.bfloat16), 3, 0.5, 2.0)
    kept = splitmix_keep_mask(3, 64, 0.5)
    assert torch.isnan(nans[kept]).all() and (nans[~kept] == 0).all() and 0 < kept.sum() < 64
    for keep in (0.0, 1.0, 1.5):
        with pytest.raises(RuntimeError, match="keep must be in"):
            ops.dropout_mask_mul(x, 1, keep, 1.0)


def _rope_formula(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' Llama rotary embedding, op for op: x * cos + rotate_half(x) * sin
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, heads, tokens, dim, cos_batch, layout",
    [
        (2, 4, 40, 64, 2, "projection"),  # 320 rows: more than one parallel chunk; q as attention layers see it
        (3, 2, 5, 6, 1, "contiguous"),  # cos and sin shared by the batch
        (1, 3, 7, 2, 1, "projection"),  # the smallest head dim
        (2, 2, 9, 8, 2, "head_dim_strided"),  # last dimension not contiguous: copied first
        (2, 3, 5, 8, 2, "expanded"),  # broadcast over batch, heads and tokens (a gradient of a sum)
    ],
)
def test_rope_kernel_is_the_transformers_formula_bit_for_bit(dtype, batch, heads, tokens, dim, cos_batch, layout):
    ops = cpu_kernels.ops()
    gen = torch.Generator().manual_seed(0)
    if layout == "projection":  # (B, T, H*D) viewed as (B, T, H, D) and transposed to (B, H, T, D)
        x = torch.randn(batch, tokens, heads * dim, generator=gen).mul_(3).to(dtype).view(batch, tokens, heads, dim).transpose(1, 2)
    elif layout == "contiguous":
        x = torch.randn(batch, heads, tokens, dim, generator=gen).mul_(3).to(dtype)
    elif layout == "head_dim_strided":
        x = torch.randn(batch, heads, dim, tokens, generator=gen).mul_(3).to(dtype).transpose(2, 3)
    else:
        x = torch.randn(1, 1, 1, dim, generator=gen).mul_(3).to(dtype).expand(batch, heads, tokens, dim)
    cos, sin = (torch.randn(cos_batch, tokens, dim, generator=gen).to(dtype) for _ in range(2))
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    if layout == "expanded":
        grad = grad[:1, :1, :1].expand(x.shape)
    leaf = x.detach().requires_grad_(True)
    want = _rope_formula(leaf, cos.unsqueeze(1), sin.unsqueeze(1))
    want.backward(grad)
    got = ops.rope(x, cos, sin, False)
    assert torch.equal(got, want) and got.dtype == dtype
    if layout in ("projection", "contiguous"):
        assert got.stride() == x.stride()  # the projection's layout kept
    assert torch.equal(ops.rope(grad, cos, sin, True), leaf.grad)  # autograd's rounding, bit for bit


def test_rope_kernel_refuses_what_it_does_not_compute():
    ops = cpu_kernels.ops()
    x = torch.randn(1, 2, 4, 6)
    cos = torch.randn(1, 4, 6)
    for bad, message in (
        ((torch.randn(1, 2, 4, 5), torch.randn(1, 4, 5), torch.randn(1, 4, 5)), "head_dim must be even"),
        ((x, torch.randn(1, 3, 6), torch.randn(1, 3, 6)), "must be \\(batch or 1, tokens, head_dim\\)"),
        ((x, cos, torch.randn(1, 4, 4)), "cos and sin must be"),
        ((x, cos.double(), cos.double()), "cos and sin must have x's dtype"),
        ((x.half(), cos.half(), cos.half()), "float32 or bfloat16 only"),
    ):
        with pytest.raises(RuntimeError, match=message):
            ops.rope(*bad, False)


def _bf16_ops():
    ops = cpu_kernels.bf16_ops()
    if ops is None:
        pytest.skip("this build has no AVX512-BF16 kernels (the CPU lacks the instructions)")
    return ops


@pytest.mark.parametrize(
    "tokens,width,rank,layout",
    [
        (1024, 768, 16, "a_t"),  # the benchmark's q projection: x @ A^T
        (1024, 2048, 16, "b"),  # g @ B of gate/up, B (out, r) row-major
        (513, 257, 17, "a_t"),  # odd tokens, odd width, a rank past one vector
        (37, 5, 3, "b"),
        (64, 100, 64, "strided"),  # the largest rank; x with row padding
        (1, 16, 1, "a_t"),
    ],
)
def test_lora_products_close_to_fp64(tokens, width, rank, layout):
    # lora_project: x @ W rounded once to bf16 (within half a bf16 unit of the fp64 result, as a
    # single rounding is); lora_outer: scale · left^T @ right in fp32, far closer to fp64 than the
    # bf16 matmul it replaces (which rounds the sums to bf16)
    ops = _bf16_ops()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width + (7 if layout == "strided" else 0), generator=gen).bfloat16()[:, :width]
    if layout == "a_t":
        weight = torch.randn(rank, width, generator=gen).bfloat16().t()  # A^T: a view, stride (1, width)
    else:
        weight = torch.randn(width, rank, generator=gen).bfloat16()
    exact = x.double() @ weight.double()
    got = ops.lora_project(x, weight)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, rank)
    # a bf16 value's neighbour is 2^-7 of its power of two away: at most half of that off
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30).float().mean() > 0.99
    assert float((got.double() - exact).norm() / exact.norm()) < 2e-3

    left = torch.randn(tokens, rank, generator=gen).bfloat16()
    exact = 0.25 * left.double().t() @ x.double()
    got = ops.lora_outer(left, x, 0.25)
    assert got.dtype == torch.float32 and got.shape == (rank, width)
    error = float((got.double() - exact).norm() / exact.norm())
    matmul = float(((0.25 * (left.t() @ x)).double() - exact).norm() / exact.norm())
    assert error < 1e-6 and error < matmul / 100


def test_lora_products_refuse_what_they_do_not_compute():
    ops = _bf16_ops()
    x = torch.randn(8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="rank above 64"):
        ops.lora_project(x, torch.randn(32, 65).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        ops.lora_outer(torch.randn(8, 4), x, 1.0)
    with pytest.raises(RuntimeError, match="left .T, r., right .T, N."):
        ops.lora_outer(torch.randn(7, 4).bfloat16(), x, 1.0)
    # no rows: zeros of the right shapes
    assert ops.lora_project(x[:0], torch.randn(32, 4).bfloat16()).shape == (0, 4)
    assert not ops.lora_outer(torch.randn(0, 4).bfloat16(), x[:0], 1.0).any()


def test_a_run_builds_the_kernels_said_aloud_and_after_the_data_checks(monkeypatch, tmp_path, capsys):
    root = training_workspace(tmp_path, train=16, eval=4)
    calls = []
    real_ops = cpu_kernels.ops

    def recorded(announce=None):
        calls.append(announce)
        return real_ops(announce)

    monkeypatch.setattr(cpu_kernels, "ops", recorded)
    cfg = {"model": str(root / "model"), "output_dir": str(tmp_path / "run"), "lora": {"r": 2},
           "data": {"max_length": 32}, "train": {"max_steps": 1, "precision": "fp32"}}  # fmt: skip
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = ["train", str(root / "cfg.yaml")]
    # a mistake in the data is said before the kernels' first build, which could take a while
    (root / "bad.jsonl").write_text('{"nothing": 1}\n')
    assert main([*args, f"data.train={root / 'bad.jsonl'}"]) == 2
    assert calls == [] and "bad.jsonl:1" in capsys.readouterr().err
    # the run's first use of the kernels (the large-block cache's) is the one that would announce a build
    assert main([*args, f"data.train={root / 'train.jsonl'}"]) == 0
    assert calls and calls[0] is not None
