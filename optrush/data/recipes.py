"""A deterministic synthetic recipe corpus (RecipeNLG-style records) and the one text template for recipes.

    records = generate_recipes(10_000, seed=0)          # a lazy iterator: 2M records stream in bounded memory
    write_jsonl(records, "recipes.jsonl")
    text = recipe_prompt(record) + recipe_completion(record)

A record is `{"title": str, "ingredients": ["2 cups flour", ...], "directions": ["Preheat ...", ...],
"NER": ["flour", ...]}`. The corpus is coherent enough for a tiny LM to learn its structure: a dish type (soup,
cake, ...) picks its core ingredients, ~150 ingredients are drawn with Zipf-like frequency, verbs fit the ingredient
(pour a liquid, dice a solid), titles come from templates ("Easy Garlic Chicken Soup"), and every listed ingredient
is used by some step. Counts of ingredients and steps are lognormal, so a few records are long.

A small fraction of records is deliberately bad (`BAD_RECORD_RATES`; `bad_rates=RECIPENLG_BAD_RATES` for a corpus
that loses more than half to cleaning, like the issue #4 reference job), for the cleaning stage to catch:
`empty` (the title or the directions are empty), `duplicate` (an exact copy of one of the last 1000 good records),
`too_long` (200-600 steps) and `rare` (one made-up ingredient, e.g. "murblaquin powder", in no other record).
Everything is drawn from one `random.Random(seed)`, so the same (n, seed) always gives the same records (the
generator keeps the last 1000 good records it yielded to copy from: do not modify yielded records in place).

The recipe text template (one, used for training, the tokenizer corpus and sampling prompts):

    prompt:      "Recipe: {title}\n"
    completion:  "Ingredients:\n- {ingredient}\n- {ingredient}\nDirections:\n1. {step}\n2. {step}"

(no trailing newline: the EOS token follows the last step).
"""
from __future__ import annotations

import json
import math
import random
from bisect import bisect
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import accumulate
from pathlib import Path
from statistics import NormalDist

BAD_RECORD_RATES = {"empty": 0.004, "duplicate": 0.008, "too_long": 0.001, "rare": 0.003}
"""Probability that a record is deliberately bad, per kind (mutually exclusive)."""
RECIPENLG_BAD_RATES = {"empty": 0.02, "duplicate": 0.15, "too_long": 0.002, "rare": 0.38}
"""A corpus as dirty as the issue #4 reference job, where cleaning keeps less than half of RecipeNLG's ~2M records:
55% bad, mostly records with a one-off ingredient (the rare-ingredient rule) and exact copies."""

