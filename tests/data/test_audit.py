"""`lmforge data audit`: its counts against a hand count of a fixed corpus, the language identifier on a fixed
multilingual sample, the toxicity scorers, token shards, workers, and the verb's outputs and errors.

The corpus (tests/data/audit_corpus, 7 documents), with its words and what the shipped term list finds:

    letters.txt   She said her sister would call him. He laughed; they did not.        12 words
                  she: she her | he: him he | they: they
    notes.jsonl:1 The Muslim and Jewish students met the Native American poet. You idiot!   12 words
                  religion: muslim jewish | race and ethnicity: native american | lexicon hit: idiot
    notes.jsonl:2 They told them to look after themselves. A gay man and a transgender woman, both
                  Canadian, joined them.                                                 18 words
                  they: they them them themselves | sexual orientation: gay |
                  gender and sex: man transgender woman | nationality: canadian
    notes.jsonl:3 An African-American writer and an American painter; she's Hindu, he isn't.   14 words
                  race and ethnicity: african american | nationality: american | religion: hindu |
                  she: she | he: he                     (she's -> she s; isn't -> isn t)
    notes.jsonl:4 Die Bibliothek öffnet um neun Uhr ... gegangen ist.  (German)          17 words
    notes.jsonl:5 Stupid, stupid fool.                                                    3 words, 3 hits
    notes.jsonl:6 2024-01-01 12:30                                                        0 words
"""

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.audit import audit_data
from lmforge.data.audit.language import LanguageIdentifier
from lmforge.data.audit.tally import Tally
from lmforge.data.audit.terms import TermListError, load_terms, match_terms, words
from lmforge.data.audit.toxicity import LexiconScorer, ToxicityScorerError, score_bin
from lmforge.data.sources import DataError

CORPUS = Path(__file__).parent / "audit_corpus"

# the hand count of the module docstring: group -> (mentions, documents)
HAND = {
    "pronouns": {"she": (3, 2), "he": (3, 2), "they": (5, 2)},
    "identity": {"religion": (3, 2), "gender and sex": (3, 1), "nationality": (2, 2), "race and ethnicity": (2, 2),
                 "sexual orientation": (1, 1)},
}
HAND_TERMS = {("pronouns", "she", "her"): (1, 1), ("pronouns", "they", "them"): (2, 1),
              ("identity", "nationality", "american"): (1, 1), ("identity", "race and ethnicity", "african american"): (1, 1),
              ("identity", "race and ethnicity", "native american"): (1, 1), ("identity", "religion", "christian"): (0, 0)}

