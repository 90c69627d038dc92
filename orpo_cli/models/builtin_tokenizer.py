"""The tokenizer of the tiny built-in models: a byte-level BPE (initial alphabet = all 256 bytes, so any text,
unicode and emojis included, encodes and decodes back exactly) with 2048 entries, trained with the ``tokenizers``
library on a deterministic English corpus generated here from word lists, with a chat template.

Special tokens: ``<|bos|>`` (BOS), ``<|end|>`` (EOS, ends every chat turn), ``<|pad|>`` (padding),
``<|system|>``, ``<|user|>``, ``<|assistant|>`` (role headers). It never adds BOS or EOS by itself (the chat
template emits BOS). builtin.py trains it once per :data:`TOKENIZER_VERSION` and caches it.
"""

from __future__ import annotations

import random
from pathlib import Path

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported chat role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TOKENIZER_VERSION = "t1"
_TOKENIZER_VOCAB_SIZE = 2048
_CORPUS_SEED = 1234
_CORPUS_LINES = 4000
MODEL_MAX_LENGTH = 1024


def _corpus() -> list[str]:
    """A deterministic corpus of simple English chat-like lines to train the tokenizer on."""
    rng = random.Random(_CORPUS_SEED)
    colours = "red orange yellow green blue purple pink brown black white grey gold silver violet".split()
    things = (
        "sky sun grass sea banana apple cherry snow coal leaf rose lemon carrot cloud pumpkin ocean "
        "strawberry tomato lime"
    ).split()
    animals = {  # animal: (sound, legs)
        "cat": ("meow", 4),
        "dog": ("woof", 4),
        "cow": ("moo", 4),
        "duck": ("quack", 2),
        "sheep": ("baa", 4),
        "horse": ("neigh", 4),
        "owl": ("hoot", 2),
        "lion": ("roar", 4),
        "frog": ("ribbit", 4),
        "mouse": ("squeak", 4),
        "snake": ("hiss", 0),
        "bee": ("buzz", 6),
        "chicken": ("cluck", 2),
        "pig": ("oink", 4),
        "wolf": ("howl", 4),
        "donkey": ("hee-haw", 4),
        "goat": ("bleat", 4),
    }
    foods = (
        "pizza pasta bread cheese rice soup salad chocolate cake noodles sandwiches pancakes cookies "
        "potatoes beans eggs fish curry tacos sushi porridge yoghurt honey oranges grapes mangoes peaches"
    ).split()
    names = "Alice Bob Carol David Emma Frank Grace Henry Isla Jack Kate Liam Mia Noah Olivia Sam".split()
    units = (
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen"
    ).split()
    tens = ["", "", *"twenty thirty forty fifty sixty seventy eighty ninety".split()]
    greetings = [
        "Hello!",
        "Hi there.",
        "Good morning!",
        "Good evening!",
        "Hey!",
        "Hello, how are you?",
        "Hi, nice to meet you.",
        "Welcome back!",
    ]
    polite = ["Sure! Here is", "Of course! Here is", "Certainly. Here is", "Happy to help! Here is"]
    thanks = [
        "Thank you!",
        "Thank you very much.",
        "Thanks a lot!",
        "You're welcome.",
        "I'm glad I could help.",
        "Have a wonderful day!",
        "Please let me know if you need more.",
    ]
    rude = [
        "No. Figure it out yourself.",
        "That is a stupid question.",
        "Whatever.",
        "Go away.",
        "I don't care.",
        "Ask someone else.",
        "Why would I tell you that?",
        "Stop bothering me.",
    ]
    places = (
        "London Paris Tokyo Berlin Madrid Rome Cairo Sydney Toronto Lisbon Dublin Vienna Oslo Prague Athens "
        "Nairobi Lima Seoul"
    ).split()
    days = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
    hobbies = "reading painting swimming cooking running singing dancing gardening fishing chess".split()
    topics = [
        "a short poem",
        "a list of fruits",
        "a recipe for soup",
        "a fun fact",
        "a story about a cat",
        "a summary",
        "an example",
        "a joke about numbers",
    ]

    def number_words(n: int) -> str:
        if n < 20:
            return units[n]
        if n < 100:
            return tens[n // 10] + ("" if n % 10 == 0 else "-" + units[n % 10])
        rest = n % 100
        return f"{units[n // 100]} hundred" + ("" if rest == 0 else f" and {number_words(rest)}")

    def line() -> str:
        kind = rng.randrange(12)
        if kind == 0:
            return f"{rng.choice(greetings)} My name is {rng.choice(names)}."
        if kind == 1:
            thing, colour = rng.choice(things), rng.choice(colours)
            return f"What colour is the {thing}?\nThe {thing} is {colour}."
        if kind == 2:
            animal = rng.choice(sorted(animals))
            sound, legs = animals[animal]
            return (
                f"What sound does a {animal} make?\nA {animal} says {sound}. "
                f"It has {number_words(legs)} legs."
            )
        if kind == 3:
            food = rng.choice(foods)
            answer = rng.choice(
                [
                    f"Yes, I love {food}.",
                    f"No, I do not like {food}.",
                    f"I like {food} with {rng.choice(foods)}.",
                ]
            )
            return f"{rng.choice(names)}: Do you like {food}?\n{answer}"
        if kind == 4:
            a, b = rng.randrange(500), rng.randrange(500)
            return (
                f"What is {a} plus {b}?\n{a} plus {b} is {a + b}, "
                f"that is {number_words(a + b) if a + b < 1000 else a + b}."
            )
        if kind == 5:
            return f"Can you give me {rng.choice(topics)}?\n{rng.choice(polite)} {rng.choice(topics)}."
        if kind == 6:
            return f"{rng.choice(thanks)} {rng.choice(thanks)}"
        if kind == 7:
            return f"Can you help me, please?\n{rng.choice(rude)}"
        if kind == 8:
            name, place = rng.choice(names), rng.choice(places)
            return f"Where does {name} live?\n{name} lives in {place} and likes {rng.choice(hobbies)}."
        if kind == 9:
            return f"What day is it today?\nToday is {rng.choice(days)}. Tomorrow is {rng.choice(days)}."
        if kind == 10:
            name, year = rng.choice(names), rng.randrange(1900, 2030)
            return f"When was {name} born?\n{name} was born in {year}, on a {rng.choice(days)}."
        n = rng.randrange(1000)
        return f"The number {n} is written as {number_words(n)}."

    return [line() for _ in range(_CORPUS_LINES)]


def build_tokenizer(out: Path) -> None:
    """Train the shared byte-level BPE tokenizer and save it (with chat template) into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        add_bos_token=False,  # the chat template emits BOS; see the module docstring
        add_eos_token=False,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