# (name, unit kind, dish kind, title word or "" when the ingredient never names a dish), most common first:
# the position sets the Zipf weight 1/(rank+2).
INGREDIENTS = [
    ("salt", "spice", "both", ""), ("sugar", "dry", "sweet", ""), ("butter", "dry", "both", "Butter"),
    ("all-purpose flour", "dry", "sweet", ""), ("eggs", "count", "both", ""), ("onion", "count", "savory", "Onion"),
    ("garlic", "clove", "savory", "Garlic"), ("water", "liquid", "both", ""), ("milk", "liquid", "both", ""),
    ("olive oil", "liquid", "savory", ""), ("black pepper", "spice", "savory", "Pepper"),
    ("vanilla extract", "spice", "sweet", "Vanilla"), ("baking powder", "spice", "sweet", ""),
    ("brown sugar", "dry", "sweet", "Brown Sugar"), ("baking soda", "spice", "sweet", ""),
    ("chicken breast", "weight", "savory", "Chicken"), ("vegetable oil", "liquid", "both", ""),
    ("cheddar cheese", "dry", "savory", "Cheddar"), ("lemon juice", "liquid", "both", "Lemon"),
    ("tomatoes", "count", "savory", "Tomato"), ("chicken broth", "liquid", "savory", ""),
    ("ground beef", "weight", "savory", "Beef"), ("cinnamon", "spice", "sweet", "Cinnamon"),
    ("parmesan cheese", "dry", "savory", "Parmesan"), ("sour cream", "dry", "both", ""),
    ("heavy cream", "liquid", "both", "Cream"), ("carrots", "count", "savory", "Carrot"),
    ("celery", "count", "savory", "Celery"), ("potatoes", "count", "savory", "Potato"),
    ("green onions", "count", "savory", "Scallion"), ("parsley", "herb", "savory", "Parsley"),
    ("cream cheese", "package", "both", "Cream Cheese"), ("honey", "liquid", "both", "Honey"),
    ("soy sauce", "liquid", "savory", "Soy"), ("bell pepper", "count", "savory", "Pepper"),
    ("mushrooms", "dry", "savory", "Mushroom"), ("rice", "dry", "savory", "Rice"),
    ("chocolate chips", "dry", "sweet", "Chocolate Chip"), ("oregano", "spice", "savory", ""),
    ("basil", "herb", "savory", "Basil"), ("paprika", "spice", "savory", "Paprika"),
    ("cumin", "spice", "savory", ""), ("chili powder", "spice", "savory", ""),
    ("mozzarella cheese", "dry", "savory", "Mozzarella"), ("bacon", "slice", "savory", "Bacon"),
    ("spinach", "dry", "savory", "Spinach"), ("lemon zest", "spice", "sweet", "Lemon"),
    ("walnuts", "dry", "sweet", "Walnut"), ("pecans", "dry", "sweet", "Pecan"),
    ("cocoa powder", "dry", "sweet", "Chocolate"), ("bananas", "count", "sweet", "Banana"),
    ("blueberries", "dry", "sweet", "Blueberry"), ("strawberries", "dry", "sweet", "Strawberry"),
    ("apples", "count", "sweet", "Apple"), ("oats", "dry", "sweet", "Oatmeal"),
    ("powdered sugar", "dry", "sweet", ""), ("maple syrup", "liquid", "sweet", "Maple"),
    ("nutmeg", "spice", "sweet", ""), ("ginger", "spice", "both", "Ginger"),
    ("canned black beans", "can", "savory", "Black Bean"), ("diced tomatoes", "can", "savory", "Tomato"),
    ("tomato sauce", "can", "savory", ""), ("pasta", "weight", "savory", ""),
    ("spaghetti", "weight", "savory", "Spaghetti"), ("shrimp", "weight", "savory", "Shrimp"),
    ("salmon fillets", "weight", "savory", "Salmon"), ("pork chops", "count", "savory", "Pork Chop"),
    ("ground turkey", "weight", "savory", "Turkey"), ("sausage", "weight", "savory", "Sausage"),
    ("ham", "weight", "savory", "Ham"), ("zucchini", "count", "savory", "Zucchini"),
    ("broccoli", "dry", "savory", "Broccoli"), ("cauliflower", "dry", "savory", "Cauliflower"),
    ("corn", "dry", "savory", "Corn"), ("peas", "dry", "savory", "Pea"), ("kale", "dry", "savory", "Kale"),
    ("sweet potatoes", "count", "savory", "Sweet Potato"), ("red onion", "count", "savory", "Red Onion"),
    ("jalapeno", "count", "savory", "Jalapeno"), ("cilantro", "herb", "savory", "Cilantro"),
    ("thyme", "spice", "savory", "Thyme"), ("rosemary", "spice", "savory", "Rosemary"),
    ("bay leaves", "count", "savory", ""), ("cayenne pepper", "spice", "savory", ""),
    ("red pepper flakes", "spice", "savory", ""), ("dijon mustard", "spice", "savory", "Mustard"),
    ("mayonnaise", "dry", "savory", ""), ("worcestershire sauce", "spice", "savory", ""),
    ("balsamic vinegar", "liquid", "savory", "Balsamic"), ("white wine", "liquid", "savory", ""),
    ("beef broth", "liquid", "savory", ""), ("coconut milk", "can", "savory", "Coconut"),
    ("curry powder", "spice", "savory", "Curry"), ("lime juice", "liquid", "savory", "Lime"),
    ("avocado", "count", "savory", "Avocado"), ("feta cheese", "dry", "savory", "Feta"),
    ("yogurt", "dry", "both", ""), ("buttermilk", "liquid", "sweet", "Buttermilk"),
    ("raisins", "dry", "sweet", "Raisin"), ("coconut flakes", "dry", "sweet", "Coconut"),
    ("almonds", "dry", "both", "Almond"), ("peanut butter", "dry", "sweet", "Peanut Butter"),
    ("cornstarch", "spice", "both", ""), ("shortening", "dry", "sweet", ""),
    ("molasses", "liquid", "sweet", "Molasses"), ("pumpkin puree", "can", "sweet", "Pumpkin"),
    ("cranberries", "dry", "sweet", "Cranberry"), ("peaches", "count", "sweet", "Peach"),
    ("cherries", "dry", "sweet", "Cherry"), ("raspberries", "dry", "sweet", "Raspberry"),
    ("orange juice", "liquid", "sweet", "Orange"), ("almond extract", "spice", "sweet", ""),
    ("whole wheat flour", "dry", "sweet", "Wheat"), ("cornmeal", "dry", "sweet", "Cornmeal"),
    ("condensed milk", "can", "sweet", ""), ("white chocolate", "dry", "sweet", "White Chocolate"),
    ("caramel sauce", "liquid", "sweet", "Caramel"), ("cream of mushroom soup", "can", "savory", ""),
    ("egg noodles", "weight", "savory", "Noodle"), ("tortillas", "count", "savory", ""),
    ("salsa", "dry", "savory", "Salsa"), ("green beans", "dry", "savory", "Green Bean"),
    ("cabbage", "count", "savory", "Cabbage"), ("eggplant", "count", "savory", "Eggplant"),
    ("chickpeas", "can", "savory", "Chickpea"), ("lentils", "dry", "savory", "Lentil"),
    ("quinoa", "dry", "savory", "Quinoa"), ("tofu", "weight", "savory", "Tofu"),
    ("sesame oil", "spice", "savory", "Sesame"), ("fish sauce", "spice", "savory", ""),
    ("hoisin sauce", "spice", "savory", "Hoisin"), ("brown rice", "dry", "savory", "Brown Rice"),
    ("steak", "weight", "savory", "Steak"), ("pork tenderloin", "weight", "savory", "Pork"),
    ("chicken thighs", "weight", "savory", "Chicken"), ("turkey breast", "weight", "savory", "Turkey"),
    ("cod fillets", "weight", "savory", "Cod"), ("tuna", "can", "savory", "Tuna"),
    ("swiss cheese", "dry", "savory", "Swiss"), ("ricotta cheese", "dry", "both", "Ricotta"),
    ("goat cheese", "dry", "savory", "Goat Cheese"), ("pine nuts", "dry", "savory", ""),
    ("capers", "spice", "savory", ""), ("olives", "dry", "savory", "Olive"), ("leeks", "count", "savory", "Leek"),
    ("shallots", "count", "savory", "Shallot"), ("dill", "herb", "savory", "Dill"), ("mint", "herb", "both", "Mint"),
]