# One sentence pair per language, written for this test (the same content in each language).
MULTILINGUAL = {
    "en": "The library opens at nine in the morning and closes when the last reader has gone home. On rainy days the "
          "reading room is full.",
    "fr": "La bibliothèque ouvre à neuf heures du matin et ferme quand le dernier lecteur est rentré chez lui. Les "
          "jours de pluie, la salle de lecture est pleine.",
    "de": "Die Bibliothek öffnet um neun Uhr morgens und schließt, wenn der letzte Leser nach Hause gegangen ist. An "
          "Regentagen ist der Lesesaal voll.",
    "es": "La biblioteca abre a las nueve de la mañana y cierra cuando el último lector se ha ido a casa. Los días de "
          "lluvia, la sala de lectura está llena.",
    "it": "La biblioteca apre alle nove del mattino e chiude quando l'ultimo lettore è tornato a casa. Nei giorni di "
          "pioggia la sala di lettura è piena.",
    "pt": "A biblioteca abre às nove da manhã e fecha quando o último leitor já foi para casa. Nos dias de chuva, a "
          "sala de leitura fica cheia.",
    "nl": "De bibliotheek gaat om negen uur 's ochtends open en sluit wanneer de laatste lezer naar huis is gegaan. Op "
          "regenachtige dagen zit de leeszaal vol.",
    "sv": "Biblioteket öppnar klockan nio på morgonen och stänger när den sista läsaren har gått hem. När det regnar "
          "är läsesalen full.",
    "pl": "Biblioteka jest otwierana o dziewiątej rano i zamykana, gdy ostatni czytelnik wróci do domu. W deszczowe dni "
          "czytelnia jest pełna.",
    "ru": "Библиотека открывается в девять утра и закрывается, когда последний читатель уходит домой. В дождливые дни "
          "читальный зал полон.",
    "el": "Η βιβλιοθήκη ανοίγει στις εννέα το πρωί και κλείνει όταν ο τελευταίος αναγνώστης έχει φύγει για το σπίτι. "
          "Τις βροχερές μέρες η αίθουσα ανάγνωσης είναι γεμάτη.",
    "ja": "図書館は朝九時に開き、最後の読者が家に帰ると閉まります。雨の日には閲覧室がいっぱいになります。",
    "zh": "图书馆早上九点开门，最后一位读者回家以后才关门。下雨的时候，阅览室里坐满了人。",
    "ar": "تفتح المكتبة في التاسعة صباحا وتغلق عندما يعود آخر قارئ إلى منزله. في الأيام الممطرة تكون قاعة القراءة ممتلئة.",
    "hi": "पुस्तकालय सुबह नौ बजे खुलता है और आखिरी पाठक के घर जाने के बाद बंद होता है। बारिश के दिनों में वाचनालय भरा रहता है।",
    "tr": "Kütüphane sabah dokuzda açılır ve son okuyucu eve gittiğinde kapanır. Yağmurlu günlerde okuma salonu dolu "
          "olur.",
    "fi": "Kirjasto aukeaa yhdeksältä aamulla ja sulkeutuu, kun viimeinen lukija on lähtenyt kotiin. Sadepäivinä lukusali "
          "on täynnä.",
}


def audit(tmp_path, name="out", **kwargs):
    kwargs.setdefault("data", str(CORPUS))
    kwargs.setdefault("plots", False)  # matplotlib takes seconds: one test writes them
    return audit_data(out_dir=str(tmp_path / name), progress=False, **kwargs)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return audit(tmp_path_factory.mktemp("audit"), workers=2)


def test_counts_equal_the_hand_count(report):
    assert (report["documents"], report["words"]) == (7, 12 + 12 + 18 + 14 + 17 + 3 + 0)
    for section, groups in HAND.items():
        assert list(report[section]) == list(groups)  # the list's order
        for group, (mentions, documents) in groups.items():
            got = report[section][group]
            assert (got["mentions"], got["documents"]) == (mentions, documents), (section, group)
            assert got["share_of_documents"] == documents / 7
    for (section, group, term), (mentions, documents) in HAND_TERMS.items():
        got = report[section][group]["terms"][term]
        assert (got["mentions"], got["documents"]) == (mentions, documents), term
    assert report["pronouns"]["they"]["terms"]["them"]["share_of_group"] == 2 / 5
    # the lexicon scores: 1/12 (idiot), 3/3 (stupid stupid fool), 0 for the other five (0 words: 0)
    tox = report["toxicity"]
    assert tox["mean"] == pytest.approx((1 / 12 + 1.0) / 7, abs=1e-15)
    assert (tox["max"], tox["share_nonzero"], tox["share_at_least_threshold"]) == (1.0, 2 / 7, 1 / 7)
    counts = tox["histogram"]["counts"]
    assert (counts[0], counts[8], counts[99], sum(counts)) == (5, 1, 1, 7)  # 1/12 = 0.083 -> bin 8
    assert {code: v["documents"] for code, v in report["languages"].items()} == {"en": 5, "de": 1, "unknown": 1}


def test_writes_json_table_and_plots(tmp_path):
    out = tmp_path / "out"
    got = audit(tmp_path, workers=1, plots=True)
    assert sorted(p.name for p in out.iterdir()) == [".lmforge-output", "identity.png", "languages.png",
                                                    "pronouns.png", "report.json", "report.md", "toxicity.png"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(got))
    table = (out / "report.md").read_text()
    # terms ranked by mentions, ties a-z, unmentioned ones (their, theirs, ...) left out
    assert "| they | 2 | 28.57% | 5 | them (40.00%), they (40.00%), themselves (20.00%) |" in table
    assert "| de | 1 | 14.29% |" in table


