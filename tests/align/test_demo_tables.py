"""`make demo`'s reward-model table: each degree's accuracy and pair count from an `rm eval` report, a missing
degree shown as "-"."""

from lmforge.demo import rm_table


def test_rm_table_reads_each_degree_and_the_safe_vs_unsafe_bin():
    report = {"accuracy": 0.6, "pairs": 300,
              "by_degree": {"significantly_better": {"accuracy": 0.9, "n": 40}, "better": {"accuracy": 0.75, "n": 60},
                            "negligibly_better": {"accuracy": 0.5, "n": 200}},
              "by_safety_bin": {"chosen_safe": {"accuracy": 0.8, "n": 25}}}
    lines = rm_table({"helpfulness": report, "safety": report}).splitlines()
    assert "helpfulness RM" in lines[0] and "safety RM" in lines[0]
    rows = {line[:38].strip(): line[38:].split() for line in lines[1:]}
    assert rows["significantly better"][:2] == ["90.0%", "(n=40)"]
    assert rows["slightly better"] == ["-", "-"]  # no pair of that degree
    assert rows["safe vs unsafe answer"][:2] == ["80.0%", "(n=25)"]
    assert rows["all pairs"][:2] == ["60.0%", "(n=300)"]