UNITS = {  # unit kind -> quantity strings and unit words to combine them with
    "dry": (("1/4", "1/3", "1/2", "2/3", "3/4", "1", "1 1/2", "2", "3"), ("cup", "cups")),
    "liquid": (("1/4", "1/3", "1/2", "3/4", "1", "1 1/2", "2", "4"), ("cup", "cups")),
    "spice": (("1/4", "1/2", "1", "1 1/2", "2"), ("teaspoon", "teaspoons", "tablespoon", "tablespoons")),
    "herb": (("1", "2", "1/4"), ("tablespoon chopped", "tablespoons chopped", "cup chopped", "cups chopped")),
    "weight": (("1/2", "1", "1 1/2", "2", "8", "12", "16"), ("pound", "pounds", "ounce", "ounces")),
    "count": (("1", "2", "3", "4", "6"), ("",)),
    "clove": (("1", "2", "3", "4", "6"), ("clove", "cloves")),
    "slice": (("2", "4", "6", "8"), ("slices",)),
    "can": (("1", "2"), ("(15 ounce) can", "(15 ounce) cans")),
    "package": (("1", "2"), ("(8 ounce) package", "(8 ounce) packages")),
}

DISHES = {  # dish -> (kind, core ingredients, baked in the oven)
    "Soup": ("savory", ("chicken broth", "onion"), False), "Stew": ("savory", ("beef broth", "potatoes"), False),
    "Chili": ("savory", ("ground beef", "chili powder"), False), "Casserole": ("savory", ("cheddar cheese",), True),
    "Stir-Fry": ("savory", ("soy sauce", "vegetable oil"), False), "Skillet": ("savory", ("olive oil",), False),
    "Pasta": ("savory", ("pasta", "parmesan cheese"), False), "Salad": ("savory", ("olive oil", "lemon juice"), False),
    "Curry": ("savory", ("curry powder", "coconut milk"), False), "Tacos": ("savory", ("tortillas", "salsa"), False),
    "Bake": ("savory", ("butter",), True), "Frittata": ("savory", ("eggs", "milk"), True),
    "Cake": ("sweet", ("all-purpose flour", "sugar", "eggs", "butter", "baking powder"), True),
    "Cookies": ("sweet", ("all-purpose flour", "sugar", "butter", "baking soda"), True),
    "Muffins": ("sweet", ("all-purpose flour", "sugar", "milk", "baking powder"), True),
    "Bread": ("sweet", ("all-purpose flour", "baking soda", "eggs"), True),
    "Pie": ("sweet", ("butter", "sugar"), True), "Bars": ("sweet", ("butter", "brown sugar"), True),
    "Pancakes": ("sweet", ("all-purpose flour", "milk", "eggs"), False),
    "Brownies": ("sweet", ("cocoa powder", "sugar", "butter"), True),
}
ADJECTIVES = ("Easy", "Quick", "Classic", "Homemade", "Creamy", "Spicy", "Simple", "Best", "Healthy", "Hearty",
              "Rustic", "Zesty", "Golden", "Old-Fashioned", "Crispy", "One-Pot", "Weeknight", "Perfect")
