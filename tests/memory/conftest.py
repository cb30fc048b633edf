"""Fixtures shared by the memory tests."""
import pytest


@pytest.fixture
def cudnn_attention_at_once(monkeypatch):
    """Graph warm-ups and captures take cuDNN attention at once (pronghorn.nn.attention.graph_capture_calls); eager
    calls in a test that compares with them do too, rather than after CUDNN_AFTER_CALLS calls of a shape, so both
    come from the same attention kernel."""
    from pronghorn.nn import attention

    monkeypatch.setattr(attention, "CUDNN_AFTER_CALLS", 0)
