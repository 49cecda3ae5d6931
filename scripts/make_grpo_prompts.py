"""Write src/slimtune/assets/grpo_prompts.jsonl: RL prompts whose instructions code can check.

Everyday topics x instruction templates (the checker types of evaluate/ifeval.py), composed with
a fixed seed, so the file is reproducible: `python scripts/make_grpo_prompts.py`. The held-out
prompts (assets/ifeval_prompts.jsonl) are a different set of topics and wordings;
tests/test_grpo_prompts.py checks that no prompt repeats one, by normalised text or by any
shared 5 words in a row. Every constraint fits an answer of <= 128 tokens from a small model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/slimtune/assets/grpo_prompts.jsonl"

# (subject as it reads after "about", two words a good answer uses, one word to avoid)
TOPICS = [
    ("planning a picnic", ["blanket", "sandwiches"], "food"),
    ("learning to swim", ["breathe", "kick"], "water"),
    ("visiting a museum", ["ticket", "gallery"], "art"),
    ("growing tomatoes", ["soil", "sunlight"], "garden"),
    ("packing for a weekend trip", ["socks", "charger"], "bag"),
    ("keeping a kitchen tidy", ["sponge", "counter"], "clean"),
    ("riding the bus to work", ["stop", "seat"], "driver"),
    ("baking bread at home", ["flour", "oven"], "dough"),
    ("caring for a goldfish", ["tank", "food"], "fish"),
    ("starting a vegetable patch", ["seeds", "weeds"], "plant"),
    ("going camping", ["tent", "fire"], "outdoors"),
    ("learning to play the guitar", ["chords", "practice"], "music"),
    ("writing a shopping list", ["milk", "budget"], "store"),
    ("choosing running shoes", ["fit", "cushion"], "feet"),
    ("a thunderstorm", ["lightning", "thunder"], "rain"),
    ("a visit to the dentist", ["teeth", "chair"], "pain"),
    ("a family board game night", ["dice", "rules"], "win"),
    ("making a paper airplane", ["fold", "wings"], "fly"),
    ("a farmers market", ["stalls", "honey"], "buy"),
    ("cleaning out a closet", ["shelves", "donate"], "clothes"),
    ("watching the stars", ["telescope", "constellation"], "night"),
    ("learning to cook rice", ["pot", "simmer"], "water"),
    ("a first day at a new job", ["colleagues", "desk"], "nervous"),
    ("moving to a new flat", ["boxes", "keys"], "home"),
    ("walking a puppy", ["leash", "treats"], "dog"),
    ("a snowy mountain", ["peak", "cold"], "snow"),
    ("fixing a flat bike tyre", ["pump", "patch"], "wheel"),
    ("a trip to the zoo", ["giraffe", "keeper"], "animals"),
    ("painting a bedroom wall", ["brush", "primer"], "colour"),
    ("a quiet public library afternoon", ["shelves", "silence"], "books"),
    ("feeding birds in winter", ["seeds", "feeder"], "birds"),
    ("a school science fair", ["poster", "experiment"], "project"),
    ("making pancakes", ["batter", "syrup"], "pan"),
    ("taking the train to the coast", ["platform", "window"], "sea"),
    ("learning to knit", ["needles", "yarn"], "wool"),
    ("a windy day at the beach", ["kite", "waves"], "sand"),
    ("organising a desk", ["drawer", "labels"], "mess"),
    ("a lighthouse", ["lamp", "ships"], "light"),
    ("volunteering at an animal shelter", ["kennels", "adopt"], "pets"),
    ("jogging in the morning", ["pace", "stretch"], "run"),
    ("a neighbourhood bakery", ["croissants", "smell"], "bread"),
    ("making a smoothie", ["banana", "blender"], "fruit"),
    ("learning to ride a scooter", ["balance", "brake"], "fall"),
    ("a rainy afternoon indoors", ["puzzle", "blanket"], "bored"),
    ("a birthday cake", ["candles", "frosting"], "sweet"),
]

JSON_THINGS = [  # (what to describe, keys)
    ("a fictional pet hamster", ["name", "colour"]),
    ("a city you would like to visit", ["city", "reason"]),
    ("a made-up board game", ["title", "players"]),
    ("a simple workout", ["exercise", "minutes"]),
    ("a houseguest's arrival", ["guest", "arrival_day"]),
    ("a favourite film", ["film", "genre"]),
    ("a weekly chore", ["chore", "day"]),
    ("a pair of shoes for sale", ["brand", "size", "price"]),
    ("a planet in our solar system", ["planet", "moons"]),
    ("a bus route", ["route", "first_stop", "last_stop"]),
    ("a school subject", ["subject", "teacher"]),
    ("a sandwich order", ["bread", "filling"]),
    ("a weather forecast for tomorrow", ["temperature", "sky"]),
    ("a musical instrument", ["instrument", "family"]),
    ("a tree species", ["tree", "leaf_shape"]),
    ("a short holiday plan", ["destination", "nights"]),
]

CHOICES = [  # (question, options)
    ("Can penguins fly?", ["yes", "no"]),
    ("Is a tomato a fruit or a vegetable, botanically speaking?", ["fruit", "vegetable"]),
    ("Which is heavier, a kilogram of feathers or a kilogram of stones?", ["feathers", "stones", "neither"]),
    ("Does ice float on liquid water?", ["yes", "no"]),
    ("Which comes first in the alphabet, 'kite' or 'lamp'?", ["kite", "lamp"]),
    ("Is the number 9 even or odd?", ["even", "odd"]),
    ("Which is warmer on average, a desert at noon or a glacier at noon?", ["desert", "glacier"]),
    ("Do spiders have six legs or eight legs?", ["six", "eight"]),
    ("Is Mount Everest taller than the Eiffel Tower?", ["yes", "no"]),
    ("Which is faster, a snail or a cheetah?", ["snail", "cheetah"]),
    ("Is a whale a mammal?", ["yes", "no"]),
    ("Which season comes after summer?", ["spring", "autumn", "winter"]),
    ("Is 15 greater than 51?", ["yes", "no"]),
    ("Do bees make honey or milk?", ["honey", "milk"]),
]

TEMPLATES_DOCS = [  # fill-in documents for placeholders
    "a note to a landlord about a leaking tap", "a text message arranging a carpool",
    "a sign-up sheet for a running club", "a reminder about a library book that is due",
    "a message rescheduling a haircut", "a short lost-and-found notice",
    "an out-of-office reply", "a thank-you card for a neighbour who watered the plants",
]

OPENERS = ["Sure thing", "Here you go", "Good question", "In short", "Quick answer", "Well"]
CLOSERS = ["Have a great day.", "That is all.", "Thanks for asking.", "Hope this helps!", "Enjoy!"]
POSTSCRIPTS = ["P.S."]


def single(rng: random.Random, kind: str, topic: tuple) -> tuple[str, dict]:
    about, kw, avoid = topic
    activity = about.split()[0].endswith("ing")  # "planning a picnic", not "a lighthouse"
    if kind == "bullets":
        n = rng.choice([2, 3, 4, 5])
        text = rng.choice([f"What should someone know about {about}? Reply with {n} bullet points, each on its "
                           f"own line starting with a dash.",
                           f"Jot down {n} quick notes on {about} as a dashed list ('- ' before each), {n} lines only."])
        return text, {"type": "bullets", "n": n}
    if kind == "numbered":
        n = rng.choice([3, 4, 5])
        ask = f"Give {n} steps for {about}" if activity else f"Give {n} facts about {about}"
        return f"{ask}, numbered 1 to {n}, and add nothing else.", {"type": "numbered", "n": n}
    if kind == "words_max":
        m = rng.choice([12, 20, 25, 40])
        text = rng.choice([f"Say something about {about}, keeping it to {m} words or fewer.",
                           f"How would you sum up {about}? {m} words is the most you may use."])
        return text, {"type": "words", "max": m}
    if kind == "words_range":
        lo = rng.choice([15, 20, 30])
        hi = lo + rng.choice([20, 30])
        return (f"Write somewhere between {lo} and {hi} words on {about}.",
                {"type": "words", "min": lo, "max": hi})
    if kind == "sentences":
        n = rng.choice([1, 2, 3])
        s = "one sentence" if n == 1 else f"{n} sentences"
        text = rng.choice([f"Using {s} exactly, tell me about {about}.",
                           f"What is {about} like? Answer in precisely {s}."])
        return text, {"type": "sentences", "min": n, "max": n}
    if kind == "paragraphs":
        n = rng.choice([2, 3])
        return (f"Talk about {about} in {n} brief paragraphs, leaving an empty line between them.",
                {"type": "paragraphs", "n": n})
    if kind == "no_commas":
        return f"Tell me a little about {about}, and avoid commas completely.", {"type": "no_commas"}
    if kind == "starts_with":
        p = rng.choice(OPENERS)
        return (f"Share a thought about {about}. The first words of your reply must be '{p}'.",
                {"type": "starts_with", "phrase": p})
    if kind == "ends_with":
        p = rng.choice(CLOSERS)
        ask = f"Give me some advice on {about}" if activity else f"Tell me what you like about {about}"
        return (f"{ask}, and close with '{p}' as the very last words.",
                {"type": "ends_with", "phrase": p})
    if kind == "keywords":
        text = rng.choice([f"Write a few lines on {about}. Be sure the words '{kw[0]}' and '{kw[1]}' both appear.",
                           f"Work the words '{kw[0]}' and '{kw[1]}' into a short answer about {about}."])
        return text, {"type": "keywords", "words": kw}
    if kind == "forbidden":
        return (f"Describe {about}, but the word '{avoid}' must not appear anywhere.",
                {"type": "forbidden", "words": [avoid]})
    if kind == "keyword_count":
        n = rng.choice([2, 3])
        return (f"Write a short piece on {about} in which '{kw[0]}' shows up {n} times or more.",
                {"type": "keyword_count", "word": kw[0], "min": n})
    if kind == "lowercase":
        text = rng.choice([f"tell me about {about}. keep every letter small, with no capitals.",
                           f"Describe {about} for me, writing only in lower-case letters."])
        return text, {"type": "lowercase"}
    if kind == "uppercase":
        return (f"Give a one-line slogan about {about}, typed entirely in upper case.", {"type": "uppercase"})
    if kind == "title":
        return (f"Write a tiny story about {about} and put its title between << and >>, for example "
                f"<<A Good Day>>.", {"type": "title"})
    if kind == "quoted":
        return (f"Give one piece of wisdom about {about}, with the whole reply inside a pair of double quotes.",
                {"type": "quoted"})
    if kind == "postscript":
        return (f"Write a short message to a friend about {about}. After the message, add a final line "
                f"beginning with P.S.", {"type": "postscript", "marker": "P.S."})
    if kind == "highlights":
        n = rng.choice([1, 2])
        part = "one part" if n == 1 else "two parts"
        return (f"Say a few words about {about} and mark {part} with single asterisks on each side, as in *key idea*.",
                {"type": "highlights", "n": n})
    raise ValueError(kind)


TOPIC_KINDS = ["bullets", "numbered", "words_max", "words_range", "sentences", "paragraphs", "no_commas",
               "starts_with", "ends_with", "keywords", "forbidden", "keyword_count", "lowercase", "uppercase",
               "title", "quoted", "postscript", "highlights"]
# Pairs that can both hold in one short answer (no case clash, no two list shapes).
PAIRS = [("bullets", "lowercase"), ("numbered", "keywords"), ("words_max", "no_commas"),
         ("sentences", "forbidden"), ("starts_with", "keywords"), ("bullets", "ends_with"),
         ("title", "words_max"), ("paragraphs", "keyword_count"), ("quoted", "words_max"),
         ("highlights", "forbidden"), ("lowercase", "forbidden"), ("postscript", "keywords")]


def combined(rng: random.Random, a: str, b: str, topic: tuple) -> tuple[str, list[dict]]:
    text_a, con_a = single(rng, a, topic)
    _, con_b = single(rng, b, topic)
    extra = {  # the second instruction as a short follow-on sentence
        "lowercase": "Skip capital letters entirely.",
        "keywords": f"Mention '{topic[1][0]}' and '{topic[1][1]}'.",
        "no_commas": "Leave out every comma.",
        "forbidden": f"Keep the word '{topic[2]}' out of it.",
        "ends_with": f"Your last words must be '{con_b.get('phrase')}'.",
        "words_max": f"Stay within {con_b.get('max')} words.",
        "keyword_count": f"Use the word '{topic[1][0]}' at least {con_b.get('min')} times.",
    }[b]
    if a == "lowercase":
        extra = extra.lower()
    return f"{text_a} {extra}", [con_a, con_b]


def rows() -> list[dict]:
    rng = random.Random(26)
    out = []
    for i, topic in enumerate(TOPICS):
        kinds = [TOPIC_KINDS[(i * 5 + j * 7) % len(TOPIC_KINDS)] for j in range(3)]
        for kind in dict.fromkeys(kinds):
            text, con = single(rng, kind, topic)
            out.append({"messages": [{"role": "user", "content": text}], "constraints": [con]})
        # a pair whose first instruction this topic has not had alone: no near-duplicate rows
        a, b = next(p for k in range(len(PAIRS)) if (p := PAIRS[(i + k) % len(PAIRS)])[0] not in kinds)
        text, cons = combined(rng, a, b, topic)
        out.append({"messages": [{"role": "user", "content": text}], "constraints": cons})
    for thing, keys in JSON_THINGS:
        quoted = ", ".join(f'"{k}"' for k in keys[:-1]) + f' and "{keys[-1]}"'
        text = f"Describe {thing} as a JSON object using the keys {quoted}. Print the JSON and nothing more."
        out.append({"messages": [{"role": "user", "content": text}], "constraints": [{"type": "json", "keys": keys}]})
    for question, options in CHOICES:
        opts = " or ".join(f"'{o}'" for o in options)
        text = f"{question} Reply with {opts} and no other words."
        out.append({"messages": [{"role": "user", "content": text}],
                    "constraints": [{"type": "one_of", "options": options}]})
    for doc in TEMPLATES_DOCS:
        n = rng.choice([2, 3])
        text = (f"Draft {doc}. Leave {n} or more blanks for the reader to fill in, written in square brackets "
                f"like [date].")
        out.append({"messages": [{"role": "user", "content": text}], "constraints": [{"type": "placeholders", "n": n}]})
    return out


if __name__ == "__main__":
    data = rows()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    print(f"{len(data)} prompts -> {OUT}")