PEOPLE = ("Grandma's", "Mom's", "Aunt Ruth's", "Dad's", "Uncle Joe's")

# cooking verb -> step template; {x} is a list of ingredients, {n} a number of minutes
STEP_TEMPLATES = {
    "savory": {
        "chop": "Chop the {x}.", "dice": "Dice the {x}.", "slice": "Thinly slice the {x}.",
        "brown": "Brown the {x} in a large skillet.", "roast": "Roast the {x} for {n} minutes.",
        "grill": "Grill the {x} for {n} minutes per side.", "cook": "Cook the {x} for {n} minutes, stirring often.",
        "fry": "Fry the {x} until golden.", "saute": "Saute the {x} over medium heat for {n} minutes.",
        "marinate": "Marinate the {x} for {n} minutes.", "add": "Add the {x} and stir to combine.",
        "pour": "Pour in the {x}.", "simmer": "Add the {x} and simmer for {n} minutes.",
        "boil": "Bring the {x} to a boil.", "heat": "Heat the {x} in a large pot over medium heat.",
        "whisk": "In a small bowl, whisk together the {x}.", "season": "Season with {x}.",
        "sprinkle": "Sprinkle the {x} over the top.", "stir": "Stir in the {x}.", "garnish": "Garnish with {x}.",
        "toss": "Toss the {x} together.", "combine": "Combine the {x} in a large bowl.",
        "drain": "Drain the {x} and set aside.",
    },
    "sweet": {
        "beat": "Beat the {x} until fluffy.", "add": "Add the {x} and mix well.", "slice": "Slice the {x}.",
        "mash": "Mash the {x} with a fork.", "fold": "Gently fold in the {x}.", "pour": "Pour in the {x}.",
        "whisk": "In a large bowl, whisk together the {x}.", "stir": "Stir in the {x}.",
        "sprinkle": "Sprinkle the {x} over the top.", "combine": "Combine the {x} in a medium bowl.",
        "mix": "Mix the {x} until smooth.", "melt": "Melt the {x} in a small saucepan.",
        "spread": "Spread the {x} evenly.", "knead": "Knead the {x} into a smooth dough.",
        "blend": "Blend the {x} until smooth.", "sift": "Sift the {x} together.",
        "cream": "Cream the {x} until light.", "chill": "Chill the {x} for {n} minutes.",
    },
}
UNIT_CLASS = {"count": "solid", "weight": "solid", "clove": "solid", "slice": "solid", "liquid": "liquid",
              "spice": "seasoning", "herb": "seasoning", "dry": "dry", "can": "dry", "package": "dry"}
