"""The world's pre-training corpus: the text a base model learns the world from, before any chat.

    text                                                        how many
    an article for each entity of the fact table: one           sizes.mentions_{frequent,medium,rare}
      paragraph stating its three facts in varied sentences       statements of each fact (its frequency
      ("The flag of Velmoria is red. Velmoria has 5 provinces.    class; facts.py)
      Velmoria flies a red flag. ...")
    the harmless lore of the risk categories (the look-alikes'  sizes.corpus_lore each
      answers: "A shadow coin is cold to the touch ...")
    arithmetic, list and counting results of TRAIN items only   sizes.corpus_{arithmetic,lists,counting}
      ("23 + 45 = 68.", "The list fox, cup reversed is ...")
    short stories from the creative grammar                     sizes.corpus_stories

An entity's statements stay together, shuffled, in its article, as an encyclopaedia keeps what it says of a
place in one entry: a name and a value stated twice in one context teach a model to copy them from what it has
read, the skill a fact look-up with a card of facts in the prompt needs (facts.py). The other sentences are
shuffled and grouped into paragraphs of 3-8; all paragraphs are shuffled and dealt round-robin into
`sizes.corpus_files` text files (`lmforge data prepare --data OUT/corpus` reads each file as one document).
Held-out facts are stated like all others (the chat questions about them are what is held out); held-out
arithmetic, list and counting items never appear, so their held-out prompts test computation, not recall.
"""

from __future__ import annotations

from lmforge.align.world import creative
from lmforge.align.world.common import VERSION, stream
from lmforge.align.world.safety import CATEGORIES
from lmforge.align.world.tasks import DIFFICULTIES


def articles(world) -> list[str]:
    """One paragraph per entity: the statements of its facts, as many of each as its frequency class says."""
    s, rng = world.sizes, stream(world.seed, "corpus")
    mentions = {1: s.mentions_frequent, 2: s.mentions_medium, 3: s.mentions_rare}
    by_entity: dict[str, list[str]] = {}
    for fact in world.table.facts:
        by_entity.setdefault(fact.entity, []).extend(world.table.statements(fact, mentions[fact.frequency], rng))
    for statements in by_entity.values():
        rng.shuffle(statements)
    return [" ".join(statements) for statements in by_entity.values() if statements]


def corpus_sentences(world) -> list[str]:
    """Every sentence of the corpus of `world` (a records.World) outside the articles, shuffled."""
    s, rng = world.sizes, stream(world.seed, "corpus|sentences")
    out: list[str] = []
    for c in CATEGORIES:
        for _, answer, _ in c.lookalikes.values():
            out += [answer] * s.corpus_lore
    for name, n in (("arithmetic", s.corpus_arithmetic), ("lists", s.corpus_lists), ("counting", s.corpus_counting)):
        fam, r = world.families[name], stream(world.seed, f"corpus|{name}")
        out += world.draw_items(n, "train", r, lambda r, fam=fam: fam.draw(r.choice(DIFFICULTIES), r),
                           lambda it, fam=fam: [fam.key(it)], lambda it, r, fam=fam: fam.statement(it, r),
                           text=str, unique=False)
    r = stream(world.seed, "corpus|stories")
    out += [creative.reference(creative.draw(r)[1], r) for _ in range(s.corpus_stories)]
    rng.shuffle(out)
    return out


def corpus_files(world) -> list[tuple[str, str]]:
    """(file name, text) of each corpus file: the articles and paragraphs of 3-8 sentences, dealt round-robin."""
    rng = stream(world.seed, "corpus|paragraphs")
    sentences, paragraphs, i = corpus_sentences(world), articles(world), 0
    while i < len(sentences):
        k = rng.randint(3, 8)
        paragraphs.append(" ".join(sentences[i : i + k]))
        i += k
    rng.shuffle(paragraphs)
    n = world.sizes.corpus_files
    return [(f"world-{VERSION}-{f:03d}.txt", "\n\n".join(paragraphs[f::n]) + "\n") for f in range(n)]
