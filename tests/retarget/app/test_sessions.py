"""Per-session output folders: separate per session, removed when the session ends or the app stops."""

from __future__ import annotations

from retarget.app.sessions import Sessions


def test_session_folders_are_separate_and_cleaned(tmp_path):
    s = Sessions(tmp_path / "sessions")
    a1, a2, b = s.job_dir("abc", "retarget"), s.job_dir("abc", "studio"), s.job_dir("x/../y", "studio")
    assert a1 != a2 and a1.parent == a2.parent and b.parent.name == "xy"  # only safe characters
    (a1 / "out.mp4").write_bytes(b"1")
    s.end("abc")
    assert not a1.parent.exists() and b.exists()
    s.close()
    assert b.exists()  # a folder the user gave is kept; only the app's own temporary root is removed

    own = Sessions()
    d = own.job_dir(None, "retarget")
    assert d.exists()
    own.close()
    assert not own.root.exists()