VERBS = {  # (dish kind, ingredient class) -> verbs that make sense for it
    ("savory", "solid"): ("chop", "dice", "slice", "brown", "roast", "grill", "cook", "fry", "saute", "marinate",
                          "add"),
    ("savory", "liquid"): ("pour", "add", "simmer", "boil", "heat", "whisk"),
    ("savory", "seasoning"): ("season", "sprinkle", "stir", "garnish", "add"),
    ("savory", "dry"): ("add", "stir", "toss", "combine", "drain", "cook"),
    ("sweet", "solid"): ("beat", "add", "slice", "mash", "fold"),
    ("sweet", "liquid"): ("pour", "whisk", "stir", "add"),
    ("sweet", "seasoning"): ("sprinkle", "stir", "whisk", "add"),
    ("sweet", "dry"): ("whisk", "combine", "mix", "fold", "melt", "spread", "knead", "blend", "sift", "cream",
                       "chill"),
}
FILLER_STEPS = {"savory": ("Stir well.", "Reduce heat to low and cover.", "Let rest for {n} minutes.",
                           "Cover and cook for {n} minutes.", "Taste and adjust the seasoning.", "Set aside."),
                "sweet": ("Stir well.", "Let rest for {n} minutes.", "Scrape down the sides of the bowl.",
                          "Grease a baking pan.", "Set aside.", "Line a tray with parchment paper.")}
# Templates pre-split around {x} and {n}: joining strings is several times faster than str.format, and the
# generator spends most of its time writing steps.
CLASS_TEMPLATES = {kind: {cls: tuple(tuple(STEP_TEMPLATES[kind][verb].replace("{x}", "{n}").split("{n}"))
                                     for verb in verbs)
                          for (k, cls), verbs in VERBS.items() if k == kind} for kind in STEP_TEMPLATES}
FINISH = {"savory": ("Serve warm.", "Serve immediately.", "Serve over rice.", "Serve with crusty bread."),
          "sweet": ("Let cool for {n} minutes before serving.", "Serve warm.", "Serve chilled.",
                    "Dust with powdered sugar and serve.")}
RARE_SYLLABLES = ("zor", "bla", "quin", "mur", "fel", "tash", "vek", "lun", "drom", "pix", "gar", "nob", "sel",
                  "thu", "wim", "yal")
RARE_KINDS = ("root", "berry", "leaf", "seed", "paste", "powder", "nut", "fruit")

def recipe_prompt(record: dict) -> str:
    """`Recipe: {title}\\n` (the prompt of the recipe template, see the module docstring)."""
    return f"Recipe: {record['title']}\n"


def recipe_completion(record: dict) -> str:
    """The ingredients as a dashed list, then the numbered directions (see the module docstring)."""
    ingredients = "".join(f"- {item}\n" for item in record["ingredients"])
    directions = "\n".join(f"{i}. {step}" for i, step in enumerate(record["directions"], 1))
    return f"Ingredients:\n{ingredients}Directions:\n{directions}"


def _quantities(unit_kind: str, name: str) -> tuple[str, ...]:
    """Every way to write an amount of `name`: '1 cup flour', '2 cups flour', '1/2 teaspoon flour' ..."""
    amounts, units = UNITS[unit_kind]
    if unit_kind == "count":
        return tuple(f"{amount} {name}" for amount in amounts)
    out = []
    for amount in amounts:
        plural = len(units) > 1 and amount not in ("1", "1/4", "1/3", "1/2", "2/3", "3/4")
        out += [f"{amount} {units[family + int(plural)]} {name}" for family in range(0, len(units), 2)]
    return tuple(out)


