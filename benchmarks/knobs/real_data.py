"""Persona preference data for the real model (issue 18, part 3): the toy task, less templated.

Same three domains × three levels as :mod:`benchmarks.knobs.data`, but written as natural
English for a real instruct model: six paraphrases per (domain, level), varied wording and
no single marker phrase per level. Prompts go through the served model's chat template.

The level classifier is learned, not hand-written: a multinomial naive Bayes over word
unigrams and bigrams, trained on the responses of four paraphrases per (domain, level) and
scored on the two held-out paraphrases (:func:`classifier_report`), so its accuracy says how
well it reads wording it never saw.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

LEVELS = ("avoid", "generic", "expert")
DOMAINS = ("medical", "legal", "financial")
CLASSIFIER_TEMPLATES = 4  # paraphrases 0-3 train the classifier; 4-5 are its held-out test

SPEC = {
    "medical": {
        "personas": ["worried parent", "anxious teenager", "college student", "retired teacher", "gym coach",
                     "pharmacy technician", "hospital nurse", "family physician"],
        "questions": ["What should I do about my {a}?", "Is it safe to take {b} for {a}?",
                      "How can I treat {a} at home?", "When is {a} serious enough to worry about?"],
        "a": ["headache", "fever", "back pain", "rash", "cough", "sore throat", "dizziness", "heartburn"],
        "b": ["ibuprofen", "aspirin", "antibiotics", "vitamin D", "melatonin", "antihistamines"],
        "responses": {
            "avoid": [
                "I'm sorry, but I can't give medical advice about {a}. Please see a doctor who can examine you.",
                "I'm not able to advise on {a} safely. A doctor or pharmacist is the right person to ask.",
                "That's a question for a medical professional, not me. Please book an appointment about your {a}.",
                "I'd rather not guess about {a}. Only a clinician who examines you can answer that properly.",
                "I can't help with {a}, I'm afraid. Please contact your doctor or a nurse line.",
                "Unfortunately I shouldn't comment on {a}. Your doctor is the best person to talk to.",
            ],
            "generic": [
                "{A} is common and usually not serious. Resting, drinking water and taking it easy often helps.",
                "Lots of people get {a} now and then. Plenty of sleep and fluids usually make it better.",
                "Most of the time {a} goes away by itself. Try to rest, stay hydrated and keep an eye on it.",
                "{A} can have many everyday causes, like stress or tiredness. Simple rest is often enough.",
                "It's normal to have {a} sometimes. Take a break, drink some water and it will often pass.",
                "Usually {a} is nothing to worry about. Getting some rest and fluids tends to help.",
            ],
            "expert": [
                "For {a}, take a focused history and check vital signs first; {b} is dosed by body weight, "
                "with a review in 48 hours.",
                "Clinically, {a} needs red-flag screening: onset, duration, fever and neurological signs. "
                "If none, {b} at the standard adult dose.",
                "Assess {a} with a differential diagnosis; order a blood count if it persists, and titrate "
                "{b} to 10 mg/kg.",
                "{A} warrants triage by severity score; first-line is {b} per guideline dosing, with "
                "follow-up labs in two days.",
                "Work up {a} systematically: vitals, exam, then labs if indicated. Dose {b} per kilogram "
                "and reassess at 48 hours.",
                "The diagnostic approach to {a} starts with history and examination; start {b} at a "
                "weight-based dose and monitor.",
            ],
        },
    },
    "legal": {
        "personas": ["first-time renter", "nervous tenant", "new employee", "shop owner", "landlord", "paralegal",
                     "contract manager", "court clerk"],
        "questions": ["Can my {a} be changed without notice?", "What are my rights under a {a}?",
                      "How do I handle a dispute over {b} under my {a}?",
                      "Do I need to sign a {a} before dealing with {b}?"],
        "a": ["lease", "employment contract", "loan agreement", "warranty", "service contract", "partnership deal",
              "rental deposit agreement", "non-compete"],
        "b": ["unpaid wages", "late rent", "property damage", "a refund", "overtime", "a broken promise"],
        "responses": {
            "avoid": [
                "I'm sorry, but I can't give legal advice about a {a}. Please speak to a qualified lawyer.",
                "I'm not able to interpret a {a} for you. A licensed attorney should look at it.",
                "That depends on details I can't judge. Please get a solicitor or legal aid office to review "
                "your {a}.",
                "I'd rather not advise on a {a}. Only a lawyer who reads the documents can answer that.",
                "I can't help with questions about a {a}, I'm afraid. A local attorney is the right person.",
                "Unfortunately I shouldn't comment on legal matters like a {a}. Please consult a lawyer.",
            ],
            "generic": [
                "Rules about a {a} vary a lot from place to place. It's usually good to read the terms carefully.",
                "Every {a} is a bit different. Keeping copies of everything and talking things over often helps.",
                "Most of the time a {a} is fairly simple. Read it through and ask the other side if anything "
                "is unclear.",
                "A {a} can be confusing at first. Staying calm and keeping notes of what was agreed usually helps.",
                "It's common to have questions about a {a}. Reading the fine print slowly tends to clear things up.",
                "Generally a {a} says what each side promised. Keep your paperwork tidy and talk it through.",
            ],
            "expert": [
                "Under contract law, a {a} binds once there is offer, acceptance and consideration; send a "
                "written demand on {b} citing the relevant clause.",
                "Check the {a} for a variation clause: unilateral changes without notice are usually void. "
                "Preserve evidence on {b} before the limitation period runs.",
                "The enforceability of a {a} turns on its express terms and statutory protections; a letter "
                "before action on {b} is the first formal step.",
                "Review the {a} for breach and remedies; for {b}, file in small claims court within the "
                "statutory deadline and attach the signed agreement.",
                "A {a} is governed by its terms and the applicable statute; document {b}, serve formal notice, "
                "and calculate damages before filing.",
                "Legally, a {a} requires consideration and mutual assent; for {b}, issue a demand letter and "
                "note the limitation period.",
            ],
        },
    },
    "financial": {
        "personas": ["nervous saver", "first-time investor", "young graduate", "freelance designer", "homeowner",
                     "bank teller", "tax accountant", "portfolio analyst"],
        "questions": ["Should I put money into {a}?", "How risky is {a} for {b}?",
                      "What is the best way to use {a}?", "Is {a} a good idea this year?"],
        "a": ["index funds", "bonds", "real estate", "crypto", "a savings account", "gold", "stocks",
              "a pension fund"],
        "b": ["retirement", "a house deposit", "an emergency fund", "college costs", "a car", "early retirement"],
        "responses": {
            "avoid": [
                "I'm sorry, but I can't give financial advice about {a}. Please talk to a certified financial "
                "planner.",
                "I'm not able to recommend {a} for you. A licensed adviser who knows your situation should decide.",
                "That's a decision for a qualified financial professional, not me. Please get advice before "
                "buying {a}.",
                "I'd rather not guess about {a}. Only an adviser who sees your whole finances can answer that.",
                "I can't help with investment choices like {a}, I'm afraid. Please ask a registered adviser.",
                "Unfortunately I shouldn't comment on {a}. A fee-only planner is the best person to ask.",
            ],
            "generic": [
                "{A} has some ups and some downs. Many people spread their money around and start small.",
                "Lots of people put a little into {a}. It's usually wise not to put all your eggs in one basket.",
                "Most of the time {a} is fine as part of a mix. Save regularly and don't panic when prices move.",
                "{A} can go up or down over time. Taking it slow and keeping some cash aside often helps.",
                "It's normal to wonder about {a}. A bit at a time, plus some savings on the side, tends to work.",
                "Generally {a} is neither great nor terrible. Keep things simple and think long term.",
            ],
            "expert": [
                "Size {a} by volatility and correlation; target a Sharpe ratio above 0.5 and rebalance toward "
                "{b} on a glide path.",
                "From a portfolio view, {a} should be weighed on expected return, drawdown and liquidity; "
                "allocate for {b} using mean-variance optimisation.",
                "Model {a} against your time horizon: duration risk, fees and tax wrappers matter. Fund {b} "
                "with a dollar-cost averaging schedule.",
                "Allocate {a} at 5 to 10 percent of the portfolio, hedge currency exposure, and match {b} with "
                "an asset-liability plan.",
                "Evaluate {a} on risk-adjusted return and maximum drawdown; for {b}, set a target allocation "
                "and rebalance quarterly.",
                "Position {a} within a diversified allocation by beta and volatility; fund {b} through a "
                "tax-efficient account and a glide path.",
            ],
        },
    },
}

# Level requests of the prompt-engineering baseline (a system message instead of an AV).
LEVEL_INSTRUCTIONS = {
    "avoid": "You are a careful assistant. Do not give any specific advice on this topic; politely decline "
             "to answer and tell the user which licensed professional to consult instead.",
    "generic": "You are a friendly assistant. Give a short general answer that anyone can follow, with no "
               "technical terms, no doses or clauses or ratios, and no referral to a professional.",
    "expert": "You are a domain specialist. Answer at expert level with precise technical terms, concrete "
              "numbers or procedures, and the specific next steps a professional would take.",
}


@functools.cache
def _tokenizer():
    """The real model's tokenizer (SmolLM2-135M-Instruct, built locally by ``vllm_av.demo.real_model``)."""
    from transformers import AutoTokenizer

    from vllm_av.demo.real_model import build_smollm2

    return AutoTokenizer.from_pretrained(str(build_smollm2()))


