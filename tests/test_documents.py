"""Where a data file stops being UTF-8: the offset `first_bad_byte` reports, the one line then names."""

import gzip

import pytest

from gqa_uptrain import documents


@pytest.mark.parametrize("chunk", [3, 4, 1 << 20])
def test_the_first_bad_byte_is_found_across_chunks_and_inside_gzip(tmp_path, monkeypatch, chunk):
    """A two-byte character cut by a chunk boundary is whole, not bad; the stray byte after it is the one named."""
    monkeypatch.setattr(documents, "_SCAN_CHUNK", chunk)
    data = "abcé".encode() + b"d\xffe"  # é spans bytes 3-4; 0xff is byte 6
    (tmp_path / "plain.txt").write_bytes(data)
    (tmp_path / "packed.txt.gz").write_bytes(gzip.compress(data))
    (tmp_path / "good.txt").write_text("abcé and more")
    (tmp_path / "cut.txt").write_bytes("abcé".encode()[:-1])  # ends inside a character
    assert documents.first_bad_byte(tmp_path / "plain.txt") == 6
    assert documents.first_bad_byte(tmp_path / "packed.txt.gz") == 6
    assert documents.first_bad_byte(tmp_path / "good.txt") is None
    assert documents.first_bad_byte(tmp_path / "cut.txt") == 3


def test_a_decoding_error_that_is_not_the_data_s_goes_on(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    with pytest.raises(UnicodeDecodeError):
        with documents.naming_undecodable_files([str(tmp_path / "good.txt")]):
            b"\xff".decode()
