import pytest

from helpers import mixed_layout, random_predictor
from nern_fast import BackendUnavailable, ops
from nern_fast.ops import dispatch


class RefusingBackend:
    name = "refuser"

    def unavailable_reason(self, request):
        return "it never decodes"

    def decode(self, *a):
        raise AssertionError("must not be called")


class CountingBackend:
    name = "counter"

    def __init__(self):
        self.calls = 0

    def unavailable_reason(self, request):
        return None if request.device_type == "cpu" else "cpu only"

    def decode(self, weights, biases, layout, encoding, rows, precision):
        self.calls += 1
        return ops.get_backend("eager").decode(weights, biases, layout, encoding, rows, precision)


@pytest.fixture
def registry():
    saved = list(dispatch._BACKENDS), dict(dispatch._LOAD_ERRORS)
    yield
    dispatch._BACKENDS[:] = saved[0]
    dispatch._LOAD_ERRORS.clear()
    dispatch._LOAD_ERRORS.update(saved[1])


def test_auto_falls_back_past_a_refusing_backend(registry):
    ops.register_backend(RefusingBackend(), priority=-2)
    counter = CountingBackend()
    ops.register_backend(counter, priority=-1)
    pred = random_predictor(mixed_layout())
    pred.decode_flat()
    assert counter.calls == 1


def test_named_backend_raises_with_reason(registry, monkeypatch):
    ops.register_backend(RefusingBackend(), priority=-2)
    pred = random_predictor(mixed_layout(), backend="refuser")
    with pytest.raises(BackendUnavailable, match="it never decodes"):
        pred.decode_flat()
    pred.backend = "no-such-backend"
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        pred.decode_flat()


def test_environment_variable_overrides_auto(registry, monkeypatch):
    counter = CountingBackend()
    ops.register_backend(counter, priority=200)  # last in auto order
    pred = random_predictor(mixed_layout())
    pred.decode_flat()
    assert counter.calls == 0
    monkeypatch.setenv(ops.ENV_BACKEND, "counter")
    pred.decode_flat()
    assert counter.calls == 1
    pred.backend = "eager"  # an explicit argument beats the variable
    pred.decode_flat()
    assert counter.calls == 1


def test_precedence_given_now_then_variable_then_file(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    assert ops.requested_backend_name("triton", from_file=True) == "triton"
    assert ops.requested_backend_name("auto", from_file=True) == "auto"
    monkeypatch.setenv(ops.ENV_BACKEND, "csrc")
    assert ops.requested_backend_name("triton", from_file=True) == "csrc"  # the variable beats the file
    assert ops.requested_backend_name("eager") == "eager"  # a name given now beats the variable
    assert ops.requested_backend_name("auto") == "csrc"


def test_refusal_says_how_to_choose_another_backend(registry, monkeypatch):
    """Not only the refusing backend's own advice (Triton's "move the predictor to CUDA", useless
    on a CPU-only machine): the backends that can take the call, and where to name one."""
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    ops.register_backend(RefusingBackend(), priority=-2)
    ops.register_backend(CountingBackend(), priority=-1)
    pred = random_predictor(mixed_layout(), backend="refuser")
    with pytest.raises(BackendUnavailable) as info:
        pred.decode_flat()
    message = str(info.value)
    assert message.startswith("backend 'refuser' cannot decode this call: it never decodes. ")
    assert "choose another backend: backend='counter' or " in message and "'eager'" in message
    assert "'refuser' or" not in message and ops.ENV_BACKEND in message


def test_unloadable_backend_reports_reason(registry):
    dispatch.record_load_error("ghost", "missing dependency 'ghostlib'")
    with pytest.raises(BackendUnavailable, match="ghostlib"):
        ops.get_backend("ghost")
    pred = random_predictor(mixed_layout())
    req = ops.make_request(pred.weights(), pred.layout, pred.encoding, None, "fp32")
    assert "ghostlib" in ops.availability(req)["ghost"]
    assert ops.availability(req)["eager"] is None


def test_input_checks_are_clear():
    pred = random_predictor(mixed_layout())
    w, b = pred.weights(), pred.biases()
    with pytest.raises(ValueError, match="MLP layer 1"):
        ops.decode([w[0], w[0]] + w[2:], b, pred.layout, pred.encoding)
    with pytest.raises(ValueError, match="dtype"):
        ops.decode([w[0].double()] + w[1:], b, pred.layout, pred.encoding)
    with pytest.raises(ValueError, match="precision"):
        ops.decode(w, b, pred.layout, pred.encoding, precision="fp16")


def test_layout_cache_evicts_dead_layouts_first_then_least_recently_used():
    import gc

    from nern_fast import WeightLayout
    from nern_fast.ops.layout_cache import LayoutCache

    cache = LayoutCache(max_entries=3)
    builds = []

    def get(layout, key):
        return cache.get(layout, key, lambda: builds.append(key) or key)

    live, gone = WeightLayout.from_shapes([(4, 4)]), WeightLayout.from_shapes([(8, 4)])
    get(live, "a"), get(live, "b"), get(gone, "c")
    assert get(live, "a") == "a" and builds == ["a", "b", "c"]  # a hit builds nothing
    del gone
    gc.collect()
    get(live, "d")  # full: the dead layout's entry goes, the live ones stay
    assert len(cache) == 3 and builds[-1] == "d"
    get(live, "a"), get(live, "b"), get(live, "d")
    assert builds == ["a", "b", "c", "d"]
    get(live, "b")  # used last but one ...
    get(live, "e")  # ... full and every layout alive: the least recently used ("a") goes
    assert len(cache) == 3 and builds[-1] == "e"
    get(live, "b"), get(live, "d"), get(live, "e")
    assert builds[-1] == "e"
    get(live, "a")
    assert builds[-1] == "a"  # rebuilt
    other = WeightLayout.from_shapes([(2, 2)])
    assert cache.get(other, "e", lambda: "other") == "other"  # a key of another layout: rebuilt