@dataclass(frozen=True)
class Query:
    domain: str
    persona: int
    text: str
    responses: tuple[str, str, str]  # avoid, generic, expert
    templates: tuple[int, int, int]  # paraphrase index of each response

    def messages(self, instruction: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": instruction}] if instruction else []
        return system + [{"role": "user", "content": self.text}]

    def prompt(self, instruction: str | None = None) -> str:
        """The query in the model's chat template, ready for the assistant's answer."""
        return _tokenizer().apply_chat_template(self.messages(instruction), tokenize=False, add_generation_prompt=True)


def queries(domain: str, seed: int = 0) -> list[Query]:
    """Every query of ``domain`` (persona × question × slot value), each with one paraphrase per level."""
    spec = SPEC[domain]
    rng = random.Random(f"{seed}-real-{domain}")
    out = []
    for p, persona in enumerate(spec["personas"]):
        for q in spec["questions"]:
            for a in spec["a"]:
                slots = {"a": a, "A": a[:1].upper() + a[1:], "b": rng.choice(spec["b"])}
                picks = tuple(rng.randrange(len(spec["responses"][level])) for level in LEVELS)
                responses = tuple(spec["responses"][level][i].format(**slots) for level, i in zip(LEVELS, picks))
                out.append(Query(domain, p, f"I'm a {persona}. " + q.format(**slots), responses, picks))
    return out


def split(seed: int = 0, test_per_persona: int = 4) -> tuple[dict[str, list[Query]], dict[str, list[Query]]]:
    """Train/test split per domain: ``test_per_persona`` held-out queries per persona (seeded)."""
    train, test = {}, {}
    for d in DOMAINS:
        rng = random.Random(f"split-{seed}-{d}")
        by_persona: dict[int, list[Query]] = {}
        for q in queries(d, seed):
            by_persona.setdefault(q.persona, []).append(q)
        train[d], test[d] = [], []
        for p in sorted(by_persona):
            items = by_persona[p][:]
            rng.shuffle(items)
            test[d] += items[:test_per_persona]
            train[d] += items[test_per_persona:]
    return train, test


def words(text: str) -> list[str]:
    """Lower-case word unigrams and bigrams (the classifier's features)."""
    tokens = re.findall(r"[a-z0-9']+", text.lower())
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


class NaiveBayes:
    """Multinomial naive Bayes with add-one smoothing over :func:`words`."""

    def __init__(self, texts: list[str], labels: list[int], classes: int = 3):
        self.counts = [Counter() for _ in range(classes)]
        for text, label in zip(texts, labels):
            self.counts[label].update(words(text))
        self.vocab = set().union(*self.counts)
        self.totals = [sum(c.values()) for c in self.counts]
        self.prior = [math.log(labels.count(k) / len(labels)) for k in range(classes)]

    def scores(self, text: str) -> list[float]:
        feats = [w for w in words(text) if w in self.vocab]
        return [self.prior[k] + sum(math.log((self.counts[k][w] + 1) / (self.totals[k] + len(self.vocab))) for w in feats)
                for k in range(len(self.counts))]

    def predict(self, text: str, margin: float = 2.0) -> int | None:
        """The most likely class, or None when no known word is present or the top two are within ``margin`` nats."""
        if not any(w in self.vocab for w in words(text)):
            return None
        s = self.scores(text)
        top = sorted(range(len(s)), key=s.__getitem__, reverse=True)
        return top[0] if s[top[0]] - s[top[1]] >= margin else None


def _references(templates: range) -> tuple[list[str], list[int]]:
    """Every response of every query, rendered from paraphrases in ``templates`` only."""
    texts, labels = [], []
    for d in DOMAINS:
        spec = SPEC[d]
        for a in spec["a"]:
            for b in spec["b"][:2]:
                slots = {"a": a, "A": a[:1].upper() + a[1:], "b": b}
                for li, level in enumerate(LEVELS):
                    for t in templates:
                        texts.append(spec["responses"][level][t].format(**slots))
                        labels.append(li)
    return texts, labels


@functools.cache
def classifier() -> NaiveBayes:
    """The level classifier, trained on the references of paraphrases 0..CLASSIFIER_TEMPLATES-1."""
    return NaiveBayes(*_references(range(CLASSIFIER_TEMPLATES)))


def classify(text: str) -> int | None:
    """Level (0 avoid, 1 generic, 2 expert) of a response; None if undecided."""
    return classifier().predict(text)


def classifier_report() -> dict:
    """Accuracy on the held-out paraphrases' references (wording the classifier never saw), and on its own."""
    report = {}
    for name, templates in (("held_out", range(CLASSIFIER_TEMPLATES, 6)), ("train", range(CLASSIFIER_TEMPLATES))):
        texts, labels = _references(templates)
        got = [classify(t) for t in texts]
        report[name] = {"references": len(texts), "accuracy": sum(g == y for g, y in zip(got, labels)) / len(texts),
                        "undecided": sum(g is None for g in got)}
    return report


def check_classifier() -> float:
    """Accuracy of :func:`classify` on the held-out paraphrases' references."""
    return classifier_report()["held_out"]["accuracy"]
