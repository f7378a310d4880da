"""Tasks over short texts: review sentiment and person-fact extraction to JSON."""

from __future__ import annotations

import json
import random

from training.tasks.base import Item, Task

# ---------------------------------------------------------------------------------------------- sentiment

_DOMAINS = {
    "product": {
        "subjects": ("this blender", "these headphones", "the phone case", "this vacuum cleaner", "the backpack",
                     "this kettle", "the keyboard", "these running shoes", "the desk lamp", "this coffee maker",
                     "the charger", "this tent"),
        "aspects": ("build quality", "battery life", "price", "design", "packaging", "sound", "fit", "delivery",
                    "customer support", "instruction manual"),
        "pos_verdicts": ("Would buy again.", "Worth every penny.", "Five stars from me.",
                         "I would definitely recommend it.", "Best purchase I've made this year."),
        "neg_verdicts": ("I want my money back.", "Total waste of money.", "One star, and that's generous.",
                         "I'm returning it.", "Do not buy this."),
    },
    "restaurant": {
        "subjects": ("this restaurant", "the little bistro on the corner", "this pizza place", "the sushi bar",
                     "this cafe", "the new taco spot", "this steakhouse", "the noodle shop"),
        "aspects": ("pasta", "service", "dessert", "atmosphere", "wine list", "soup", "staff", "portion size",
                    "bread", "waiting time"),
        "pos_verdicts": ("We'll definitely be back.", "Highly recommended!", "Can't wait to go again.",
                         "Easily the best meal in town.", "Five stars."),
        "neg_verdicts": ("Never again.", "Avoid this place.", "We won't be coming back.",
                         "Not worth the money.", "One star."),
    },
    "film": {
        "subjects": ("this movie", "the film", "this sequel", "the documentary", "this thriller",
                     "the new comedy", "this animated feature", "the remake"),
        "aspects": ("plot", "acting", "soundtrack", "dialogue", "ending", "cinematography", "pacing",
                    "lead performance", "special effects", "script"),
        "pos_verdicts": ("A must-see.", "I'd watch it again tomorrow.", "Two thumbs up.",
                         "One of the best films of the year.", "Absolutely loved it."),
        "neg_verdicts": ("Skip it.", "A complete waste of two hours.", "I walked out halfway.",
                         "Easily the worst film of the year.", "Don't bother."),
    },
}
_POS_ADJ = ("excellent", "fantastic", "great", "superb", "wonderful", "outstanding", "delightful", "brilliant",
            "impressive", "lovely", "solid", "top-notch", "amazing", "charming", "first-rate")
_NEG_ADJ = ("terrible", "awful", "disappointing", "poor", "dreadful", "mediocre", "horrible", "lousy",
            "underwhelming", "atrocious", "sloppy", "bland", "frustrating", "painful", "subpar")
_POS_OPENERS = ("Honestly, ", "Wow. ", "I was pleasantly surprised. ", "", "", "")
_NEG_OPENERS = ("Honestly, ", "Ugh. ", "What a letdown. ", "", "", "")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentiment_item(rng: random.Random) -> Item:
    domain = _DOMAINS[rng.choice(("product", "restaurant", "film"))]
    positive = rng.random() < 0.5
    adj, opp = (_POS_ADJ, _NEG_ADJ) if positive else (_NEG_ADJ, _POS_ADJ)
    verdicts = domain["pos_verdicts"] if positive else domain["neg_verdicts"]
    a1, a2 = rng.sample(domain["aspects"], 2)
    subject = rng.choice(domain["subjects"])
    shape = rng.randrange(4)
    if shape == 0:
        body = f"{_cap(subject)} was {rng.choice(adj)}."
    elif shape == 1:
        body = f"The {a1} was {rng.choice(adj)} and the {a2} was {rng.choice(adj)}."
    elif shape == 2:
        body = f"{_cap(subject)} was {rng.choice(adj)}, especially the {a1}."
    else:
        # Mixed review: the overall verdict decides the label.
        body = f"Although the {a1} was {rng.choice(opp)}, overall {subject} was {rng.choice(adj)}."
    opener = rng.choice(_POS_OPENERS if positive else _NEG_OPENERS)
    body = opener + (body if opener.endswith(". ") or not opener else body[0].lower() + body[1:])
    review = f"{body} {rng.choice(verdicts)}" if rng.random() < 0.7 else body
    return Item(key=review, fields={"review": review}, answer="positive" if positive else "negative")


SENTIMENT = Task(
    name="sentiment",
    kind="held_in",
    description="Convert a short product, restaurant or film review to its sentiment label, positive or negative.",
    phrasings=(
        "Is this review positive or negative? {review}",
        "Classify the sentiment of this review as positive or negative: {review}",
        "Review: {review}\nSentiment (positive/negative)?",
        "What is the sentiment of the following review? Answer positive or negative.\n{review}",
        "Label this review as positive or negative: \"{review}\"",
        "Does this reviewer feel positive or negative? {review}",
        "Sentiment analysis, positive or negative: {review}",
        "Read the review and say whether it is positive or negative. {review}",
        # test only
        "A customer wrote: \"{review}\" Was that a positive or a negative review?",
        "Tell me if the tone here is positive or negative: {review}",
    ),
    sampler=_sentiment_item,
)

