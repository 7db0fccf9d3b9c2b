"""Noun phrases and referring expressions from a caption (use-paper §3.1, after Kosmos-2's GRIT recipe).

The rule, applied to every spaCy noun chunk of the caption (all sentences, in text order):

1. The chunk is the **phrase** ("the right side").
2. The **expression** grows the phrase to the right: starting from the chunk's root token, follow its
   children that lie after the chunk, then all of their children, recursively (the dependency subtree to the
   right of the chunk), except children attached as ``conj`` or ``cc`` at any depth — "a dog and a cat" gives
   two expressions, neither containing the other.
3. **Existential coda.** When the chunk is the pivot of an existential clause (root is ``attr`` of a verb with
   an ``expl`` child: "there is [an apple] [at the right side of the rabbit]"), its direct ``prep`` children
   headed by a locative preposition (:data:`LOCATIVE_PREPOSITIONS`) are not followed. Such a PP is the clause's
   coda — it predicates where the pivot is rather than restricting which thing it is — and parsers attach it
   either to the verb or to the noun (the attachment is genuinely ambiguous). Without this rule the result
   would depend on that coin flip; with it, the paper's own example comes out as printed: "an orange-red
   apple" stays bare while "the right side of the rabbit" (an ``of`` complement, not a coda) and "another red
   apple visible behind the rabbit" (the PP hangs under the adjective, not the pivot) expand. Non-locative
   PPs on a pivot ("there is a rabbit with two pink ears", "two cups of coffee") are still followed.
4. The expression must be contiguous: it ends at the first token after the chunk that was not reached.
   Trailing punctuation and whitespace tokens are trimmed.
5. If the expression has more than ``max_tokens`` spaCy tokens it is dropped in favour of the bare phrase
   (long clauses make poor grounding queries and region labels).

Repeated phrases are kept (each occurrence has its own offsets). Offsets are character offsets into the
caption string, end exclusive, so ``caption[phrase_start:phrase_end] == phrase`` and
``caption[phrase_start:expression_end] == expression``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dependency labels never followed during expansion: coordination makes a second referent, not a modifier.
NOT_FOLLOWED_DEPS: frozenset[str] = frozenset({"conj", "cc"})

# Prepositions that head a locative coda in "there is NP <PP>" (see rule 3 of the module docstring).
LOCATIVE_PREPOSITIONS: frozenset[str] = frozenset(
    {
        "above", "across", "against", "along", "alongside", "amid", "amidst", "among", "around", "at",
        "atop", "behind", "below", "beneath", "beside", "besides", "between", "beyond", "by", "in",
        "inside", "into", "near", "nearby", "next", "on", "onto", "opposite", "outside", "over", "past",
        "through", "throughout", "toward", "towards", "under", "underneath", "upon", "within",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Expression:
    """One noun phrase of a caption and its referring expression.

    ``phrase_start``/``phrase_end``: character span of ``phrase`` in the caption (end exclusive).
    ``expression`` starts at ``phrase_start`` and ends at ``expression_end`` (exclusive); it equals
    ``phrase`` when the phrase was not expanded.
    """

    phrase: str
    expression: str
    phrase_start: int
    phrase_end: int
    expression_end: int


def _is_existential_pivot(root) -> bool:
    return root.dep_ == "attr" and any(child.dep_ == "expl" for child in root.head.children)


def _reached_right_tokens(root, chunk_end: int) -> set[int]:
    """Token indices reachable from ``root`` through children after ``chunk_end`` (rules 2 and 3)."""
    pivot = _is_existential_pivot(root)
    stack = []
    for child in root.children:
        if child.i < chunk_end or child.dep_ in NOT_FOLLOWED_DEPS:
            continue
        if pivot and child.dep_ == "prep" and child.lower_ in LOCATIVE_PREPOSITIONS:
            continue
        stack.append(child)
    reached: set[int] = set()
    while stack:
        token = stack.pop()
        if token.i in reached:
            continue
        reached.add(token.i)
        stack.extend(c for c in token.children if c.dep_ not in NOT_FOLLOWED_DEPS)
    return reached


def extract_expressions(caption: str, nlp, *, max_tokens: int = 16) -> list[Expression]:
    """Noun phrases of ``caption`` and their referring expressions, in text order (rules: module docstring).

    ``nlp`` is a loaded spaCy pipeline with a dependency parser (e.g. ``en_core_web_sm``); the caller owns
    loading it. ``max_tokens`` caps the expression length in spaCy tokens. Returns one :class:`Expression`
    per noun chunk, repeated phrases included; an empty or phrase-less caption gives ``[]``.
    """
    doc = nlp(caption)
    out: list[Expression] = []
    for chunk in doc.noun_chunks:
        reached = _reached_right_tokens(chunk.root, chunk.end)
        end = chunk.end  # exclusive token index
        while end in reached:
            end += 1
        while end > chunk.end and (doc[end - 1].is_punct or doc[end - 1].is_space):
            end -= 1
        if end - chunk.start > max_tokens:
            end = chunk.end
        last = doc[end - 1]
        expression_end = max(chunk.end_char, last.idx + len(last.text))
        out.append(
            Expression(
                phrase=chunk.text,
                expression=caption[chunk.start_char : expression_end],
                phrase_start=chunk.start_char,
                phrase_end=chunk.end_char,
                expression_end=expression_end,
            )
        )
    return out