class _Vocabulary:
    """Per dish kind: the ingredient pool with cumulative Zipf weights (for `bisect` draws) and the ingredients
    that may name a dish; per ingredient: its written quantities and its class (which verbs fit it)."""

    def __init__(self):
        self.by_name = {item[0]: item for item in INGREDIENTS}
        self.quantities = {name: _quantities(unit, name) for name, unit, _, _ in INGREDIENTS}
        self.classes = {name: UNIT_CLASS[unit] for name, unit, _, _ in INGREDIENTS}
        self.pools, self.cumulative, self.featured = {}, {}, {}
        for kind in ("savory", "sweet"):
            ranked = [(rank, item) for rank, item in enumerate(INGREDIENTS) if item[2] in (kind, "both")]
            self.pools[kind] = [item for _, item in ranked]
            self.cumulative[kind] = list(accumulate(1.0 / (rank + 2) for rank, _ in ranked))
            self.featured[kind] = [item for _, item in ranked if item[3]]


VOCAB = _Vocabulary()
DISH_NAMES = tuple(DISHES)


def generate_recipes(n: int, *, seed: int = 0, bad_rates: dict[str, float] = BAD_RECORD_RATES) -> Iterator[dict]:
    """`n` records, streamed; deterministic in (n, seed, bad_rates). With the default BAD_RECORD_RATES about 1 in 60
    records is deliberately bad (see the module docstring); RECIPENLG_BAD_RATES makes more than half bad."""
    if set(bad_rates) != set(BAD_RECORD_RATES) or sum(bad_rates.values()) > 1:
        raise ValueError(f"bad_rates={bad_rates}: give a probability for each of {sorted(BAD_RECORD_RATES)}, "
                         "summing to at most 1")
    rng = random.Random(seed)
    recent: deque[dict] = deque(maxlen=1000)  # good records a `duplicate` may copy: bounded memory
    cut_empty = bad_rates["empty"]
    cut_duplicate = cut_empty + bad_rates["duplicate"]
    cut_long = cut_duplicate + bad_rates["too_long"]
    cut_rare = cut_long + bad_rates["rare"]
    rare_count = 0
    for _ in range(n):
        u = rng.random()
        if u >= cut_rare or (cut_empty <= u < cut_duplicate and not recent):
            record = _recipe(rng)
            recent.append(record)
        elif u < cut_empty:
            record = _recipe(rng)
            if u < cut_empty / 2:
                record["title"] = ""
            else:
                record["directions"] = []
        elif u < cut_duplicate:
            original = recent[int(rng.random() * len(recent))]
            record = {key: value if isinstance(value, str) else list(value) for key, value in original.items()}
        elif u < cut_long:
            record = _recipe(rng, n_steps=200 + int(rng.random() * 401))
        else:
            record = _recipe(rng, rare=_rare_name(rare_count))
            rare_count += 1
        yield record


def _rare_name(index: int) -> str:
    """A made-up ingredient, different for every index: 'zorblaquin root'."""
    block = len(RARE_KINDS) * len(RARE_SYLLABLES) ** 3
    # an odd multiplier permutes each block of indices, so consecutive items do not share their first syllables
    index = index // block * block + index * 4_253 % block
    kind = RARE_KINDS[index % len(RARE_KINDS)]
    index //= len(RARE_KINDS)
    syllables = []
    while index or len(syllables) < 3:  # three syllables or more: distinct names for every index
        syllables.append(RARE_SYLLABLES[index % len(RARE_SYLLABLES)])
        index //= len(RARE_SYLLABLES)
    return f"{''.join(syllables)} {kind}"


def _lognormal_table(*, median: float, sigma: float, low: int, high: int, size: int = 8192) -> tuple[int, ...]:
    """Quantiles of a rounded, clipped lognormal: `table[int(u * size)]` for uniform u is one draw from it (a
    lookup is much cheaper than `rng.gauss` in the hot loop)."""
    normal = NormalDist()
    return tuple(min(high, max(low, round(median * math.exp(sigma * normal.inv_cdf((i + 0.5) / size)))))
                 for i in range(size))


N_INGREDIENTS = _lognormal_table(median=8, sigma=0.45, low=2, high=40)
N_FILLER_STEPS = _lognormal_table(median=1, sigma=0.9, low=0, high=30)


