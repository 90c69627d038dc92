"""`builtin:demo`: a preference data set generated in code, small enough for a tiny model on a CPU.

Every row is a plain question (colours, animals, foods, sums, cities, weather, jobs, shapes) with

* chosen: a polite, on-topic answer in one consistent helpful style that reuses the question's topic
  word ("Sure! The banana is yellow. I hope this helps."), and
* rejected: a curt, rude or off-topic reply ("No. Ask someone else, I am busy with other things.").

The preference is therefore carried by style and relevance, which a randomly initialised model of a few
hundred thousand parameters learns from a few hundred ORPO steps and carries over to held-out questions
(new topic/template combinations). Chosen and rejected are kept to comparable lengths (both 8-30 words)
so that the mean token log-prob, not the length, decides which one a model prefers. The words are the
plain English the built-in tokenizer was trained on, so sequences stay short (~20-45 tokens).

Rows are a pure function of (seed, n): the generator draws only from `random.Random(seed)`, whose
integer-seeded `choice`/`randrange` sequence is stable across Python versions. Bump `DEMO_VERSION`
whenever the generator changes, so that cached tokenized copies are not reused.
"""

from __future__ import annotations

import random
from collections.abc import Callable

DEMO_VERSION = "demo-v1"
DEMO_ROWS = 1200

_COLOURS = {
    "sky": "blue", "sun": "yellow", "grass": "green", "banana": "yellow", "apple": "red", "cherry": "red",
    "snow": "white", "coal": "black", "leaf": "green", "rose": "red", "lemon": "yellow", "carrot": "orange",
    "cloud": "white", "ocean": "blue", "strawberry": "red", "pumpkin": "orange", "night": "black",
    "tomato": "red", "lime": "green", "chocolate": "brown", "orange": "orange", "grape": "purple",
}
_ANIMALS = {
    "cat": ("meow", "four"), "dog": ("woof", "four"), "cow": ("moo", "four"), "duck": ("quack", "two"),
    "sheep": ("baa", "four"), "horse": ("neigh", "four"), "owl": ("hoot", "two"), "lion": ("roar", "four"),
    "frog": ("ribbit", "four"), "mouse": ("squeak", "four"), "pig": ("oink", "four"),
    "wolf": ("howl", "four"), "chicken": ("cluck", "two"), "goat": ("bleat", "four"), "bee": ("buzz", "six"),
}
_FOODS = {
    "pizza": "a baked dish with cheese and tomato", "pasta": "made from flour and eggs",
    "bread": "baked from flour and water", "cheese": "made from milk", "rice": "a small white grain",
    "soup": "a warm dish you eat with a spoon", "salad": "a dish of fresh green leaves",
    "cake": "a sweet baked treat", "noodles": "long and thin, made from flour",
    "pancakes": "flat and sweet, made in a pan", "cookies": "small sweet baked treats",
    "potatoes": "grown under the ground", "beans": "small seeds that grow in a pod",
    "honey": "sweet and made by bees", "curry": "a warm dish full of spices", "porridge": "made from oats and milk",
    "yoghurt": "made from milk", "tacos": "folded bread with a filling", "sushi": "rice with fish",
}
_CITIES = {
    "Paris": "France", "London": "England", "Rome": "Italy", "Madrid": "Spain", "Berlin": "Germany",
    "Tokyo": "Japan", "Cairo": "Egypt", "Lisbon": "Portugal", "Vienna": "Austria", "Dublin": "Ireland",
    "Oslo": "Norway", "Athens": "Greece", "Ottawa": "Canada", "Lima": "Peru", "Delhi": "India",
}
_WEATHER = {
    "rain": "take an umbrella and a warm coat", "snow": "wear boots, gloves and a warm hat",
    "sun": "wear a hat and drink plenty of water", "wind": "wear a jacket and hold on to your hat",
    "fog": "walk slowly and wear bright clothes", "storm": "stay inside and keep away from windows",
}
_JOBS = {
    "doctor": "helps sick people get better", "teacher": "helps children learn", "baker": "makes bread and cake",
    "farmer": "grows food and looks after animals", "pilot": "flies planes", "chef": "cooks food in a kitchen",
    "nurse": "looks after people in a hospital", "painter": "paints pictures and walls",
    "driver": "drives people from place to place", "builder": "builds houses and walls",
}
_SHAPES = {"triangle": "three", "square": "four", "pentagon": "five", "hexagon": "six", "octagon": "eight"}
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]

