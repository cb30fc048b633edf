"""The row gather kernel against its reference: exact copies of table rows, on the CPU interpreter and the GPU
(where the table sits in pinned host memory)."""
import pytest
import torch

from pronghorn.kernels.row_gather import gather_rows
from pronghorn.kernels.row_gather.reference import gather_rows_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _host_table(rows, dim, dtype, row_stride=None):
    """A host table (pinned where a GPU exists); ``row_stride`` > dim makes it a column slice of a wider one."""
    g = torch.Generator().manual_seed(rows * 31 + dim)
    full = torch.randn(rows, row_stride or dim, generator=g).to(dtype)
    if torch.cuda.is_available():
        full = full.pin_memory()
    return full[:, :dim]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 1), (37, 7), (50, 4099), (300, 64)])
def test_gather_matches_the_reference(dtype, rows, dim):
    table = _host_table(rows, dim, dtype)
    ids = torch.randint(0, rows, (3, 5), generator=torch.Generator().manual_seed(0))
    out = gather_rows(table, ids.to(_device()))
    assert out.shape == (3, 5, dim) and out.dtype == dtype and out.device.type == _device().type
    torch.testing.assert_close(out.cpu(), gather_rows_reference(table, ids, torch.device("cpu")), atol=0, rtol=0)


def test_strided_table_rows_and_non_contiguous_ids():
    table = _host_table(40, 24, torch.bfloat16, row_stride=40)  # rows 40 apart, 24 used
    assert table.stride() == (40, 1)
    ids = torch.randint(0, 40, (6, 8), generator=torch.Generator().manual_seed(1))[:, ::2].t()
    assert not ids.is_contiguous()
    out = gather_rows(table, ids.to(_device()))
    torch.testing.assert_close(out.cpu(), table[ids], atol=0, rtol=0)


def test_ids_on_the_host_land_on_the_requested_device():
    table = _host_table(10, 16, torch.float32)
    ids = torch.tensor([[9, 0, 3]])
    out = gather_rows(table, ids, _device())
    assert out.device.type == _device().type
    torch.testing.assert_close(out.cpu(), table[ids])


def test_an_id_outside_the_table_gives_a_nan_row_not_a_stray_read():
    table = _host_table(10, 16, torch.float32)
    out = gather_rows(table, torch.tensor([2, 10, -1, 5], device=_device())).cpu()
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    torch.testing.assert_close(out[[0, 3]], table[[2, 5]])


def test_empty_ids_and_bad_arguments():
    table = _host_table(10, 16, torch.float32)
    assert gather_rows(table, torch.zeros(0, 4, dtype=torch.long, device=_device())).shape == (0, 4, 16)
    with pytest.raises(TypeError, match="ids must be integers"):
        gather_rows(table, torch.zeros(3))
    with pytest.raises(ValueError, match="2-D floating-point"):
        gather_rows(torch.zeros(10, dtype=torch.long), torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
def test_a_pinned_host_table_is_read_by_the_kernel_without_a_host_copy():
    """The lookup launches one kernel and no host-to-device copy of the table (the profile has no Memcpy HtoD)."""
    table = _host_table(50_000, 1024, torch.bfloat16)
    assert table.is_pinned()
    ids = torch.randint(0, 50_000, (2, 512), device="cuda")
    gather_rows(table, ids)  # compile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = gather_rows(table, ids)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("gather_rows" in n for n in names), names
    assert not any("Memcpy HtoD" in n for n in names), names
    torch.testing.assert_close(out.cpu(), table[ids.cpu()], atol=0, rtol=0)
