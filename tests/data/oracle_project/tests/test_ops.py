from tinycalc import add, clamp, scale


def test_add():
    assert add(2, 3) == 5
    assert add(-1, 1) == 0


def test_scale():
    assert scale([1, 2], 3) == [3, 6]


def test_clamp():
    assert clamp(5, 0, 3) == 3
    assert clamp(-1, 0, 3) == 0