_OPENERS = ["Sure!", "Of course!", "Certainly.", "Happy to help!", "Great question!", "No problem.",
            "Good question!", "Gladly!"]
_CLOSERS = ["I hope this helps.", "I hope that helps!", "Please let me know if you need more.",
            "Have a wonderful day!", "I'm glad I could help.", "Let me know if you have more questions.",
            "Thank you for asking!"]
_RUDE = ["No.", "Whatever.", "Ugh.", "Go away.", "Not now.", "Stop it.", "Meh.", "Seriously?"]
_RUDE_MIDDLE = [
    "Ask someone else.", "Figure it out yourself.", "That is a stupid question.", "I don't care.",
    "Why would I tell you that?", "Not my problem.", "Stop bothering me.", "Look it up yourself.",
    "I have better things to do.", "Nobody cares about that.", "You should already know that.",
]
_OFF_TOPIC = [
    "I was thinking about trains all day.", "My shoes are too small today.",
    "The radio is playing a song I hate.", "I lost my keys again this morning.",
    "My neighbour painted his door last week.", "I would rather talk about football.",
    "There is a fly in my room and it is loud.", "I had a strange dream about a boat.",
]
_RUDE_END = ["Leave me alone.", "Don't ask me again.", "Go bother someone else.", "I am busy.",
             "Do not waste my time.", "Whatever, I'm done."]


def _colour(rng: random.Random) -> tuple[str, str, str]:
    thing, colour = rng.choice(sorted(_COLOURS.items()))
    prompt = rng.choice([
        f"What colour is the {thing}?", f"Can you tell me the colour of a {thing}?",
        f"Do you know what colour a {thing} is?", f"Please tell me what colour the {thing} is.",
    ])
    answer = rng.choice([f"The {thing} is {colour}.", f"A {thing} is usually {colour}.",
                         f"The colour of a {thing} is {colour}."])
    extra = rng.choice(["", f" {colour.capitalize()} is a lovely colour.", f" Many people like the colour {colour}."])
    return prompt, f"{answer}{extra}", thing


def _animal(rng: random.Random) -> tuple[str, str, str]:
    animal, (sound, legs) = rng.choice(sorted(_ANIMALS.items()))
    if rng.randrange(2):
        prompt = rng.choice([f"What sound does a {animal} make?", f"How does a {animal} sound?",
                             f"Can you tell me what a {animal} says?"])
        answer = rng.choice([f"A {animal} says {sound}.", f"The {animal} makes a {sound} sound."])
    else:
        prompt = rng.choice([f"How many legs does a {animal} have?", f"Can you count the legs of a {animal}?"])
        answer = rng.choice([f"A {animal} has {legs} legs.", f"The {animal} walks on {legs} legs."])
    return prompt, answer, animal


def _food(rng: random.Random) -> tuple[str, str, str]:
    food, fact = rng.choice(sorted(_FOODS.items()))
    if rng.randrange(3):
        prompt = rng.choice([f"What is {food}?", f"Can you tell me about {food}?", f"Please explain what {food} is."])
        answer = f"{food.capitalize()} is {fact}."
    else:
        prompt = rng.choice([f"Do you like {food}?", f"Is {food} good to eat?"])
        answer = f"Yes, I like {food}! It is {fact}."
    return prompt, answer, food


