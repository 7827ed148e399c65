"""One byte format for every message and table (gqa_uptrain.sizes)."""

from gqa_uptrain.sizes import human_size


def test_binary_units_one_decimal_whole_bytes():
    assert [human_size(n) for n in (0, 512, 1023, 1024, 1536, 3 * 2**20, 68 * 2**30, 5 * 2**40)] == [
        "0 B", "512 B", "1023 B", "1.0 KiB", "1.5 KiB", "3.0 MiB", "68.0 GiB", "5.0 TiB"]


def test_a_fixed_unit_keeps_a_table_in_one_unit():
    assert human_size(2**29, "GiB") == "0.5 GiB" and human_size(80 * 2**30, "GiB") == "80.0 GiB"
