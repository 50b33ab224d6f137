import ewc_fast


def test_backends_listed():
    assert "torch" in ewc_fast.available_backends("cpu")