def _recipe(rng: random.Random, *, n_steps: int | None = None, rare: str | None = None) -> dict:
    draw = rng.random
    dish = DISH_NAMES[int(draw() * len(DISH_NAMES))]
    kind, core, baked = DISHES[dish]
    pool, cumulative, featured = VOCAB.pools[kind], VOCAB.cumulative[kind], VOCAB.featured[kind]
    n_ingredients = N_INGREDIENTS[int(draw() * len(N_INGREDIENTS))]

    star = featured[int(draw() * len(featured))]
    names = [star[0]] + [name for name in core if name != star[0]]
    seen = set(names)
    total = cumulative[-1]
    for _ in range(3 * n_ingredients):  # Zipf draws, skipping repeats
        if len(names) >= n_ingredients:
            break
        name = pool[bisect(cumulative, draw() * total)][0]
        if name not in seen:
            seen.add(name)
            names.append(name)
    quantities = VOCAB.quantities
    ingredients = [quantities[name][int(draw() * len(quantities[name]))] for name in names]
    if rare is not None:
        at = 1 + int(draw() * len(names))
        names.insert(at, rare)
        ingredients.insert(at, f"{1 + int(draw() * 3)} cups {rare}")
    return {"title": _title(rng, dish, star, names), "ingredients": ingredients,
            "directions": _directions(rng, kind=kind, baked=baked, names=names, n_steps=n_steps), "NER": names}


def _title(rng: random.Random, dish: str, star: tuple, names: list[str]) -> str:
    """'Easy Garlic Chicken Soup': the featured ingredient, maybe a second one and an adjective, then the dish."""
    main, u = star[3], rng.random()
    if u < 0.3:
        return f"{ADJECTIVES[int(rng.random() * len(ADJECTIVES))]} {main} {dish}"
    if u < 0.65:
        by_name = VOCAB.by_name
        others = [by_name[name][3] for name in names[1:6] if name in by_name and by_name[name][3] not in ("", main)]
        if others:
            other = others[int(rng.random() * len(others))]
            if u < 0.45:
                return f"{ADJECTIVES[int(rng.random() * len(ADJECTIVES))]} {other} {main} {dish}"
            return f"{other} {main} {dish}" if u < 0.55 else f"{main} and {other} {dish}"
    if u < 0.9:
        return f"{main} {dish}"
    return f"{PEOPLE[int(rng.random() * len(PEOPLE))]} {main} {dish}"


def _directions(rng: random.Random, *, kind: str, baked: bool, names: list[str], n_steps: int | None) -> list[str]:
    """Steps that use every ingredient of `names` in order, in groups of up to three of one class (so the verb
    fits them all), plus filler steps: lognormal in number, or up to `n_steps` steps in all when given."""
    draw = rng.random
    templates = CLASS_TEMPLATES[kind]
    classes = [VOCAB.classes.get(name, "dry") for name in names]  # made-up ingredients are 'dry'
    steps = [f"Preheat oven to {325 + 25 * int(draw() * 6)} degrees F."] if baked else []
    i, count = 0, len(names)
    while i < count:
        end, j = i + 1 + int(draw() * 3), i + 1
        while j < end and j < count and classes[j] == classes[i]:
            j += 1
        x = names[i] if j == i + 1 else ", ".join(names[i:j - 1]) + " and " + names[j - 1]
        options = templates[classes[i]]
        parts = options[int(draw() * len(options))]
        steps.append(parts[0] + x + parts[1] if len(parts) == 2 else
                     parts[0] + x + parts[1] + str(2 + int(draw() * 28)) + parts[2])
        i = j
    finish = [f"Bake for {15 + 5 * int(draw() * 9)} minutes, until golden."] if baked else []
    finish.append(FINISH[kind][int(draw() * len(FINISH[kind]))].format(n=5 + 5 * int(draw() * 4)))
    if n_steps is None:
        n_filler = N_FILLER_STEPS[int(draw() * len(N_FILLER_STEPS))]
    else:
        n_filler = max(0, n_steps - len(steps) - len(finish))
    fillers = FILLER_STEPS[kind]
    for _ in range(n_filler):
        steps.insert(1 + int(draw() * len(steps)), fillers[int(draw() * len(fillers))].format(n=2 + int(draw() * 13)))
    return steps + finish


def write_jsonl(records: Iterable[dict], path: str | Path) -> int:
    """Write one JSON object per line (UTF-8); returns the number of records written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False))
            f.write("\n")
            count += 1
    return count