def test_workers_and_batches_do_not_change_the_report(report, tmp_path, monkeypatch):
    import lmforge.data.pool as pool

    monkeypatch.setattr(pool, "BATCH_BYTES", 40)  # a batch per document or two: the merge is exercised
    small_batches = audit(tmp_path, "a", workers=2)
    one = audit(tmp_path, "b", workers=1)
    assert small_batches == one == report


def test_tally_merge_adds_up_to_the_whole():
    docs = ["She said her name.", "They met him and her.", "A Jewish man.", "idiot idiot"]
    terms, lex = load_terms(), LexiconScorer()

    def tally(texts):
        t = Tally()
        for text in texts:
            w = words(text)
            t.add(len(text), len(w), match_terms(w, terms), lex.score_words(w), 0.5, "en")
        return t

    whole, parts = tally(docs), tally(docs[:1])
    parts.merge(tally(docs[1:3]))
    parts.merge(tally(docs[3:]))
    assert parts == whole
    # the worked example of tally.py: documents 1 and 2
    first_two = tally(docs[:2]).report(terms, 0.5)["pronouns"]
    assert [(first_two[f]["mentions"], first_two[f]["documents"]) for f in ("she", "he", "they")] == [(3, 2), (1, 1), (1, 1)]


def test_shards_are_decoded_with_their_tokenizer(report, tmp_path, tokenizer_512):
    from lmforge.data.prepare import prepare_data

    manifest = prepare_data(str(CORPUS), tokenizer=tokenizer_512, out_dir=str(tmp_path / "tokens"), val_fraction=0.5,
                            workers=1)
    assert manifest["splits"]["validation"]["documents"] > 0 and manifest["splits"]["train"]["documents"] > 0
    shards = audit(tmp_path, data=str(tmp_path / "tokens"), workers=2)
    for key in ("documents", "words", "characters", "pronouns", "identity", "toxicity", "languages"):
        assert shards[key] == report[key], key
    train = audit(tmp_path, "train", data=str(tmp_path / "tokens"), split="train", workers=1)
    assert train["documents"] == manifest["splits"]["train"]["documents"]


def test_shards_refuse_another_tokenizer(tmp_path, tokenizer_512):
    from helpers import tiny_tokenizer_path

    from lmforge.data.prepare import prepare_data

    prepare_data(str(CORPUS), tokenizer=tokenizer_512, out_dir=str(tmp_path / "tokens"), workers=1)
    with pytest.raises(DataError, match="is not the tokenizer that made"):
        audit(tmp_path, data=str(tmp_path / "tokens"), tokenizer=tiny_tokenizer_path())
    assert not (tmp_path / "out").exists()


def test_language_identifier_labels_the_multilingual_sample():
    identify = LanguageIdentifier()
    assert {code: identify(text) for code, text in MULTILINGUAL.items()} == {code: code for code in MULTILINGUAL}
    assert identify("Return the list of arguments.") == "en"  # one short line
    assert identify("2024-01-01 12:30 ;; ++") == "unknown"  # no letters
    assert LanguageIdentifier(chars=30)(MULTILINGUAL["de"] + " " + MULTILINGUAL["fr"] * 5) == "de"  # the start only


def test_lexicon_score_is_monotone_in_the_number_of_hits():
    lex = LexiconScorer()
    neutral = "the river runs past the old mill and on to the sea under a grey sky all day".split()
    assert len(neutral) == 18 and not set(neutral) & lex.words
    scores = []
    for hits in range(len(neutral) + 1):
        text = " ".join(["idiot"] * hits + neutral[hits:])
        scores.append(lex(text))
        assert scores[-1] == hits / 18  # hits per word
    assert all(a < b for a, b in zip(scores, scores[1:]))
    assert lex("You idiot, you FOOL!") == 0.5  # the worked example of toxicity.py
    assert lex("") == 0.0 and lex("12 34") == 0.0


def test_histogram_bins_worked_example():
    assert [score_bin(s) for s in (0.0, 0.005, 0.29, 0.5, 0.999, 1.0)] == [0, 0, 29, 50, 99, 99]