# -------------------------------------------------------------------------------------------- json_extract

_FIRST = ("Alice", "Bob", "Carlos", "Diana", "Emeka", "Fatima", "George", "Hana", "Ivan", "Julia", "Kenji", "Laura",
          "Mohammed", "Nina", "Oscar", "Priya", "Quentin", "Rosa", "Samuel", "Tariq", "Uma", "Victor", "Wen",
          "Ximena", "Yusuf", "Zoe", "Anders", "Beatriz", "Chen", "Dmitri", "Elena", "Farid", "Greta", "Hugo",
          "Ingrid", "Jamal", "Keiko", "Liam", "Mei", "Nadia", "Olga", "Pablo", "Rahul", "Sofia", "Tomas", "Aisha",
          "Bruno", "Clara", "David", "Emma")
_LAST = ("Smith", "Garcia", "Okafor", "Tanaka", "Novak", "Kowalski", "Haddad", "Larsen", "Rossi", "Dubois",
         "Müller", "Silva", "Patel", "Kim", "Nguyen", "Ivanova", "Cohen", "O'Brien", "Moreau", "Fischer", "Jensen",
         "Costa", "Ahmed", "Walker", "Schmidt", "Lopez", "Yilmaz", "Andersson", "Brown", "Murphy")
_CITIES = ("Paris", "Berlin", "Lagos", "Tokyo", "Toronto", "Madrid", "Lisbon", "Nairobi", "Sydney", "Chicago",
           "Mumbai", "Seoul", "Oslo", "Dublin", "Prague", "Vienna", "Cairo", "Lima", "Boston", "Melbourne",
           "Istanbul", "Warsaw", "Hanoi", "Denver", "Athens", "Montreal", "Santiago", "Helsinki", "Zurich",
           "Manchester", "Osaka", "Austin", "Bogota", "Copenhagen", "Edinburgh", "Kyoto", "Marseille", "Rotterdam",
           "Seattle", "Vancouver")
_JOBS = ("nurse", "teacher", "software engineer", "chef", "carpenter", "photographer", "pilot", "librarian",
         "architect", "dentist", "journalist", "farmer")
_SENTENCES = (
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "{name}, aged {age}, moved to {city} last year.",
    "Living in {city}, {name} just turned {age}.",
    "At {age}, {name} works as a {job} in {city}.",
    "My neighbour {name} is {age} and lives in {city}.",
    "{name} ({age}) is a {job} based in {city}.",
    "Born and raised in {city}, {name} is now {age} years old.",
    "{city} resident {name}, {age}, won the local chess tournament.",
    "{name} celebrated turning {age} at home in {city}.",
    "The {job} {name}, who is {age}, lives in {city}.",
    "Last week {name} ({age}, {city}) started a new job as a {job}.",
)


def _json_item(rng: random.Random) -> Item:
    name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    age, city, job = rng.randint(18, 90), rng.choice(_CITIES), rng.choice(_JOBS)
    text = rng.choice(_SENTENCES).format(name=name, age=age, city=city, job=job)
    answer = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
    return Item(key=f"{name}|{age}|{city}", fields={"text": text}, answer=answer)


def extract_json_object(text: str):
    """The first JSON object in `text` (surrounding prose and code fences tolerated), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
        start = text.find("{", start + 1)
    return None


def _score_json(prediction: str, answer: str) -> bool:
    got, want = extract_json_object(prediction), json.loads(answer)
    if got is None or set(got) != set(want):
        return False
    for key, value in want.items():
        other = got[key]
        if key == "age":
            if isinstance(other, str) and other.strip().isdigit():
                other = int(other.strip())
            if type(other) is not int or other != value:
                return False
        elif not isinstance(other, str) or other.strip() != value:
            return False
    return True


JSON_EXTRACT = Task(
    name="json_extract",
    kind="held_in",
    description="Convert a sentence about a person to a JSON object with their name, age and city.",
    phrasings=(
        "Extract the person's name, age and city from this sentence as JSON: {text}",
        "Return a JSON object with keys \"name\", \"age\" and \"city\" for: {text}",
        "Text: {text}\nGive the name, age and city as JSON.",
        "Parse this into JSON (name, age, city): {text}",
        "Pull out name, age and city in JSON format. {text}",
        "Convert the following sentence to JSON with fields name, age, city: {text}",
        "From the sentence below, produce JSON with the name, age and city.\n{text}",
        "JSON with name, age and city please: {text}",
        # test only
        "I need structured data for my database. Sentence: {text} Output the name, age and city as a JSON object.",
        "Read this and fill in a JSON record of name, age and city: {text}",
    ),
    sampler=_json_item,
    scorer=_score_json,
)
