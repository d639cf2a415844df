"""The built-in offline suite: small, seeded instruction domains a tiny model can learn on a CPU.

Six instruction domains need different skills, so experts have something to specialise on, and
their answers are short, so exact-match accuracy by greedy generation is a meaningful metric:

==================  ====================================================  ==================
domain              prompt (example)                                      answer
==================  ====================================================  ==================
``arithmetic``      ``What is 47 + 38?``                                  ``85``
``arithmetic_alt``  ``Add 47 and 38.`` (same skill, reworded)             ``85``
``strings``         ``Reverse the letters: k a m o``                      ``o m a k``
``sorting``         ``Sort these numbers: 5 2 9 1``                       ``1 2 5 9``
``lookup``          ``What is the color of zorb?`` (memorised world)      ``blue``
``expressions``     ``Evaluate: max(3, 9) - 2``                           ``7``
==================  ====================================================  ==================

``arithmetic_alt`` is a deliberate near-duplicate of ``arithmetic`` (:data:`NEAR_DUPLICATES`) for
testing redundancy-aware data mixing. Letters in ``strings`` are space-separated so each is one
token (a tiny BPE would otherwise merge them and reversal would be unlearnable).

Splits never share a record: an item's split is a hash of its content (``arithmetic`` and
``arithmetic_alt`` share the hash, so a test sum of one is never a training sum of the other);
``lookup`` facts are fixed by a world table (40 entities x 4 attributes) that every split uses;
a question is a (fact, phrasing) pair of six phrasings, hashed to a split, and an eval question's
fact is always asked in training under another phrasing: the model must recall a memorised fact
asked in a way it has not seen for that fact (but has seen for others). The ``pretrain`` corpus is plain text made
from the same world (facts, worked sums, reversals, ...) drawn from the matching split.

Generation is deterministic: the same ``(domain, split, n, seed)`` gives the same records on every
machine (string-seeded :class:`random.Random`, ``hashlib`` for split assignment).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Hashable

from moe_app.core.data.formats import Example, Message
from moe_app.errors import ConfigError

SUITE_DOMAINS: tuple[str, ...] = (
    "arithmetic",
    "arithmetic_alt",
    "strings",
    "sorting",
    "lookup",
    "expressions",
)
"""The instruction domains of the built-in suite."""
NEAR_DUPLICATES: dict[str, str] = {"arithmetic_alt": "arithmetic"}
"""Domain -> the domain it near-duplicates (same skill, reworded prompts)."""
PRETRAIN = "pretrain"
"""Name of the plain-text corpus made from the same worlds."""
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SIZES: dict[str, int] = {"train": 2000, "val": 100, "test": 100}
"""Records per domain and split when ``n`` is not given."""

# Hash bucket (of 100) boundaries: [0, 80) train, [80, 90) val, [90, 100) test. Lookup has a
# small item pool (960 questions), so it gives its eval splits a larger share.
_SPLIT_BUCKETS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
_LOOKUP_BUCKETS = {"train": (0, 70), "val": (70, 85), "test": (85, 100)}
_WORLD_SEED = "moe-app-suite-world-v1"  # fixed: the lookup world is the same for every seed

# --------------------------------------------------------------------------------------------
# The lookup world: 40 invented entities with four attributes each, asked in six phrasings.

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "home": ("forest", "desert", "river", "mountain", "island", "valley", "cave", "meadow"),
    "food": ("apples", "fish", "seeds", "honey", "roots", "berries", "leaves", "bread"),
    "tool": ("hammer", "rope", "lamp", "spoon", "brush", "needle", "kettle", "ladder"),
}
LOOKUP_TEMPLATES: tuple[str, ...] = (
    "What is the {attr} of {name}?",
    "Tell me the {attr} of {name}.",
    "{name}: which {attr}?",
    "Which {attr} does {name} have?",
    "Name the {attr} of {name}.",
    "What {attr} goes with {name}?",
)
NUM_ENTITIES = 40


def _make_world() -> dict[str, dict[str, str]]:
    rng = random.Random(_WORLD_SEED)
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ("b", "k", "l", "m", "n", "p", "r", "sh", "x", "z")
    names: list[str] = []
    while len(names) < NUM_ENTITIES:
        name = rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
        if rng.random() < 0.5:
            name += rng.choice(vowels)
        if name not in names:
            names.append(name)
    return {name: {attr: rng.choice(values) for attr, values in ATTRIBUTES.items()} for name in names}


WORLD: dict[str, dict[str, str]] = _make_world()
"""Entity -> {attribute: value}; fixed (independent of any seed)."""


# --------------------------------------------------------------------------------------------
# Split assignment and sampling.


def _bucket(family: str, key: Hashable) -> int:
    digest = hashlib.sha256(f"{family}|{key!r}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


def split_of(family: str, key: Hashable) -> str:
    """The split an item belongs to, fixed by its content."""
    b = _bucket(family, key)
    buckets = _LOOKUP_BUCKETS if family == "lookup" else _SPLIT_BUCKETS
    return next(s for s, (lo, hi) in buckets.items() if lo <= b < hi)


def _lookup_split(key: tuple[str, str, str]) -> str:
    """Split of a lookup question; an eval question whose fact has no training phrasing is
    moved to train (a fact never asked in training cannot be recalled)."""
    split = split_of("lookup", key)
    name, attr, _ = key
    if split != "train" and not any(split_of("lookup", (name, attr, t)) == "train" for t in LOOKUP_TEMPLATES):
        return "train"
    return split


def _sample(
    rng: random.Random, n: int, draw: Callable[[random.Random], Hashable], accept: Callable[[Hashable], bool]
) -> list:
    """``n`` distinct accepted keys; once the accepted pool looks exhausted, repeats are allowed."""
    keys: list = []
    seen: set = set()
    misses = 0
    while len(keys) < n and misses < 2000:
        key = draw(rng)
        if key in seen or not accept(key):
            misses += 1
            continue
        misses = 0
        seen.add(key)
        keys.append(key)
    if not keys:
        raise RuntimeError("suite generator found no item for this split")  # a bug, not a user error
    while len(keys) < n:
        keys.append(rng.choice(keys[: len(seen)]))
    return keys


def _rng(domain: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{seed}|{domain}|{split}")


# --------------------------------------------------------------------------------------------
# Domain item generators: each returns (prompt, answer) for a key.


def _draw_sum(rng: random.Random) -> tuple[int, int]:
    return (rng.randint(10, 99), rng.randint(10, 99))


_ALT_TEMPLATES = ("Add {a} and {b}.", "Compute the sum of {a} and {b}.", "{a} plus {b} equals what?")


def _arithmetic(key: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    a, b = key
    return f"What is {a} + {b}?", str(a + b)


def _arithmetic_alt(key: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    a, b = key
    return rng.choice(_ALT_TEMPLATES).format(a=a, b=b), str(a + b)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _draw_string(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 4)))
    return (rng.choice(("reverse", "upper")), word)


def _strings(key: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    op, word = key
    spaced = " ".join(word)
    if op == "reverse":
        return f"Reverse the letters: {spaced}", " ".join(reversed(word))
    return f"Write in capitals: {spaced}", spaced.upper()


def _draw_list(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randint(0, 9) for _ in range(rng.randint(3, 6)))


def _sorting(key: tuple[int, ...], rng: random.Random) -> tuple[str, str]:
    return "Sort these numbers: " + " ".join(map(str, key)), " ".join(map(str, sorted(key)))


_EXPR_FORMS = ("({a}+{b})*{c}", "{a}*{b}+{c}", "max({a}, {b}) - {c}", "min({a}, {b}) + {c}", "{a}+{b}-{c}")


def _draw_expr(rng: random.Random) -> tuple[int, int, int, int]:
    return (rng.randrange(len(_EXPR_FORMS)), rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9))


def _eval_expr(form: int, a: int, b: int, c: int) -> int:
    return ((a + b) * c, a * b + c, max(a, b) - c, min(a, b) + c, a + b - c)[form]


def _expressions(key: tuple[int, int, int, int], rng: random.Random) -> tuple[str, str]:
    form, a, b, c = key
    return "Evaluate: " + _EXPR_FORMS[form].format(a=a, b=b, c=c), str(_eval_expr(form, a, b, c))


def _lookup(key: tuple[str, str, str], rng: random.Random) -> tuple[str, str]:
    name, attr, template = key
    return template.format(attr=attr, name=name), WORLD[name][attr]


# domain -> (split-hash family, draw key, render key)
_DOMAINS: dict[str, tuple[str, Callable, Callable]] = {
    "arithmetic": ("arithmetic", _draw_sum, _arithmetic),
    "arithmetic_alt": ("arithmetic", _draw_sum, _arithmetic_alt),
    "strings": ("strings", _draw_string, _strings),
    "sorting": ("sorting", _draw_list, _sorting),
    "expressions": ("expressions", _draw_expr, _expressions),
}


def _lookup_keys(split: str, n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    names, attrs = sorted(WORLD), tuple(ATTRIBUTES)

    def draw(r: random.Random) -> tuple[str, str, str]:
        return (r.choice(names), r.choice(attrs), r.choice(LOOKUP_TEMPLATES))

    return _sample(rng, n, draw, lambda key: _lookup_split(key) == split)


def _check_args(domain: str, split: str, n: int | None) -> int:
    if domain not in (*SUITE_DOMAINS, PRETRAIN):
        raise ConfigError(
            f"unknown built-in suite domain {domain!r}",
            fix=f"use one of {[*SUITE_DOMAINS, PRETRAIN]} (or 'all' on a source).",
        )
    if split not in SPLITS:
        raise ConfigError(f"unknown suite split {split!r}", fix=f"use one of {list(SPLITS)}.")
    n = DEFAULT_SIZES[split] if n is None else n
    if n < 1:
        raise ConfigError(f"suite size must be >= 1, got {n}", fix="ask for at least one record.")
    return n


def generate_domain(domain: str, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """``n`` records (default :data:`DEFAULT_SIZES`) of one suite domain; ``"pretrain"`` gives text."""
    n = _check_args(domain, split, n)
    rng = _rng(domain, split, seed)
    if domain == PRETRAIN:
        return generate_pretrain(split, n, seed)
    if domain == "lookup":
        keys, render = _lookup_keys(split, n, rng), _lookup
    else:
        family, draw, render = _DOMAINS[domain]
        keys = _sample(rng, n, draw, lambda key: split_of(family, key) == split)
    out = []
    for key in keys:
        prompt, answer = render(key, rng)
        out.append(
            Example(
                messages=[Message("user", prompt), Message("assistant", answer)],
                domain=domain,
                reference=answer,
                meta={"where": f"suite {domain}/{split}"},
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# The plain-text corpus.


def _pretrain_sentence(kind: str, split: str, rng: random.Random) -> str:
    if kind == "fact":
        name = rng.choice(sorted(WORLD))
        attr = rng.choice(tuple(ATTRIBUTES))
        return f"The {attr} of {name} is {WORLD[name][attr]}."
    family, draw, _render = _DOMAINS[kind]
    key = _sample(rng, 1, draw, lambda k: split_of(family, k) == split)[0]
    if kind == "arithmetic":
        a, b = key
        return f"{a} + {b} = {a + b}."
    if kind == "strings":
        word = key[1]
        return f"{' '.join(word)} reversed is {' '.join(reversed(word))}; in capitals it is {' '.join(word).upper()}."
    if kind == "sorting":
        return f"Sorted, {' '.join(map(str, key))} becomes {' '.join(map(str, sorted(key)))}."
    form, a, b, c = key
    return f"{_EXPR_FORMS[form].format(a=a, b=b, c=c)} equals {_eval_expr(form, a, b, c)}."


_PRETRAIN_KINDS = ("fact", "fact", "arithmetic", "strings", "sorting", "expressions")


def generate_pretrain(split: str, n: int | None = None, seed: int = 0) -> list[Example]:
    """``n`` plain-text documents (4-8 sentences each) about the suite's worlds."""
    n = _check_args(PRETRAIN, split, n)
    rng = _rng(PRETRAIN, split, seed)
    docs = []
    for _ in range(n):
        sentences = [
            _pretrain_sentence(rng.choice(_PRETRAIN_KINDS), split, rng) for _ in range(rng.randint(4, 8))
        ]
        docs.append(
            Example(text=" ".join(sentences), domain=PRETRAIN, meta={"where": f"suite pretrain/{split}"})
        )
    return docs


def generate_suite(
    split: str, n: int | None = None, seed: int = 0, domains: tuple[str, ...] = SUITE_DOMAINS
) -> list[Example]:
    """All (or the given) instruction domains of one split, concatenated in domain order."""
    return [ex for d in domains for ex in generate_domain(d, split, n, seed)]


# --------------------------------------------------------------------------------------------
# Exact-match checkers.

_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Collapse whitespace and strip; drop one trailing period."""
    text = _WS.sub(" ", text).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _as_int(text: str) -> int | None:
    try:
        return int(text.replace(" ", ""))
    except ValueError:
        return None


def check(domain: str | None, prediction: str, reference: str) -> bool:
    """Exact match after normalisation: integers compare as numbers (``arithmetic*``,
    ``expressions``), ``sorting`` compares the number sequence, ``lookup`` ignores case, and any
    other domain (including user data) compares normalised strings."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if domain in ("arithmetic", "arithmetic_alt", "expressions"):
        p, r = _as_int(pred), _as_int(ref)
        return p is not None and p == r
    if domain == "sorting":
        return re.findall(r"-?\d+", pred) == re.findall(r"-?\d+", ref) and bool(ref)
    if domain == "lookup":
        return pred.lower() == ref.lower()
    return pred == ref