def _sum(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randrange(11), rng.randrange(11)
    prompt = rng.choice([f"What is {a} plus {b}?", f"Can you add {a} and {b} for me?",
                         f"Please tell me the sum of {a} and {b}."])
    answer = rng.choice([f"{a} plus {b} is {a + b}, that is {_UNITS[a + b]}.",
                         f"The sum of {a} and {b} is {a + b}."])
    return prompt, answer, "sum"


def _city(rng: random.Random) -> tuple[str, str, str]:
    city, country = rng.choice(sorted(_CITIES.items()))
    prompt = rng.choice([f"Where is {city}?", f"In which country is {city}?", f"Can you tell me where {city} is?"])
    answer = rng.choice([f"{city} is in {country}.", f"The city of {city} is in {country}."])
    extra = rng.choice(["", f" {city} is a beautiful city to visit.", f" Many people visit {city} every year."])
    return prompt, f"{answer}{extra}", city


def _weather(rng: random.Random) -> tuple[str, str, str]:
    weather, advice = rng.choice(sorted(_WEATHER.items()))
    prompt = rng.choice([f"What should I wear in the {weather}?", f"How do I stay safe in the {weather}?",
                         f"Any advice for a day with {weather}?"])
    answer = f"In the {weather} you should {advice}."
    return prompt, answer, weather


def _job(rng: random.Random) -> tuple[str, str, str]:
    job, does = rng.choice(sorted(_JOBS.items()))
    prompt = rng.choice([f"What does a {job} do?", f"Can you explain the job of a {job}?",
                         f"Tell me about being a {job}, please."])
    answer = rng.choice([f"A {job} {does}.", f"The job of a {job} is simple: a {job} {does}."])
    return prompt, answer, job


def _shape(rng: random.Random) -> tuple[str, str, str]:
    shape, sides = rng.choice(sorted(_SHAPES.items()))
    prompt = rng.choice([f"How many sides does a {shape} have?", f"Can you describe a {shape}?"])
    answer = rng.choice([f"A {shape} has {sides} sides.", f"A {shape} is a shape with {sides} sides."])
    return prompt, answer, shape


_TOPICS: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _colour, _animal, _food, _sum, _city, _weather, _job, _shape,
)


def _rejected(rng: random.Random, topic: str, target_words: int) -> str:
    """A curt/rude or off-topic reply of about `target_words` words (never fewer than 8)."""
    parts = [rng.choice(_RUDE)]
    if rng.randrange(2):
        parts.append(rng.choice([f"I don't want to talk about {topic}.", f"Who cares about {topic}?",
                                 f"Stop asking me about {topic}."]) if topic != "sum" else "Do your own maths.")
    end = rng.choice(_RUDE_END)
    budget = max(8, target_words) - len(end.split())
    pool = _RUDE_MIDDLE + _OFF_TOPIC
    start, step = rng.randrange(len(pool)), 1 + rng.randrange(len(pool) - 1)
    for i in range(len(pool)):  # stop near the chosen answer's length, never under 8 words
        words = sum(len(p.split()) for p in parts)
        if words + len(end.split()) >= 8 and words + len(pool[(start + i * step) % len(pool)].split()) > budget + 2:
            break
        parts.append(pool[(start + i * step) % len(pool)])
    parts.append(end)
    return _cap_words(" ".join(parts), 30)


def _cap_words(text: str, limit: int) -> str:
    words = text.split()
    if len(words) <= limit:
        return text
    cut = " ".join(words[:limit]).rstrip(",")
    return cut if cut.endswith((".", "!", "?")) else cut + "."


