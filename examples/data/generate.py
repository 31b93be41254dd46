"""Regenerate the small, learnable example datasets in this folder (deterministic).

    python examples/data/generate.py

Patterns are simple on purpose: a tiny random model must visibly learn them in a few dozen
CPU steps, which is what the tests check.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(7)

INTENTS = {
    "reset my password": "Open Settings, choose Security and press Reset password.",
    "change my email address": "Open Settings, choose Profile and edit the email field.",
    "cancel my subscription": "Open Billing and press Cancel plan; access lasts to the period end.",
    "download my invoice": "Open Billing, choose History and press Download next to the invoice.",
    "delete my account": "Open Settings, choose Privacy and press Delete account.",
    "enable two factor login": "Open Settings, choose Security and turn on Two-factor login.",
    "update my card": "Open Billing, choose Payment method and enter the new card.",
    "contact a human": "Write to help@example.com and an agent answers within a day.",
    "export my data": "Open Settings, choose Privacy and press Export data.",
    "change the language": "Open Settings, choose Language and pick one from the list.",
}
ASKS = ["How do I {}?", "how can I {}", "I want to {}.", "Please help me {}.", "Can I {}?",
        "What is the way to {}?", "Tell me how to {}.", "I need to {} now."]

COUNTRIES = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin",
    "Portugal": "Lisbon", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Egypt": "Cairo", "Japan": "Tokyo", "Peru": "Lima",
    "Chile": "Santiago", "Kenya": "Nairobi", "Canada": "Ottawa", "Cuba": "Havana",
}
QUESTIONS = ["capital of {}", "what is the capital of {}", "name the capital of {}"]

GOOD = ["great", "lovely", "excellent", "wonderful", "fantastic", "pleasant", "superb"]
BAD = ["awful", "terrible", "horrible", "dreadful", "poor", "disappointing", "bad"]
THINGS = ["movie", "meal", "service", "hotel", "book", "concert", "game", "trip", "phone"]

SUBJECTS = ["the cat", "the dog", "a bird", "the farmer", "my friend", "the child", "a teacher"]
VERBS = ["sees", "likes", "follows", "finds", "helps", "calls", "watches"]
OBJECTS = ["the ball", "a red apple", "the old tree", "the river", "a small house", "the moon"]


def support() -> list[dict[str, str]]:
    rows = [{"prompt": f"Customer: {ask.format(intent)}\nAgent:", "completion": f" {answer}"}
            for intent, answer in INTENTS.items() for ask in ASKS]
    rng.shuffle(rows)
    return rows


def chat() -> list[dict[str, object]]:
    rows = [{"messages": [
        {"role": "system", "content": "You are a concise support agent."},
        {"role": "user", "content": ask.format(intent)},
        {"role": "assistant", "content": answer},
    ]} for intent, answer in INTENTS.items() for ask in ASKS]
    rng.shuffle(rows)
    return rows


def capitals() -> list[dict[str, str]]:
    rows = [{"question": q.format(country), "answer": city}
            for country, city in COUNTRIES.items() for q in QUESTIONS]
    rng.shuffle(rows)
    return rows


def sentiment() -> list[dict[str, str]]:
    rows = [{"text": f"the {thing} was {adj}", "label": label}
            for label, adjectives in (("positive", GOOD), ("negative", BAD))
            for adj in adjectives for thing in THINGS]
    rng.shuffle(rows)
    return rows


def corpus() -> list[str]:
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ."
            for _ in range(300)]


def support_pairs() -> list[dict[str, str]]:
    """Preference pairs: the right answer is chosen, another intent's answer is rejected."""
    pair_rng = random.Random(14)  # its own stream: the files above stay byte-identical
    intents = list(INTENTS)
    rows = []
    for intent, answer in INTENTS.items():
        for ask in ASKS:
            wrong = pair_rng.choice([i for i in intents if i != intent])
            rows.append({"prompt": f"Customer: {ask.format(intent)}\nAgent:",
                         "chosen": f" {answer}", "rejected": f" {INTENTS[wrong]}"})
    pair_rng.shuffle(rows)
    return rows


def chat_pairs(rows: list[dict[str, str]]) -> list[dict[str, object]]:
    """The same pairs as conversations sharing their system and user turns."""
    def conversation(row: dict[str, str], answer: str) -> list[dict[str, str]]:
        ask = row["prompt"].removeprefix("Customer: ").removesuffix("\nAgent:")
        return [{"role": "system", "content": "You are a concise support agent."},
                {"role": "user", "content": ask},
                {"role": "assistant", "content": answer.strip()}]

    return [{"chosen": conversation(r, r["chosen"]), "rejected": conversation(r, r["rejected"])}
            for r in rows]


def support_sharegpt() -> list[dict[str, object]]:
    """ShareGPT conversations (from/value; human, gpt, system), two questions each."""
    share_rng = random.Random(21)  # its own stream: the files above stay byte-identical
    intents = list(INTENTS.items())
    rows = []
    for intent, answer in intents:
        for ask in ASKS:
            other, other_answer = share_rng.choice(intents)
            rows.append({"id": f"support-{len(rows)}", "conversations": [
                {"from": "system", "value": "You are a concise support agent."},
                {"from": "human", "value": ask.format(intent)},
                {"from": "gpt", "value": answer},
                {"from": "human", "value": f"And to {other}?"},
                {"from": "gpt", "value": other_answer},
            ]})
    share_rng.shuffle(rows)
    return rows


def capitals_alpaca() -> list[dict[str, str]]:
    """Alpaca records: the instruction, an input (the country) or none, the output."""
    alpaca_rng = random.Random(28)
    rows = [{"instruction": "Name the capital city of the country.", "input": country,
             "output": city} for country, city in COUNTRIES.items()]
    rows += [{"instruction": f"What is the capital of {country}?", "input": "", "output": city}
             for country, city in COUNTRIES.items()]
    alpaca_rng.shuffle(rows)
    return rows


def write_jsonl(name: str, rows: list) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rows = support()
    write_jsonl("support.jsonl", rows[:72])
    write_jsonl("support-eval.jsonl", rows[72:])
    write_jsonl("chat.jsonl", chat())
    write_jsonl("capitals.jsonl", capitals())
    with (HERE / "sentiment.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(sentiment())
    (HERE / "corpus.txt").write_text("\n".join(corpus()) + "\n")
    pairs = support_pairs()
    write_jsonl("support-pairs.jsonl", pairs[:72])
    write_jsonl("support-pairs-eval.jsonl", pairs[72:])
    write_jsonl("chat-pairs.jsonl", chat_pairs(pairs))
    write_jsonl("support-sharegpt.jsonl", support_sharegpt())
    write_jsonl("capitals-alpaca.jsonl", capitals_alpaca())


if __name__ == "__main__":
    main()
