"""The toy zoo's grammar: documents for training and held-out task prompts.

Every sentence comes from a small template grammar with enough lexical variety (names,
places, objects, adjectives) that a model has to use the context to predict the task
tokens: who the indirect object is, whether a quote is open, whether the subject is plural.

    >>> rng = random.Random(0)
    >>> doc = document(rng)                      # a few sentences of mixed kinds
    >>> prompts = task_prompts("ioi", seed=1, n=3)
    >>> prompts[0]["answer"] in NAMES
    True
"""

from __future__ import annotations

import random
from collections.abc import Callable

FEMALE_NAMES = ["Mary", "Alice", "Anna", "Lily", "Emma", "Lucy", "Kate", "Mia", "Rose", "Eve"]
MALE_NAMES = ["John", "Bob", "Tom", "Sam", "Max", "Jack", "Ben", "Leo", "Paul", "Dan"]
NAMES = FEMALE_NAMES + MALE_NAMES
PLACES = ["store", "park", "school", "garden", "beach", "market", "library", "farm",
          "house", "river", "forest", "castle"]
OBJECTS = ["ball", "book", "pear", "cake", "toy", "flower", "hat", "letter", "key", "cup",
           "box", "drink", "gift", "pen"]
ADJECTIVES = ["big", "small", "red", "blue", "happy", "old", "new", "shiny", "soft", "little"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud"]
VERBS_GIVE = ["gave", "handed", "passed", "sent", "showed"]
NOUNS = {  # singular -> plural, the heads and attractors of agreement sentences
    "dog": "dogs", "cat": "cats", "boy": "boys", "girl": "girls", "bird": "birds",
    "teacher": "teachers", "friend": "friends", "king": "kings", "farmer": "farmers",
    "baker": "bakers",
}
PREPOSITIONS = ["near", "with", "behind", "beside"]
AGREEMENT_VERBS = [("is", "are"), ("was", "were"), ("has", "have"), ("likes", "like"),
                   ("runs", "run")]
VERB_COMPLEMENTS = {
    "is": ADJECTIVES, "are": ADJECTIVES, "was": FEELINGS, "were": FEELINGS,
    "has": ["a " + o for o in OBJECTS], "have": ["a " + o for o in OBJECTS],
    "likes": ["the " + p for p in PLACES], "like": ["the " + p for p in PLACES],
    "runs": ["to the " + p for p in PLACES], "run": ["to the " + p for p in PLACES],
}
QUOTE_BODIES = [
    "I want the {adj} {obj}",
    "we should go to the {place}",
    "the {obj} is {adj}",
    "I left my {obj} at the {place}",
    "look at the {adj} {obj}",
    "I am {feel} today",
]
SPEECH_VERBS = ["said", "shouted", "whispered", "replied"]
NARRATIVE_STARTERS = ["The", "Then", "Later", "She", "He"]


def _pronoun(name: str) -> str:
    return "She" if name in FEMALE_NAMES else "He"


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return a, b


def ioi_sentence(rng: random.Random) -> tuple[str, str, str]:
    """An IOI sentence split as (prompt, indirect object, subject)."""
    io, s = _two_names(rng)
    first, second = (io, s) if rng.random() < 0.5 else (s, io)
    place, obj, verb = rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(VERBS_GIVE)
    opener = rng.choice([
        f"When {first} and {second} went to the {place},",
        f"While {first} and {second} were at the {place},",
        f"After {first} and {second} arrived at the {place},",
        f"Then, {first} and {second} walked to the {place}.",
    ])
    return f"{opener} {s} {verb} a {obj} to", io, s


def quote_sentence(rng: random.Random) -> tuple[str, str]:
    """A line of dialogue split as (text up to the final period, closing quote)."""
    body = rng.choice(QUOTE_BODIES).format(
        adj=rng.choice(ADJECTIVES), obj=rng.choice(OBJECTS), place=rng.choice(PLACES),
        feel=rng.choice(FEELINGS),
    )
    speaker = rng.choice(NAMES)
    verb = rng.choice(SPEECH_VERBS)
    if rng.random() < 0.5:
        return f'{speaker} {verb}, "{body[0].upper()}{body[1:]}.', '"'
    return f'"{body[0].upper()}{body[1:]}," {speaker} {verb}. "Yes, and {body}.', '"'


def agreement_sentence(rng: random.Random) -> tuple[str, str, str, str]:
    """A number-agreement sentence as (prompt, correct verb, wrong verb, complement)."""
    head, attractor = rng.sample(list(NOUNS), 2)
    head_plural, attractor_plural = rng.random() < 0.5, rng.random() < 0.5
    head_word = NOUNS[head] if head_plural else head
    attractor_word = NOUNS[attractor] if attractor_plural else attractor
    singular, plural = rng.choice(AGREEMENT_VERBS)
    right, wrong = (plural, singular) if head_plural else (singular, plural)
    prompt = f"The {head_word} {rng.choice(PREPOSITIONS)} the {attractor_word}"
    return prompt, right, wrong, rng.choice(VERB_COMPLEMENTS[right])


def story_sentences(rng: random.Random) -> list[str]:
    """A short narrative: a character, a place, a found object and a feeling."""
    name = rng.choice(NAMES)
    pronoun = _pronoun(name)
    return [
        f"Once upon a time, there was a {rng.choice(ADJECTIVES)} child named {name}.",
        f"{name} liked to play in the {rng.choice(PLACES)}.",
        f"One day, {pronoun.lower()} found a {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}.",
        f"{pronoun} was very {rng.choice(FEELINGS)}.",
    ]


def narrative_sentence(rng: random.Random) -> str:
    """A plain sentence that ends with a period outside any quote."""
    starter = rng.choice(NARRATIVE_STARTERS)
    place = rng.choice(PLACES)
    if starter == "The":
        return f"The {rng.choice(OBJECTS)} was {rng.choice(ADJECTIVES)}."
    if starter in ("She", "He"):
        return f"{starter} walked to the {place}."
    name = rng.choice(NAMES)
    return f"{starter}, {name} {rng.choice(['went', 'ran', 'walked'])} to the {place}."


def _complete_ioi(rng: random.Random) -> str:
    prompt, io, _ = ioi_sentence(rng)
    return f"{prompt} {io}."


def _complete_quote(rng: random.Random) -> str:
    text, close = quote_sentence(rng)
    return text + close


def _complete_agreement(rng: random.Random) -> str:
    prompt, right, _, complement = agreement_sentence(rng)
    return f"{prompt} {right} {complement}."


SENTENCE_KINDS: list[tuple[float, Callable[[random.Random], str]]] = [
    (0.30, _complete_ioi),
    (0.25, _complete_quote),
    (0.25, _complete_agreement),
    (0.20, narrative_sentence),
]


def document(rng: random.Random) -> str:
    """One training document: sometimes a story opening, then 3-7 mixed sentences."""
    parts = story_sentences(rng) if rng.random() < 0.3 else []
    weights = [w for w, _ in SENTENCE_KINDS]
    for _ in range(rng.randint(3, 7)):
        _, make = rng.choices(SENTENCE_KINDS, weights=weights)[0]
        parts.append(make(rng))
    return " ".join(parts)


def corpus(seed: int, n_documents: int) -> list[str]:
    """`n_documents` documents drawn deterministically from `seed`."""
    rng = random.Random(seed)
    return [document(rng) for _ in range(n_documents)]


TASKS = ("ioi", "closing_quote", "agreement")


def task_prompts(task: str, seed: int, n: int) -> list[dict[str, str]]:
    """`n` distinct prompts of a task as dicts with `prompt`, `answer` and `distractor`.

    A prompt is preceded by one narrative sentence, so the task token is never at the
    start of the context. For the closing quote the distractor is the most frequent
    sentence opener outside quotes ("The"), which is what a period predicts with no quote
    open.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the zoo has {', '.join(TASKS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        lead = narrative_sentence(rng)
        if task == "ioi":
            prompt, answer, distractor = ioi_sentence(rng)
        elif task == "closing_quote":
            prompt, answer = quote_sentence(rng)
            distractor = "The"
        else:
            prompt, answer, distractor, _ = agreement_sentence(rng)
        text = f"{lead} {prompt}"
        if text not in seen:
            seen.add(text)
            rows.append({"prompt": text, "answer": answer, "distractor": distractor})
    return rows