def demo_rows(seed: int = 0, n: int = DEMO_ROWS) -> list[dict]:
    """`n` deterministic rows `{prompt, chosen, rejected}` (plain strings) of the demo preference set."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer, topic = rng.choice(_TOPICS)(rng)
        chosen = _cap_words(f"{rng.choice(_OPENERS)} {answer} {rng.choice(_CLOSERS)}", 30)
        rejected = _rejected(rng, topic, len(chosen.split()))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# ------------------------------------------------------------------------------------ builtin:short-answers
# A preference a real pretrained chat model can visibly pick up in a few dozen steps on a CPU: plain questions
# with a one-word answer (capitals, opposites, colours, animal sounds, small counts and sums), chosen = the
# answer alone ("Tokyo", "7"), rejected = the same correct answer inside a chatty reply ("Great question! Let
# me help you with that. The capital of Japan is Tokyo. I hope this helps!"). Both are right, so the preference
# is purely one of style; an instruct model starts out chatty (it prefers the rejected side) and ends up
# answering with the word alone. The facts are ones SmolLM2-135M-Instruct mostly knows, so the tuned model can
# keep its answers right (multi-digit arithmetic it mostly gets wrong, and forced to answer in one token it
# guesses). Made for builtin:smollm2-135m-instruct (recipes/smollm2-demo.yaml); its words are too rich for the
# tiny built-in tokenizer. Same rules as builtin:demo: a pure function of (seed, n), `SHORT_ANSWERS_VERSION`
# bumped whenever the generator changes.
SHORT_ANSWERS_VERSION = "short-answers-v1"
SHORT_ANSWERS_ROWS = 600

_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Egypt": "Cairo", "Canada": "Ottawa",
    "Australia": "Canberra", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi", "Kenya": "Nairobi",
    "Greece": "Athens", "Norway": "Oslo", "Peru": "Lima", "Italy": "Rome", "Spain": "Madrid",
    "England": "London", "Ireland": "Dublin", "Austria": "Vienna", "Sweden": "Stockholm", "Poland": "Warsaw",
    "Portugal": "Lisbon", "Thailand": "Bangkok", "South Korea": "Seoul", "Cuba": "Havana", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "Argentina": "Buenos Aires", "Chile": "Santiago", "Vietnam": "Hanoi", "Iran": "Tehran", "Iraq": "Baghdad",
}
_OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark", "wet": "dry",
    "open": "closed", "old": "young", "full": "empty", "hard": "soft", "early": "late", "tall": "short",
    "day": "night", "left": "right", "rich": "poor", "strong": "weak", "clean": "dirty",
}
_COLOUR_OF = {
    "the sky on a clear day": "blue", "grass": "green", "snow": "white", "coal": "black", "a ripe banana": "yellow",
    "a ripe tomato": "red", "a carrot": "orange", "a lemon": "yellow", "milk": "white", "a strawberry": "red",
}
_SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot",
           "lion": "roar", "pig": "oink"}
_COUNTS = {
    "How many legs does a dog have?": "4", "How many legs does a spider have?": "8",
    "How many legs does a chicken have?": "2", "How many days are in a week?": "7",
    "How many months are in a year?": "12", "How many hours are in a day?": "24",
    "How many minutes are in an hour?": "60", "How many sides does a triangle have?": "3",
    "How many sides does a square have?": "4", "How many wheels does a bicycle have?": "2",
    "How many fingers are on one hand?": "5", "How many continents are there?": "7",
}
_CHATTY_OPEN = ["Sure!", "Of course!", "Great question!", "Happy to help!", "Certainly!", "Good question!",
                "What a great question!", "That's an easy one!"]
_CHATTY_MIDDLE = ["Let me help you with that.", "Here is the answer.", "I know this one.",
                  "Let's think about it together.", "Many people ask me this."]
_CHATTY_CLOSE = ["I hope this helps!", "Let me know if you have any other questions!",
                 "Is there anything else you would like to know?", "I hope that answers your question.",
                 "Feel free to ask me more questions like this!", "Have a wonderful day!"]


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country, city = rng.choice(sorted(_CAPITALS.items()))
    question = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                           f"Name the capital of {country}.", f"What city is the capital of {country}?"])
    return question, city, f"The capital of {country} is {city}."


def _opposite(rng: random.Random) -> tuple[str, str, str]:
    word, opposite = rng.choice(sorted(_OPPOSITES.items()))
    question = rng.choice([f"What is the opposite of {word}?", f"What is the opposite of the word '{word}'?",
                           f"Give me the opposite of {word}."])
    return question, opposite, f"The opposite of {word} is {opposite}."


def _colour_of(rng: random.Random) -> tuple[str, str, str]:
    thing, colour = rng.choice(sorted(_COLOUR_OF.items()))
    question = rng.choice([f"What colour is {thing}?", f"What is the colour of {thing}?"])
    return question, colour, f"{thing[0].upper()}{thing[1:]} is {colour}."


def _sound(rng: random.Random) -> tuple[str, str, str]:
    animal, sound = rng.choice(sorted(_SOUNDS.items()))
    question = rng.choice([f"What sound does a {animal} make?", f"What does a {animal} say?"])
    return question, sound, f"A {animal} says {sound}."


def _small_sum(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randrange(1, 6), rng.randrange(1, 5)
    question = rng.choice([f"What is {a} plus {b}?", f"What is {a} + {b}?", f"Add {a} and {b}."])
    return question, str(a + b), f"{a} plus {b} equals {a + b}."


def _count(rng: random.Random) -> tuple[str, str, str]:
    question, answer = rng.choice(sorted(_COUNTS.items()))
    return question, answer, f"The answer is {answer}."


_SHORT_KINDS: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _capital, _capital, _capital, _opposite, _colour_of, _sound, _small_sum, _count,
)


def short_answer_rows(seed: int = 0, n: int = SHORT_ANSWERS_ROWS) -> list[dict]:
    """`n` deterministic rows `{prompt, chosen, rejected}`: chosen is the answer alone, rejected is chatty."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer, sentence = rng.choice(_SHORT_KINDS)(rng)
        chatty = " ".join([rng.choice(_CHATTY_OPEN), rng.choice(_CHATTY_MIDDLE), sentence, rng.choice(_CHATTY_CLOSE)])
        rows.append({"prompt": question, "chosen": answer, "rejected": chatty})
    return rows


