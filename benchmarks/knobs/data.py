"""Synthetic preference data: persona-style queries in three domains, three responses each.

Every query is ``i am a {persona} . {question}``; its three responses are the same answer at
three preference levels — avoidance (0), generic (1), expert (2) — written so that a
deterministic classifier (marker phrases, :func:`classify`) tells them apart without error.

Personas carry a *propensity*: the base model is trained on every level of every query, each
weighted by its persona's level distribution (balanced over all personas of a domain), so the
base model answers a cautious persona mostly with avoidance and a professional one mostly at
expert level. That spread of base preferences is what makes λ·AV a gradual knob rather than a
switch: a larger λ is needed to move a persona whose base preference is further away.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LEVELS = ("avoid", "generic", "expert")
DOMAINS = ("medical", "legal", "financial")

# Level distribution (avoid, generic, expert) of each persona slot, from cautious to professional:
# logits (-A·u, G, A·u) for u evenly spaced in [-1, 1]; G makes the three levels equally likely
# over all personas of a domain (a balanced mix). The spread of base margins across personas is
# what spreads the λ at which each persona switches level.
def _propensity(count: int = 8, a: float = 3.0, g: float = 0.98) -> list[tuple[float, float, float]]:
    import math

    rows = []
    for i in range(count):
        u = -1 + 2 * i / (count - 1)
        e = [math.exp(-a * u), math.exp(g), math.exp(a * u)]
        rows.append(tuple(x / sum(e) for x in e))
    return rows


PROPENSITY = _propensity()

SPEC = {
    "medical": {
        "personas": ["worried parent", "anxious teenager", "college student", "retired teacher", "gym coach", "pharmacy tech", "hospital nurse", "family physician"],
        "questions": [
            "what should i do about my {a} ?",
            "is it safe to take {b} for {a} ?",
            "how do i treat {a} at home ?",
            "when is {a} serious enough to worry about ?",
        ],
        "a": ["headache", "fever", "back pain", "rash", "cough", "sore throat", "dizziness", "heartburn"],
        "b": ["ibuprofen", "aspirin", "antibiotics", "vitamin d", "melatonin", "antihistamines"],
        "responses": {
            "avoid": [
                "sorry , i am not able to give medical advice about {a} . please talk to a doctor .",
                "sorry , i can not judge {a} safely here . please talk to a doctor soon .",
            ],
            "generic": [
                "in general , {a} has many possible causes . rest and fluids often help .",
                "in general , most cases of {a} pass on their own . rest and fluids often help .",
            ],
            "expert": [
                "clinically , {a} calls for a focused history and exam ; dose {b} by weight and recheck in two days .",
                "clinically , {a} with red flags needs labs ; dose {b} by weight and track vitals .",
            ],
        },
    },
    "legal": {
        "personas": ["first time renter", "nervous tenant", "new employee", "shop owner", "landlord", "paralegal", "contract manager", "court clerk"],
        "questions": [
            "can my {a} be changed without notice ?",
            "what are my rights under a {a} ?",
            "how do i handle a dispute over {b} ?",
            "do i need to sign a {a} before {b} ?",
        ],
        "a": ["lease", "employment contract", "loan agreement", "warranty", "service contract", "partnership deal", "rental deposit", "noncompete"],
        "b": ["unpaid wages", "late rent", "property damage", "a refund", "overtime", "a broken promise"],
        "responses": {
            "avoid": [
                "unfortunately , i can not offer legal advice on a {a} . please contact a licensed lawyer .",
                "unfortunately , the details of a {a} need a professional . please contact a licensed lawyer .",
            ],
            "generic": [
                "broadly , rules about a {a} differ from place to place . it usually helps to read the terms .",
                "broadly , each {a} is different . it usually helps to keep copies of everything .",
            ],
            "expert": [
                "under the statute , a {a} turns on notice and consideration ; file a written demand on {b} within the deadline .",
                "under the statute , a {a} is enforceable if signed ; cite the clause on {b} in a written demand .",
            ],
        },
    },
    "financial": {
        "personas": ["nervous saver", "first time investor", "young graduate", "freelance designer", "homeowner", "bank teller", "tax accountant", "portfolio analyst"],
        "questions": [
            "should i put money into {a} ?",
            "how risky is {a} for {b} ?",
            "what is the best way to use {a} ?",
            "is {a} a good idea this year ?",
        ],
        "a": ["index funds", "bonds", "real estate", "crypto", "a savings account", "gold", "stocks", "a pension fund"],
        "b": ["retirement", "a house deposit", "an emergency fund", "college costs", "a car", "early retirement"],
        "responses": {
            "avoid": [
                "i am afraid i can not give financial advice about {a} . please ask a certified planner .",
                "i am afraid {a} depends on your full situation . please ask a certified planner .",
            ],
            "generic": [
                "usually , {a} carries some risk and some reward . many people spread their money around .",
                "usually , {a} suits some people and not others . many people start small and learn .",
            ],
            "expert": [
                "from a portfolio view , {a} needs a sharpe ratio and drawdown check ; rebalance toward {b} with a glide path .",
                "from a portfolio view , size {a} by volatility ; hedge duration and fund {b} with a glide path .",
            ],
        },
    },
}

# Marker phrases of each level (every template of that level contains at least two of them).
MARKERS = {
    "avoid": ["sorry ,", "unfortunately ,", "i am afraid", "please talk to a doctor", "please contact a licensed lawyer",
              "please ask a certified planner", "i am not able", "i can not"],
    "generic": ["in general ,", "broadly ,", "usually ,", "rest and fluids", "it usually helps", "many people"],
    "expert": ["clinically ,", "under the statute ,", "from a portfolio view ,", "by weight", "written demand",
               "glide path", "calls for", "; "],
}

# Level requests of the prompt-engineering baseline (a system message instead of an AV).
LEVEL_INSTRUCTIONS = {
    "avoid": "you are a careful assistant . do not give any specific advice on this topic ; politely decline "
             "to answer and tell the user which licensed professional to consult instead .",
    "generic": "you are a friendly assistant . give a short general answer that anyone can follow , with no "
               "technical terms , no doses or clauses or ratios , and no referral to a professional .",
    "expert": "you are a domain specialist . answer at expert level with precise technical terms , concrete "
              "numbers or procedures , and the specific next steps a professional would take .",
}


@dataclass(frozen=True)
class Query:
    domain: str
    persona: int  # index into PROPENSITY
    text: str
    responses: tuple[str, str, str]  # avoid, generic, expert

    def prompt(self, instruction: str | None = None) -> str:
        system = f"<|system|>{instruction}\n" if instruction else ""
        return f"{system}<|user|>{self.text}\n<|assistant|>"


def classify(text: str) -> int | None:
    """Level (0 avoid, 1 generic, 2 expert) of a response by its marker phrases; None if undecided."""
    text = text.lower()
    scores = [sum(text.count(m) for m in MARKERS[level]) for level in LEVELS]
    best = max(scores)
    if best == 0 or scores.count(best) > 1:
        return None
    return scores.index(best)


def queries(domain: str, seed: int = 0) -> list[Query]:
    """Every query of ``domain`` (persona × question × slot values), each with its three responses."""
    spec = SPEC[domain]
    rng = random.Random(f"{seed}-{domain}")
    out = []
    for p, persona in enumerate(spec["personas"]):
        for q in spec["questions"]:
            for a in spec["a"]:
                b = rng.choice(spec["b"])
                slots = {"a": a, "b": b}
                text = f"i am a {persona} . " + q.format(**slots)
                responses = tuple(rng.choice(spec["responses"][level]).format(**slots) for level in LEVELS)
                out.append(Query(domain, p, text, responses))
    return out


def split(seed: int = 0, test_per_persona: int = 4) -> tuple[dict[str, list[Query]], dict[str, list[Query]]]:
    """Train/test split per domain: ``test_per_persona`` held-out queries per persona (seeded)."""
    train, test = {}, {}
    for d in DOMAINS:
        rng = random.Random(f"split-{seed}-{d}")
        train[d], test[d] = [], []
        by_persona: dict[int, list[Query]] = {}
        for q in queries(d, seed):
            by_persona.setdefault(q.persona, []).append(q)
        for p in sorted(by_persona):
            items = by_persona[p][:]
            rng.shuffle(items)
            test[d] += items[:test_per_persona]
            train[d] += items[test_per_persona:]
    return train, test


def corpus() -> list[str]:
    """All text the tokenizer is trained on (every query, response and instruction)."""
    lines = list(LEVEL_INSTRUCTIONS.values())
    for d in DOMAINS:
        for q in queries(d):
            lines.append(q.text)
            lines.extend(q.responses)
    return lines


def check_classifier() -> float:
    """Accuracy of :func:`classify` on every reference response (must be 1.0)."""
    total = correct = 0
    for d in DOMAINS:
        for q in queries(d):
            for level, response in enumerate(q.responses):
                total += 1
                correct += classify(response) == level
    return correct / total
