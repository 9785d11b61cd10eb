from hypothesis import given
from hypothesis import strategies as st

from services.worker.stops import StopMatcher


def _run(stops, deltas):
    m, out = StopMatcher(stops), []
    for d in deltas:
        text, hit = m.push(d)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def test_stop_is_cut_and_never_streamed():
    m = StopMatcher(["\nUser:"])
    assert m.push("Hello") == ("Hello", False)
    assert m.push(" there\nUs") == (" there", False)  # "\nUs" could start the stop: held back
    assert m.push("er: hi") == ("", True)


def test_false_alarm_is_released():
    m = StopMatcher(["END"])
    assert m.push("the EN") == ("the ", False)
    assert m.push("D") == ("", True)
    m = StopMatcher(["END"])
    assert m.push("EN") == ("", False) and m.push("ding") == ("ENding", False)


def test_earliest_of_several_stops_wins():
    assert _run(["cd", "b"], ["abcd"]) == ("a", True)


@given(text=st.text(alphabet="abc\n", max_size=40), stop=st.text(alphabet="abc\n", min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_matches_a_plain_search_for_any_chunking(text, stop, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    got, hit = _run([stop], deltas)
    i = text.find(stop)
    assert (got, hit) == ((text[:i], True) if i >= 0 else (text, False))