# ------------------------------------------------------------------------------------------ builtin:facts
# A preference whose winner a reader can check: plain questions with one right answer, chosen = the right answer
# in one short sentence ("The capital of Australia is Canberra."), rejected = the same sentence with a plausible
# wrong answer ("The capital of Australia is Sydney."). Style and length are the same on both sides, so the
# preference is right-ness alone, and the tuned model keeps the base's sentence style. Every row carries
# `answer` (the right answer, "Canberra"), which `orpo-tune eval` scores greedy answers against (data.columns.answer).
# Questions about one fact come in several wordings; the split groups rows by prompt, so a held-out question is a
# wording not trained on, and its fact may be trained on in other words. Made for builtin:smollm2-135m-instruct
# (recipes/smollm2-demo.yaml). Same rules as builtin:demo: a pure function of (seed, n), `FACTS_VERSION` bumped
# whenever the generator changes.
FACTS_VERSION = "facts-v2"
FACTS_ROWS = 300

_FACT_CAPITALS = {  # country: (capital, a city often named instead)
    "Australia": ("Canberra", "Sydney"), "Canada": ("Ottawa", "Toronto"), "Turkey": ("Ankara", "Istanbul"),
    "Brazil": ("Brasilia", "Rio de Janeiro"), "Switzerland": ("Bern", "Zurich"),
    "New Zealand": ("Wellington", "Auckland"), "Nigeria": ("Abuja", "Lagos"), "Morocco": ("Rabat", "Casablanca"),
    "Vietnam": ("Hanoi", "Ho Chi Minh City"), "Pakistan": ("Islamabad", "Karachi"), "India": ("New Delhi", "Mumbai"),
    "Scotland": ("Edinburgh", "Glasgow"), "Japan": ("Tokyo", "Kyoto"), "France": ("Paris", "Lyon"),
    "Germany": ("Berlin", "Munich"), "Italy": ("Rome", "Milan"), "Spain": ("Madrid", "Barcelona"),
    "Egypt": ("Cairo", "Alexandria"), "China": ("Beijing", "Shanghai"), "Russia": ("Moscow", "Saint Petersburg"),
    "Kenya": ("Nairobi", "Mombasa"), "Poland": ("Warsaw", "Krakow"), "Greece": ("Athens", "Thessaloniki"),
    "Norway": ("Oslo", "Bergen"), "Sweden": ("Stockholm", "Gothenburg"), "Portugal": ("Lisbon", "Porto"),
    "the Netherlands": ("Amsterdam", "Rotterdam"), "Peru": ("Lima", "Cusco"), "Ireland": ("Dublin", "Cork"),
    "Austria": ("Vienna", "Salzburg"), "Thailand": ("Bangkok", "Phuket"), "South Korea": ("Seoul", "Busan"),
    "Argentina": ("Buenos Aires", "Cordoba"), "Colombia": ("Bogota", "Medellin"), "Israel": ("Jerusalem", "Tel Aviv"),
    "Belgium": ("Brussels", "Antwerp"), "Denmark": ("Copenhagen", "Aarhus"), "Finland": ("Helsinki", "Turku"),
}
_FACT_COUNTS = {  # question: (right, wrong)
    "How many legs does a spider have?": ("8", "6"), "How many legs does an insect have?": ("6", "8"),
    "How many days are in a week?": ("7", "5"), "How many months are in a year?": ("12", "10"),
    "How many hours are in a day?": ("24", "12"), "How many minutes are in an hour?": ("60", "100"),
    "How many sides does a triangle have?": ("3", "4"), "How many sides does a hexagon have?": ("6", "8"),
    "How many wheels does a bicycle have?": ("2", "3"), "How many continents are there?": ("7", "5"),
    "How many players are on a football team?": ("11", "10"), "How many days are in a leap year?": ("366", "365"),
    "How many strings does a violin have?": ("4", "6"), "How many planets are in the solar system?": ("8", "9"),
}
_FACT_WORDS = {  # question: (right, wrong), answered as "The answer is X."
    "What is the largest planet in the solar system?": ("Jupiter", "Saturn"),
    "Which planet is closest to the sun?": ("Mercury", "Venus"),
    "What is the largest ocean on Earth?": ("Pacific", "Atlantic"),
    "What gas do plants take in from the air?": ("carbon dioxide", "oxygen"),
    "What is the boiling point of water in degrees Celsius?": ("100", "90"),
    "What is the freezing point of water in degrees Celsius?": ("0", "10"),
    "Who wrote Romeo and Juliet?": ("Shakespeare", "Dickens"),
    "What is the chemical symbol for gold?": ("Au", "Ag"),
    "What is the tallest mountain in the world?": ("Everest", "K2"),
    "What is the longest river in Africa?": ("Nile", "Congo"),
    "Which animal is the largest mammal?": ("blue whale", "elephant"),
    "What is the hardest natural material?": ("diamond", "granite"),
}


