"""The web page's model and its authentication: pure parts, no server."""

from __future__ import annotations

import base64

from alarm_engine import history
from alarm_engine.web.auth import Auth, check_password, hash_password, set_user
from alarm_engine.web.model import LiveState

T0 = 1_800_000_000_000


def defn(location="Hall A", priority="P3_PRODUCTIVITY"):
    return {"producer": {"pv": "X"}, "location": location, "category": "C", "priority": priority,
            "description": "d", "docUrl": "", "edmPath": ""}


def shown(priority="P3_PRODUCTIVITY", since=T0, state="ACTIVE", shelving=None):
    return {"priority": priority, "state": state, "severity": "MAJOR", "cause": "PV_ALARM", "message": "m",
            "since": since, "shelving": shelving}


def test_rows_sorted_by_priority_then_newest_and_joined_with_definitions():
    st = LiveState()
    st.apply("alarms", "a", defn("Hall A/S1"))
    st.apply("alarms", "b", defn("Hall B"))
    st.apply("active-alarms", "a", shown("P3_PRODUCTIVITY", T0))
    st.apply("active-alarms", "b", shown("P1_LIFE", T0 - 5))
    st.apply("active-alarms", "c", shown("P3_PRODUCTIVITY", T0 + 5, state="DISABLED"))  # no definition, new state
    assert [r["name"] for r in st.rows()] == ["b", "c", "a"]
    assert st.row("a")["location"] == "Hall A/S1" and st.row("c")["location"] == ""
    assert st.row("c")["state"] == "DISABLED"
    st.apply("active-alarms", "a", shown(state="SHELVED", shelving={"kind": "TIMED", "user": "op", "reason": "",
                                                                     "expiration": T0 + 1}))
    assert st.row("a")["by"] == "op"
    st.apply("active-alarms", "a", None)
    assert st.row("a") is None and [r["name"] for r in st.rows()] == ["b", "c"]


def test_what_changes_are_reported():
    st = LiveState()
    assert st.apply("alarms", "a", defn("L1")) == ("row", "locations")
    assert st.apply("alarms", "a", defn("L1", "P1_LIFE")) == ("row",)
    assert st.apply("alarms", "a", defn("L2")) == ("row", "locations")
    assert st.locations() == {"L2": 1}
    assert st.apply("shelved-alarms", "a", {"user": "op"}) == ()
    assert st.detail("a")["shelving"] == {"user": "op"}
    assert st.detail("nope") is None


def test_the_tree_is_alarm_locations_with_each_named_location():
    st = LiveState()
    st.apply("alarms", "a", defn("Hall A/S1"))
    st.apply("alarms", "b", defn("Hall B"))
    assert st.tree() == {"Hall A/S1": None, "Hall B": None}  # no records: each a top of its own
    assert st.apply("alarm-locations", "Hall A/S1", {"parent": "Hall A", "description": ""}) == ("locations",)
    st.apply("alarm-locations", "Hall A", {"parent": "Site", "description": ""})
    assert st.tree() == {"Hall A/S1": "Hall A", "Hall A": "Site", "Site": None, "Hall B": None}
    assert st.in_location("Hall A/S1", "Site") and st.in_location("Hall A/S1", "Hall A/S1")
    assert not st.in_location("Hall B", "Site") and st.in_location("Hall B", None)
    st.apply("alarm-locations", "Hall A", None)  # a tombstone: Hall A is a top again (still a parent)
    assert st.tree()["Hall A"] is None and not st.in_location("Hall A/S1", "Site")


def test_history_window_copies_and_detail():
    st = LiveState(history_window_ms=60_000)
    e1 = history.entry("active-alarms", "a", shown(), T0, 0, 1, definition=defn())
    assert st.apply(history.TOPIC, "a", e1) == ("history",)
    assert st.apply(history.TOPIC, "a", dict(e1)) == ()  # a replay's copy
    e2 = history.entry("active-alarms", "a", None, T0 + 120_000, 0, 2, definition=defn())
    st.apply(history.TOPIC, "a", e2)
    assert list(st.entries) == [e2]  # e1 fell out of the window
    st.apply("alarms", "a", defn())
    d = st.detail("a")
    assert [h["kind"] for h in d["history"]] == ["cleared"] and d["definition"]["producerText"] == "PV X"


def test_passwords_and_user_file(tmp_path):
    stored = hash_password("pw", iterations=1000)
    assert check_password("pw", stored) and not check_password("PW", stored)
    assert not check_password("pw", "garbage")
    f = tmp_path / "users"
    set_user(str(f), "op", "secret")
    set_user(str(f), "op2", "other1")
    set_user(str(f), "op", "changed")
    assert (f.stat().st_mode & 0o777) == 0o600
    assert "secret" not in f.read_text() and f.read_text().count("op:") == 1
    auth = Auth(users_file=str(f))

    def basic(u, p):
        return {"Authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}

    assert auth.identify(basic("op", "changed"), "10.0.0.1") == "op"
    assert auth.identify(basic("op", "changed"), "10.0.0.1") == "op"  # cached
    assert auth.identify(basic("op", "secret"), "10.0.0.1") is None
    assert auth.identify(basic("nobody", "x"), "10.0.0.1") is None
    assert auth.identify({"Authorization": "Basic !!!"}, "10.0.0.1") is None
    assert auth.identify({}, "10.0.0.1") is None
    assert auth.reads_need_login and Auth(users_file=str(f), anonymous_read=True).reads_need_login is False
    assert not Auth().configured and not Auth().reads_need_login


def test_trusted_header_only_from_the_proxy():
    auth = Auth(trusted_header="X-Remote-User", trusted_proxies=("127.0.0.1",))
    assert auth.identify({"X-Remote-User": "alice"}, "127.0.0.1") == "alice"
    assert auth.identify({"X-Remote-User": "alice"}, "10.1.2.3") is None
    env = Auth.from_env({"ALARM_ENGINE_WEB_TRUSTED_HEADER": "X-User", "ALARM_ENGINE_WEB_ANONYMOUS_READ": "1"})
    assert env.trusted_header == "X-User" and env.anonymous_read and env.configured
