"""maskedBy cycle checks (alarm_engine/masking.py)."""

from alarm_engine.masking import cycles, mask_cycle


def test_a_chain_is_no_cycle():
    assert mask_cycle({"B": "C", "C": None}, "A", "B") is None


def test_closing_a_cycle_is_named():
    assert mask_cycle({"B": "C", "C": "A"}, "A", "B") == ["A", "B", "C", "A"]


def test_masked_by_itself():
    assert mask_cycle({}, "A", "A") == ["A", "A"]


def test_a_cycle_elsewhere_is_not_this_alarms():
    assert mask_cycle({"B": "C", "C": "B"}, "A", "B") is None


def test_every_cycle_of_a_file_once():
    parents = {"A": "B", "B": "A", "C": "D", "D": None, "E": "F", "F": "G", "G": "E", "H": "E"}
    assert cycles(parents) == [["A", "B", "A"], ["E", "F", "G", "E"]]
    assert cycles({"A": None, "B": "A"}) == []