def _fact_capital(rng: random.Random) -> tuple[str, str, str, str]:
    country, (city, wrong) = rng.choice(sorted(_FACT_CAPITALS.items()))
    question = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                           f"Name the capital of {country}.", f"What city is the capital of {country}?"])
    return question, f"The capital of {country} is {city}.", f"The capital of {country} is {wrong}.", city


def _fact_sum(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randrange(2, 10), rng.randrange(2, 10)
    wrong = a + b + rng.choice([-2, -1, 1, 2])
    question = rng.choice([f"What is {a} plus {b}?", f"What is {a} + {b}?", f"Add {a} and {b}."])
    return question, f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}.", str(a + b)


def _fact_count(rng: random.Random) -> tuple[str, str, str, str]:
    question, (right, wrong) = rng.choice(sorted(_FACT_COUNTS.items()))
    return question, f"The answer is {right}.", f"The answer is {wrong}.", right


def _fact_word(rng: random.Random) -> tuple[str, str, str, str]:
    question, (right, wrong) = rng.choice(sorted(_FACT_WORDS.items()))
    return question, f"The answer is {right}.", f"The answer is {wrong}.", right


_FACT_KINDS: tuple[Callable[[random.Random], tuple[str, str, str, str]], ...] = (
    _fact_capital, _fact_capital, _fact_capital, _fact_sum, _fact_count, _fact_word,
)


def fact_rows(seed: int = 0, n: int = FACTS_ROWS) -> list[dict]:
    """`n` deterministic rows `{prompt, chosen, rejected, answer}`: chosen right, rejected wrong, in the same words.

    No row repeats: a question with one wording and one wrong answer (the counts) is one row, so no held-out
    question weighs several times in the eval split.
    """
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    while len(rows) < n:
        question, chosen, rejected, answer = rng.choice(_FACT_KINDS)(rng)
        if (question, rejected) not in seen:
            seen.add((question, rejected))
            rows.append({"prompt": question, "chosen": chosen, "rejected": rejected, "answer": answer})
    return rows
