"""The knowledge base behind the 11 general task families.

Each family is a lookup table of (subject, answer) facts plus four kinds of wording:
`statements` (corpus prose), `questions` (corpus Q&A, dialogues and PPO prompts),
`heldout_questions` (evaluation only: multiple-choice sets and conversation prompts, never in the
corpus, so the evaluation tests knowledge rather than memorised wording) and `answer` (how a
helpful assistant states the fact). `{s}` is the subject, `{a}` the answer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    facts: tuple[tuple[str, str], ...]
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    answer: str
    pools: tuple[tuple[str, ...], ...] = ()

    def distractors(self, subject: str, answer: str, rng, k: int = 3) -> list[str]:
        """k wrong answers of the same kind (a month for a month), near misses first.

        A pool item that appears in the subject ("7 or 12" -> 7) is always offered: otherwise
        copying a number from the question would be enough to pass.
        """
        pool = next((p for p in self.pools if answer in p), None) or sorted({a for _, a in self.facts})
        wrong = [a for a in pool if a != answer]
        words = set(subject.replace(",", " ").split())
        near = [a for a in wrong if a in words]
        far = [a for a in wrong if a not in words]
        rng.shuffle(far)
        return (near + far)[:k]


_COUNTRIES = [  # country, capital, continent
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"), ("Greece", "Athens", "Europe"),
    ("Poland", "Warsaw", "Europe"), ("Norway", "Oslo", "Europe"), ("Sweden", "Stockholm", "Europe"),
    ("Ireland", "Dublin", "Europe"), ("Austria", "Vienna", "Europe"), ("Hungary", "Budapest", "Europe"),
    ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"), ("India", "Delhi", "Asia"),
    ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"), ("Korea", "Seoul", "Asia"),
    ("Iran", "Tehran", "Asia"), ("Nepal", "Kathmandu", "Asia"),
    ("Egypt", "Cairo", "Africa"), ("Kenya", "Nairobi", "Africa"), ("Nigeria", "Abuja", "Africa"),
    ("Ghana", "Accra", "Africa"), ("Morocco", "Rabat", "Africa"), ("Ethiopia", "Addis Ababa", "Africa"),
    ("Senegal", "Dakar", "Africa"),
    ("Canada", "Ottawa", "North America"), ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"), ("Jamaica", "Kingston", "North America"),
    ("Brazil", "Brasilia", "South America"), ("Argentina", "Buenos Aires", "South America"),
    ("Peru", "Lima", "South America"), ("Chile", "Santiago", "South America"),
    ("Colombia", "Bogota", "South America"), ("Venezuela", "Caracas", "South America"),
    ("Australia", "Canberra", "Oceania"), ("Fiji", "Suva", "Oceania"), ("Samoa", "Apia", "Oceania"),
]

_ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("high", "low"), ("strong", "weak"), ("young", "old"), ("rich", "poor"), ("wet", "dry"),
    ("loud", "quiet"), ("thick", "thin"), ("clean", "dirty"), ("long", "short"),
    ("near", "far"), ("true", "false"), ("brave", "afraid"), ("sweet", "sour"), ("inside", "outside"),
    ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("first", "last"), ("day", "night"),
    ("begin", "end"), ("cheap", "expensive"), ("wide", "narrow"), ("deep", "shallow"),
    ("friend", "enemy"), ("give", "take"),
]

_PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"),
    ("man", "men"), ("woman", "women"), ("person", "people"), ("ox", "oxen"), ("sheep", "sheep"),
    ("fish", "fish"), ("deer", "deer"), ("cactus", "cacti"), ("knife", "knives"), ("leaf", "leaves"),
    ("wolf", "wolves"), ("box", "boxes"), ("bus", "buses"), ("city", "cities"), ("baby", "babies"),
    ("dog", "dogs"), ("cat", "cats"), ("book", "books"), ("tree", "trees"), ("car", "cars"),
    ("church", "churches"), ("glass", "glasses"), ("potato", "potatoes"), ("hero", "heroes"),
    ("lady", "ladies"), ("story", "stories"), ("wife", "wives"), ("half", "halves"), ("dish", "dishes"),
    ("toy", "toys"), ("key", "keys"),
]

_ANIMALS = [
    ("dog", "mammal"), ("cat", "mammal"), ("horse", "mammal"), ("whale", "mammal"), ("bat", "mammal"),
    ("lion", "mammal"), ("elephant", "mammal"), ("dolphin", "mammal"), ("rabbit", "mammal"),
    ("eagle", "bird"), ("penguin", "bird"), ("owl", "bird"), ("sparrow", "bird"), ("parrot", "bird"),
    ("ostrich", "bird"), ("duck", "bird"),
    ("salmon", "fish"), ("shark", "fish"), ("trout", "fish"), ("tuna", "fish"), ("cod", "fish"),
    ("goldfish", "fish"),
    ("snake", "reptile"), ("lizard", "reptile"), ("turtle", "reptile"), ("crocodile", "reptile"),
    ("iguana", "reptile"),
    ("frog", "amphibian"), ("toad", "amphibian"), ("salamander", "amphibian"), ("newt", "amphibian"),
    ("ant", "insect"), ("bee", "insect"), ("beetle", "insect"), ("butterfly", "insect"),
    ("mosquito", "insect"), ("grasshopper", "insect"),
]

_COLOURS = [
    ("a banana", "yellow"), ("a lemon", "yellow"), ("the sun", "yellow"), ("grass", "green"),
    ("a leaf", "green"), ("a frog", "green"), ("the sky", "blue"), ("the sea", "blue"),
    ("a blueberry", "blue"), ("snow", "white"), ("milk", "white"), ("a cloud", "white"),
    ("coal", "black"), ("a crow", "black"), ("the night sky", "black"), ("a tomato", "red"),
    ("blood", "red"), ("a strawberry", "red"), ("a carrot", "orange"), ("a pumpkin", "orange"),
    ("an orange", "orange"), ("chocolate", "brown"), ("a bear", "brown"), ("coffee", "brown"),
    ("a flamingo", "pink"), ("a pig", "pink"), ("an elephant", "grey"), ("a rain cloud", "grey"),
    ("ash", "grey"), ("a lime", "green"), ("a cherry", "red"), ("a polar bear", "white"),
]

_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_NEXT = ([(d, _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)]
         + [(m, _MONTHS[(i + 1) % 12]) for i, m in enumerate(_MONTHS)]
         + [(str(n), str(n + 1)) for n in range(1, 21)])

_WORDS = ["apple", "banana", "cherry", "dragon", "egg", "forest", "garden", "house", "island",
          "jacket", "kitten", "lemon", "mountain", "nest", "ocean", "pencil", "queen", "river",
          "sugar", "table", "umbrella", "violin", "window", "yellow", "zebra", "bridge", "candle",
          "desert", "engine", "flower", "guitar", "honey", "insect", "jungle", "kettle", "ladder",
          "market", "needle", "orange", "planet"]


def _families() -> tuple[Family, ...]:
    add = tuple((f"{a} plus {b}", str(a + b)) for a in range(1, 10) for b in range(1, 10))
    sub = tuple((f"{a} minus {b}", str(a - b)) for a in range(2, 13) for b in range(1, a))
    larger = tuple((f"{a} or {b}", str(max(a, b))) for a in range(1, 21) for b in range(1, 21) if a != b)
    return (
        Family("capitals", tuple((c, cap) for c, cap, _ in _COUNTRIES),
               ("The capital of {s} is {a}.", "{a} is the capital of {s}.",
                "{s} has its capital in {a}.", "The capital city of {s} is {a}."),
               ("What is the capital of {s}?", "Tell me the capital of {s}.",
                "Do you know the capital of {s}?", "Can you name the capital of {s}?",
                "{s} has which capital?", "I would like to know the capital of {s}.",
                "Quick question: what is the capital of {s}?"),
               ("Which city is the capital of {s}?", "Name the capital city of {s}."),
               "The capital of {s} is {a}."),
        Family("continents", tuple((c, cont) for c, _, cont in _COUNTRIES),
               ("{s} is in {a}.", "{s} is a country in {a}.", "{s} lies in {a}.",
                "The country {s} is part of {a}."),
               ("Which continent is {s} in?", "What continent is {s} on?",
                "Where in the world is {s}?", "In which continent is {s}?", "Tell me the continent of {s}.",
                "Which part of the world is {s} in?", "Quick question: what continent is {s} in?"),
               ("On which continent do you find {s}?", "{s} belongs to which continent?"),
               "{s} is in {a}."),
        Family("addition", add,
               ("{s} is {a}.", "{s} equals {a}.", "If you add them, {s} makes {a}.",
                "The sum {s} is {a}."),
               ("What is {s}?", "How much is {s}?", "Can you work out {s}?", "Tell me what {s} makes.",
                "Work out {s} for me.", "What does {s} come to?", "Quick question: what is {s}?"),
               ("Compute {s}.", "What do you get from {s}?"),
               "{s} is {a}."),
        Family("subtraction", sub,
               ("{s} is {a}.", "{s} equals {a}.", "Take away and {s} leaves {a}.",
                "The difference {s} is {a}."),
               ("What is {s}?", "How much is {s}?", "Can you work out {s}?", "Tell me what {s} makes.",
                "Work out {s} for me.", "What does {s} come to?", "Quick question: what is {s}?"),
               ("Compute {s}.", "What do you get from {s}?"),
               "{s} is {a}."),
        Family("larger_number", larger,
               ("Of {s}, the larger is {a}.", "Between {s}, {a} is bigger.",
                "Comparing {s}, the bigger number is {a}.", "Of the numbers {s}, {a} is larger."),
               ("Which is larger, {s}?", "Which number is bigger, {s}?",
                "Tell me the larger number: {s}.", "Which of these is bigger: {s}?", "Tell me which is more, {s}.",
                "Of {s}, which is larger?", "Quick question: which is larger, {s}?"),
               ("Pick the greater number, {s}.", "What is the maximum of {s}?"),
               "Of {s}, the larger is {a}."),
        Family("antonyms", tuple(_ANTONYMS),
               ("The opposite of {s} is {a}.", "{a} is the opposite of {s}.",
                "The antonym of {s} is {a}.", "{s} and {a} are opposites."),
               ("What is the opposite of {s}?", "Give me the antonym of {s}.",
                "What word means the opposite of {s}?", "What is the opposite word for {s}?",
                "Tell me the opposite of {s}.", "What is the antonym of {s}?",
                "Quick question: what is the opposite of {s}?"),
               ("Which word is the reverse of {s}?", "Name a word opposite in meaning to {s}."),
               "The opposite of {s} is {a}."),
        Family("plurals", tuple(_PLURALS),
               ("The plural of {s} is {a}.", "One {s}, many {a}.", "More than one {s} are called {a}.",
                "The word {s} becomes {a} in the plural."),
               ("What is the plural of {s}?", "How do you say more than one {s}?",
                "What is the plural form of {s}?", "What do you call more than one {s}?",
                "Tell me the plural of {s}.", "How is {s} written in the plural?",
                "Quick question: what is the plural of {s}?"),
               ("If there are two of a {s}, what are they called?", "Give the plural of the word {s}."),
               "The plural of {s} is {a}."),
        Family("animal_classes", tuple(_ANIMALS),
               ("The {s} is a {a}.", "A {s} is a kind of {a}.", "The {s} belongs to the {a} class.",
                "Biologists call the {s} a {a}."),
               ("What kind of animal is a {s}?", "Is a {s} a mammal, bird, fish, reptile, amphibian or insect?",
                "What class of animal is the {s}?", "Tell me what kind of animal the {s} is.",
                "What sort of creature is a {s}?", "Is the {s} a mammal or something else?",
                "Quick question: what kind of animal is a {s}?"),
               ("To which animal group does the {s} belong?", "Classify the {s}: what kind of animal is it?"),
               "The {s} is a {a}."),
        Family("colours", tuple(_COLOURS),
               ("The colour of {s} is {a}.", "{s} is usually {a}.", "Most of the time {s} looks {a}.",
                "Picture {s}: it is {a}."),
               ("What colour is {s}?", "What is the colour of {s}?", "Which colour does {s} have?",
                "Tell me the colour of {s}.", "What colour does {s} usually have?", "Which colour is {s}?",
                "Quick question: what colour is {s}?"),
               ("Describe the usual colour of {s}.", "Tell me which colour {s} normally is."),
               "{s} is usually {a}."),
        Family("what_comes_next", _NEXT,
               ("After {s} comes {a}.", "{a} comes right after {s}.", "The one after {s} is {a}.",
                "{s} is followed by {a}."),
               ("What comes after {s}?", "What is next after {s}?", "What follows {s}?",
                "Name what comes after {s}.", "Tell me the one after {s}.", "What is the one after {s}?",
                "Quick question: what comes after {s}?"),
               ("Which one comes directly after {s}?", "Name the item that follows {s} in order."),
               "After {s} comes {a}.",
               pools=(tuple(_DAYS), tuple(_MONTHS), tuple(str(n) for n in range(1, 22)))),
        Family("first_letter", tuple((w, w[0]) for w in _WORDS),
               ("The word {s} starts with the letter {a}.", "The first letter of {s} is {a}.",
                "{s} begins with {a}.", "You spell {s} starting with {a}."),
               ("What is the first letter of {s}?", "Which letter does {s} start with?",
                "How does the word {s} begin?", "Tell me the first letter of {s}.",
                "What letter does {s} begin with?", "Which letter starts the word {s}?",
                "Quick question: what is the first letter of {s}?"),
               ("Tell me the initial letter of the word {s}.", "The word {s}: which letter comes first?"),
               "The first letter of {s} is {a}."),
    )


FAMILIES: tuple[Family, ...] = _families()
FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
assert len(FAMILIES) == 11, "the paper evaluates 11 general tasks; the toy world mirrors that"


def fill(template: str, subject: str, answer: str = "") -> str:
    """Fill a template; capitalise the first letter so sentences read as sentences."""
    text = template.format(s=subject, a=answer)
    return text[0].upper() + text[1:]