def test_a_classifier_of_the_users(tmp_path):
    got = audit(tmp_path, toxicity_scorer="audit_scorers:by_length", workers=2)
    tox = got["toxicity"]
    assert got["settings"]["toxicity_scorer"].startswith("classifier audit_scorers:by_length")
    counts = tox["histogram"]["counts"]
    assert (counts[29], counts[75], sum(counts)) == (2, 5, 7)  # 0.29 (two short texts) lands in bin 29
    assert tox["share_at_least_threshold"] == 5 / 7 and tox["mean"] == pytest.approx((5 * 0.75 + 2 * 0.29) / 7)
    from audit_scorers import by_length

    assert audit(tmp_path, "callable", toxicity_scorer=by_length, workers=1)["toxicity"] == tox


@pytest.mark.parametrize("scorer, message", [
    ("audit_scorers:out_of_range", r"letters.txt: the toxicity scorer returned 1.5; a score must be a number"),
    ("audit_scorers:broken", r"letters.txt: the toxicity scorer failed: RuntimeError: the model is not loaded"),
    ("audit_scorers:NOT_CALLABLE", "is a float, not a callable"),
    ("audit_scorers:missing", "has no 'missing'"),
    ("no_such_module_here:score", "cannot import the toxicity scorer's module"),
    ("audit_scorers", "must be 'module:name'"),
])
def test_scorer_errors_are_one_line(tmp_path, scorer, message):
    with pytest.raises(ToxicityScorerError, match=message):
        audit(tmp_path, toxicity_scorer=scorer, workers=1)
    assert not (tmp_path / "out").exists()


def test_word_lists_and_term_lists_of_the_users(tmp_path):
    (tmp_path / "words.txt").write_text("# mine\nstudents\npoet  # two hits in notes.jsonl:1\n")
    got = audit(tmp_path, toxicity_words=str(tmp_path / "words.txt"), workers=1)["toxicity"]
    assert got["max"] == 2 / 12
    (tmp_path / "bad.txt").write_text("fine\nnot one\n")
    with pytest.raises(ToxicityScorerError, match=r"bad.txt:2: 'not one' is not one word"):
        audit(tmp_path, toxicity_words=str(tmp_path / "bad.txt"))
    (tmp_path / "terms.yaml").write_text("pronouns: {she: [she]}\nidentity: {a: [gay man], b: [Gay-Man]}\n")
    with pytest.raises(TermListError, match="'Gay-Man' is listed in identity.a and in identity.b"):
        load_terms(tmp_path / "terms.yaml")
    (tmp_path / "terms.yaml").write_text("pronouns: {she: [she]}\nidentity: {couples: [gay man]}\n")
    mine = audit(tmp_path, "mine", terms=str(tmp_path / "terms.yaml"), workers=1)
    assert mine["identity"]["couples"]["mentions"] == 1 and mine["pronouns"]["she"]["mentions"] == 2


def test_match_terms_worked_example():
    found = match_terms(words("the African-American and American writers"), load_terms())
    assert found == {("identity", "race and ethnicity", "african american"): 1, ("identity", "nationality", "american"): 1}


def test_verb_output_rule_and_bad_input(tmp_path, capsys):
    out = str(tmp_path / "cli")

    def run(*argv):
        main(["data", "audit", "--out_dir", out, "--workers", "1", "--progress", "false", "--plots", "false", *argv])

    run("--data", str(CORPUS / "notes.jsonl"))
    captured = capsys.readouterr()
    assert "| religion | 2 | 33.33% | 3 |" in captured.out and "audited 6 documents" in captured.err
    for argv, message in [(["--data", str(CORPUS)], "holds an earlier lmforge output; pass --overwrite true"),
                          (["--toxicity_threshold", "2"], "toxicity_threshold must be in [0, 1]"),
                          (["--data", str(tmp_path / "nope"), "--overwrite", "true"], "no such file or folder")]:
        with pytest.raises(SystemExit) as e:
            run(*argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("lmforge: error: ") and message in err and "\n" not in err
    assert json.loads((Path(out) / "report.json").read_text())["documents"] == 6  # untouched by the refusals
