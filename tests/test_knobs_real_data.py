"""The real-model knob task's data (issue 18, part 3): paraphrased, and an honest learned classifier."""

from __future__ import annotations

import itertools

from benchmarks.knobs import real_data as R
from benchmarks.knobs.real_train import dpo_rows


def test_classifier_reads_held_out_paraphrases():
    report = R.classifier_report()
    assert report["held_out"]["references"] >= 200
    assert report["held_out"]["accuracy"] >= 0.95, report


def test_no_single_marker_phrase_per_level():
    """No word pair (slot values aside) appears in every paraphrase of a (domain, level)."""
    for d, level in itertools.product(R.DOMAINS, R.LEVELS):
        spec = R.SPEC[d]
        slots = {"a": "SLOTA", "A": "SLOTA", "b": "SLOTB"}
        grams = [{g for g in R.words(t.format(**slots)) if " " in g and "slota" not in g and "slotb" not in g}
                 for t in spec["responses"][level]]
        assert len(grams) == 6
        assert not set.intersection(*grams), (d, level, set.intersection(*grams))


def test_classifier_abstains_on_text_it_cannot_read():
    assert R.classify("") is None
    assert R.classify("zzz qqq") is None


def test_split_is_disjoint_and_dpo_rows_prefer_the_level():
    train, test = R.split()
    for d in R.DOMAINS:
        assert not {q.text for q in train[d]} & {q.text for q in test[d]}
        assert len(test[d]) == 4 * len(R.SPEC[d]["personas"])
    rows = dpo_rows(train["legal"][:5], level=2)
    assert len(rows) == 10
    assert all(R.classify(r["chosen"][0]["content"]) == 2 != R.classify(r["rejected"][0]["content"]) for r in rows)
    assert rows[0]["prompt"][0]["role"] == "user"
