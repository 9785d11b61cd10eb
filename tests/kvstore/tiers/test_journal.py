import os

from kvstore.tiers.journal import HistoryJournal


def test_newest_record_wins_across_writers_and_tombstones_stick(tmp_path):
    a, b = HistoryJournal(tmp_path, "w0"), HistoryJournal(tmp_path, "w1")
    a.append("t", "s", b"one")
    assert b.lookup("t", "s") == b"one"  # another writer's file is read too
    b.append("t", "s", b"two")
    assert a.lookup("t", "s") == b"two"
    a.append("t", "s", None)  # deleted on w0
    assert a.lookup("t", "s") is None and b.lookup("t", "s") is None
    b.append("t", "x", b"keep")
    assert sorted((t, s, m) for t, s, m in a.live()) == [("t", "x", b"keep")]
    assert a.lookup("t", "never") is None


def test_torn_tail_is_cut_and_later_appends_stay_readable(tmp_path):
    j = HistoryJournal(tmp_path, "w0")
    j.append("t", "a", b"A" * 100)
    j.append("t", "b", b"B" * 100)
    j.close()
    size = os.path.getsize(j.path)
    with open(j.path, "r+b") as f:  # a crash mid-write of the second record
        f.truncate(size - 20)
    again = HistoryJournal(tmp_path, "w0")
    assert again.lookup("t", "a") == b"A" * 100 and again.lookup("t", "b") is None
    again.append("t", "c", b"C")
    assert HistoryJournal(tmp_path, "reader").lookup("t", "c") == b"C"


def test_corrupt_bytes_end_a_file_s_readable_part(tmp_path):
    j = HistoryJournal(tmp_path, "w0")
    j.append("t", "a", b"A" * 50)
    j.append("t", "b", b"B" * 50)
    j.close()
    data = bytearray(j.path.read_bytes())
    data[-30] ^= 0xFF  # flip a byte in the last record
    j.path.write_bytes(bytes(data))
    r = HistoryJournal(tmp_path, "reader")
    assert r.lookup("t", "a") == b"A" * 50 and r.lookup("t", "b") is None


def test_compaction_keeps_only_the_newest_records(tmp_path):
    j = HistoryJournal(tmp_path, "w0")
    for i in range(50):
        j.append("t", "s", bytes([i]) * 1000)
    j.append("t", "gone", b"x")
    j.append("t", "gone", None)
    before = os.path.getsize(j.path)
    after = j.compact()
    assert after < before / 10
    assert j.lookup("t", "s") == bytes([49]) * 1000 and j.lookup("t", "gone") is None
    j.append("t", "s", b"new")
    assert HistoryJournal(tmp_path, "r").lookup("t", "s") == b"new"
