"""Generate the cookbook's own datasets into data/ — deterministic, offline, in the hub's standard formats.

    python scripts/make_datasets.py [--out DIR]

Every run with the same seed writes byte-identical files (a unit test regenerates them and compares with the
committed copies). Seven datasets, one per format the series teaches:

| folder            | format                          | task                                               | used by          |
|-------------------|---------------------------------|----------------------------------------------------|------------------|
| dates             | chat `messages`                 | any written date -> ISO 8601 `YYYY-MM-DD`          | SFT, serving, eval |
| json_extraction   | alpaca `instruction/input/output` | a sentence about a person -> JSON with 4 fixed keys | structured output  |
| preference        | `prompt/chosen/rejected` (conversational) | dates again, including dates that do not exist | DPO, ORPO   |
| arithmetic        | `prompt` + verifiable `answer`  | two-digit addition/subtraction, answer in tags     | GRPO             |
| pretraining       | plain `text`                    | Python's own documentation topics (real prose)     | continued pretraining, perplexity |
| shapes            | `images` + chat `messages`      | a drawn picture of one shape -> "red circle"       | vision-language model |
| capitals          | `question/choices/answer` (MMLU's layout) | country <-> capital, 4 choices             | benchmark (lm-eval)  |

Splits are 80/10/10 and leak-free by construction: each split is cut from a shuffled list of *unique keys*
(a calendar date, a person's name, an arithmetic expression, a documentation topic, a picture's drawing, a country),
so no key — and hence no
prompt — appears in two splits. The preference set draws its valid dates from dates the `dates` task never uses.
"""
from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import pathlib
import random
import sys

SEED = 1234
ROOT = pathlib.Path(__file__).resolve().parent.parent
SPLITS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))

DATES_INSTRUCTION = ("Convert the date to ISO 8601 format (YYYY-MM-DD). If the date does not exist, reply INVALID. "
                     "Reply with the date only.")
JSON_INSTRUCTION = ('Extract the person\'s name, age, city and job from the text. Reply with one JSON object with '
                    'exactly the keys "name", "age" (a number), "city" and "job".')
ARITHMETIC_SUFFIX = "Give the final answer as a number inside <answer></answer>."
SHAPES_PROMPT = "<image>\nWhat is in the picture?"


def split_keys(keys: list, rng: random.Random) -> dict[str, list]:
    """Shuffle unique keys and cut them 80/10/10; a key lands in exactly one split."""
    assert len(set(keys)) == len(keys), "split keys must be unique"
    keys = list(keys)
    rng.shuffle(keys)
    out, start = {}, 0
    for i, (name, frac) in enumerate(SPLITS):
        end = len(keys) if i == len(SPLITS) - 1 else start + round(frac * len(keys))
        out[name] = keys[start:end]
        start = end
    return out


def split_by_size(sizes: dict[str, int], rng: random.Random) -> dict[str, list[str]]:
    """Like split_keys, but the fractions apply to the keys' sizes (documentation topics differ a lot)."""
    keys = sorted(sizes)
    rng.shuffle(keys)
    total, out = sum(sizes.values()), {name: [] for name, _ in SPLITS}
    filled = dict.fromkeys(out, 0)
    for key in keys:
        # A key joins a held-out split only while it fits that split's share; everything else trains.
        name = next((n for n, frac in reversed(SPLITS[1:]) if filled[n] + sizes[key] <= frac * total), "train")
        out[name].append(key)
        filled[name] += sizes[key]
    return out


# ---------------------------------------------------------------- dates
MONTHS = list(calendar.month_name)[1:]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Each writes (year, month, day) the way people do; none is ambiguous (no bare 03/05/2021).
DATE_FORMATS = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"the {ordinal(d)} of {MONTHS[m - 1]}, {y}",
    lambda y, m, d: f"{MONTHS[m - 1][:3]} {d} {y}",
    lambda y, m, d: f"{MONTHS[m - 1]} {ordinal(d)} {y}",
    lambda y, m, d: f"{d:02d}.{m:02d}.{y} (day.month.year)",
    lambda y, m, d: f"{y}/{m:02d}/{d:02d}",
    lambda y, m, d: f"{d}-{MONTHS[m - 1][:3]}-{y}",
]


def date_prompt(text: str) -> str:
    return f"{DATES_INSTRUCTION}\nDate: {text}"


def make_dates(rng: random.Random, n: int, exclude: set = frozenset()) -> list[dt.date]:
    first, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    picked: set[dt.date] = set()
    while len(picked) < n:
        day = first + dt.timedelta(days=rng.randrange(span + 1))
        if day not in exclude:
            picked.add(day)
    return sorted(picked)


def dates_rows(days: list[dt.date], rng: random.Random) -> list[dict]:
    rows = []
    for day in days:
        text = rng.choice(DATE_FORMATS)(day.year, day.month, day.day)
        rows.append({"messages": [{"role": "user", "content": date_prompt(text)},
                                  {"role": "assistant", "content": day.isoformat()}]})
    return rows


def invalid_dates(rng: random.Random) -> list[tuple[int, int, int]]:
    """Days that do not exist and look plausible: 30/31 February, the 31st of a 30-day month."""
    out = set()
    for year in range(1950, 2050):
        for month, day in ((2, 30), (2, 31), (4, 31), (6, 31), (9, 31), (11, 31)):
            out.add((year, month, day))
    out = sorted(out)
    rng.shuffle(out)
    return out


def preference_rows(valid: list[dt.date], invalid: list[tuple[int, int, int]], rng: random.Random) -> list[dict]:
    """Half the rows are dates that do not exist (chosen: INVALID; rejected: the naive conversion, or the
    month's last day); half are real dates (chosen: the ISO date; rejected: day and month swapped, a chatty
    answer, or INVALID). Real dates rejecting INVALID are what stop "always say INVALID" from being a winning shortcut.
    The chatty/INVALID choice follows the day's ordinal, not `rng`, so the datasets built after this one
    stay byte-identical to earlier releases."""
    rows = []
    for y, m, d in invalid:
        text = rng.choice(DATE_FORMATS)(y, m, d)
        # Two wrong answers a model really gives: the naive conversion, and a silent "repair" to the month's
        # last day (what a DPO run learned when only the naive one was rejected).
        wrong_day = d if y % 2 else calendar.monthrange(y, m)[1]
        rows.append((date_prompt(text), "INVALID", f"{y}-{m:02d}-{wrong_day:02d}"))
    for day in valid:
        text = rng.choice(DATE_FORMATS)(day.year, day.month, day.day)
        if day.day <= 12 and day.day != day.month and rng.random() < 0.5:
            wrong = f"{day.year}-{day.day:02d}-{day.month:02d}"
        elif day.toordinal() % 2:
            wrong = "INVALID"
        else:
            wrong = f"Sure! The date {text} in ISO 8601 format is {day.isoformat()}."
        rows.append((date_prompt(text), day.isoformat(), wrong))
    rng.shuffle(rows)
    return [{"prompt": [{"role": "user", "content": p}],
             "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in rows]


# ---------------------------------------------------------------- json extraction
FIRST = ["Maria", "John", "Aisha", "Kenji", "Lucia", "Omar", "Emma", "Ravi", "Sofia", "Lars", "Chen", "Amara",
         "Diego", "Hannah", "Ivan", "Yuki", "Fatima", "Noah", "Elena", "Kwame", "Priya", "Mateo", "Ingrid", "Tariq",
         "Chloe", "Pablo", "Mei", "Olga", "Samuel", "Leila"]
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Rossi", "Haddad", "Muller", "Patel", "Costa", "Nilsson", "Wang",
        "Okafor", "Garcia", "Schmidt", "Petrov", "Sato", "Ali", "Brown", "Popescu", "Mensah", "Sharma", "Silva",
        "Berg", "Aziz", "Martin", "Ruiz", "Lin", "Novak", "Cohen", "Rahimi"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Porto",
          "Seville", "Dublin", "Accra", "Quito", "Perth", "Leeds", "Turin", "Austin", "Bergen"]
JOBS = ["nurse", "teacher", "plumber", "pilot", "chef", "architect", "farmer", "lawyer", "baker", "dentist",
        "electrician", "journalist", "librarian", "mechanic", "painter", "pharmacist", "translator", "welder"]
PERSON_TEMPLATES = [
    "{name} is {age} years old and works as a {job} in {city}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "In {city}, {name} ({age}) has been a {job} for years.",
    "{name}, {age}, moved to {city} to work as a {job}.",
    "Our new {job} is {name}. {name} is {age} and lives in {city}.",
    "At {age}, {name} is the best-known {job} in {city}.",
    "{city} local {name} turned {age} this spring; the {job} celebrated at home.",
]


def json_rows(names: list[str], rng: random.Random) -> list[dict]:
    rows = []
    for name in names:
        record = {"name": name, "age": rng.randint(19, 79), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
        text = rng.choice(PERSON_TEMPLATES).format(**record)
        rows.append({"instruction": JSON_INSTRUCTION, "input": text, "output": json.dumps(record)})
    return rows


# ---------------------------------------------------------------- arithmetic
def arithmetic_rows(exprs: list[tuple[int, str, int]]) -> list[dict]:
    rows = []
    for a, op, b in exprs:
        answer = a + b if op == "+" else a - b
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? {ARITHMETIC_SUFFIX}"}],
                     "answer": str(answer)})
    return rows


# ---------------------------------------------------------------- pretraining text
def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def topic_groups(topics: dict[str, str]) -> dict[str, list[str]]:
    """Topics that share a paragraph ("specialnames" contains "attribute-access", ...) form one group, so that
    no paragraph can reach two splits. Returns {first topic of the group: [its topics]}."""
    parent = {k: k for k in topics}

    def find(k):
        while parent[k] != k:
            k = parent[k]
        return k
    owner: dict[str, str] = {}
    for key in sorted(topics):
        for p in paragraphs(topics[key]):
            if p in owner:
                parent[find(key)] = find(owner[p])
            else:
                owner[p] = key
    groups: dict[str, list[str]] = {}
    for key in sorted(topics):
        groups.setdefault(find(key), []).append(key)
    return groups


def pretraining_rows(topics: dict[str, str], keys: list[str], chunk_chars: int = 1500) -> list[dict]:
    """Cut topics into paragraph-aligned chunks of about `chunk_chars` characters, each paragraph once."""
    rows, seen = [], set()
    for key in keys:
        chunk = ""
        for p in paragraphs(topics[key]):
            if p in seen:
                continue
            seen.add(p)
            if chunk and len(chunk) + len(p) > chunk_chars:
                rows.append({"text": chunk})
                chunk = ""
            chunk = f"{chunk}\n\n{p}" if chunk else p
        if chunk:
            rows.append({"text": chunk})
    return rows


# ---------------------------------------------------------------- pictures of shapes
SHAPE_COLOURS = {"red": (210, 35, 35), "green": (40, 150, 60), "blue": (35, 70, 210), "yellow": (235, 195, 25),
                 "purple": (130, 50, 170), "orange": (240, 125, 20)}
SHAPE_KINDS = ("circle", "square", "triangle", "star")
IMAGE_SIZE = 128


def shape_specs(rng: random.Random, per_caption: int) -> list[tuple]:
    """Unique drawings: (colour, shape, centre x, centre y, half-size, background grey), `per_caption` of each of
    the colour x shape captions, placed and sized at random on a random light background."""
    specs = set()
    for colour in SHAPE_COLOURS:
        for kind in SHAPE_KINDS:
            drawn = 0
            while drawn < per_caption:
                half = rng.randint(14, 34)
                spec = (colour, kind, rng.randint(half + 2, IMAGE_SIZE - half - 3),
                        rng.randint(half + 2, IMAGE_SIZE - half - 3), half, rng.randint(190, 250))
                if spec not in specs:
                    specs.add(spec)
                    drawn += 1
    return sorted(specs)


def draw_shape(spec: tuple):
    """One RGB picture, drawn without anti-aliasing so the PNG bytes depend only on Pillow's encoder."""
    import math
    from PIL import Image, ImageDraw
    colour, kind, x, y, half, grey = spec
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    draw, fill = ImageDraw.Draw(image), SHAPE_COLOURS[colour]
    if kind == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=fill)
    elif kind == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif kind == "triangle":
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)
    else:  # a five-pointed star: outer and inner points alternate
        points = [(x + r * math.sin(math.pi * k / 5), y - r * math.cos(math.pi * k / 5))
                  for k, r in zip(range(10), [half, half * 0.45] * 5)]
        draw.polygon([(round(px), round(py)) for px, py in points], fill=fill)
    return image


def shapes_rows(specs: list[tuple], split: str, out: pathlib.Path) -> list[dict]:
    """Draw each picture into out/images/ and return rows in the vision chat form: `images` (paths relative to
    the JSON-lines file) and `messages` whose user turn holds one <image> placeholder."""
    rows = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(specs):
        path = f"images/{split}_{i:04d}.png"
        draw_shape(spec).save(out / path, optimize=True)
        rows.append({"images": [path],
                     "messages": [{"role": "user", "content": SHAPES_PROMPT},
                                  {"role": "assistant", "content": f"{spec[0]} {spec[1]}"}]})
    return rows


# ---------------------------------------------------------------- capitals (multiple choice)
# General knowledge that no finetune in the series teaches: a benchmark for what finetuning must not destroy.
COUNTRIES = [  # (country, capital), 100 countries whose capital is undisputed and not named like the country
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("United Kingdom", "London"), ("Ireland", "Dublin"), ("Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("Switzerland", "Bern"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Czech Republic", "Prague"),
    ("Slovakia", "Bratislava"), ("Hungary", "Budapest"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Iceland", "Reykjavik"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Ukraine", "Kyiv"), ("Croatia", "Zagreb"), ("Serbia", "Belgrade"),
    ("Slovenia", "Ljubljana"), ("Albania", "Tirana"), ("Malta", "Valletta"), ("Cyprus", "Nicosia"),
    ("Russia", "Moscow"), ("Belarus", "Minsk"), ("Moldova", "Chisinau"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("India", "New Delhi"), ("South Korea", "Seoul"), ("North Korea", "Pyongyang"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"),
    ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Afghanistan", "Kabul"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Jordan", "Amman"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Turkey", "Ankara"), ("Mongolia", "Ulaanbaatar"), ("Uzbekistan", "Tashkent"),
    ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("Qatar", "Doha"), ("Oman", "Muscat"),
    ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"), ("Egypt", "Cairo"),
    ("Nigeria", "Abuja"), ("Kenya", "Nairobi"), ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"),
    ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Senegal", "Dakar"), ("Uganda", "Kampala"),
    ("Zimbabwe", "Harare"), ("Zambia", "Lusaka"), ("Angola", "Luanda"), ("Mozambique", "Maputo"),
    ("Sudan", "Khartoum"), ("Libya", "Tripoli"), ("Mali", "Bamako"), ("Rwanda", "Kigali"),
    ("Madagascar", "Antananarivo"), ("Namibia", "Windhoek"), ("Somalia", "Mogadishu"), ("Canada", "Ottawa"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"),
    ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"),
    ("Cuba", "Havana"), ("Jamaica", "Kingston"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("Fiji", "Suva"),
]


def capitals_rows(countries: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """Two questions per country, each with its answer and three wrong ones drawn from the other countries."""
    rows = []
    for country, capital in countries:
        others = [c for c in COUNTRIES if c[0] != country]
        for question, right, wrong in ((f"What is the capital of {country}?", capital,
                                        [c[1] for c in rng.sample(others, 3)]),
                                       (f"{capital} is the capital of which country?", country,
                                        [c[0] for c in rng.sample(others, 3)])):
            choices = [right, *wrong]
            rng.shuffle(choices)
            rows.append({"question": question, "choices": choices, "answer": choices.index(right)})
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(out: pathlib.Path, seed: int = SEED) -> dict[str, dict[str, int]]:
    """Write every dataset under `out`; return {dataset: {split: rows}}."""
    counts: dict[str, dict[str, int]] = {}

    def emit(name: str, split: str, rows: list[dict]) -> None:
        write_jsonl(out / name / f"{split}.jsonl", rows)
        counts.setdefault(name, {})[split] = len(rows)

    rng = random.Random(seed)
    task_days = make_dates(rng, 1000)
    for split, days in split_keys(task_days, rng).items():
        emit("dates", split, dates_rows(days, rng))

    pref_days = make_dates(rng, 400, exclude=set(task_days))
    bad = invalid_dates(rng)[:400]
    pref_valid, pref_invalid = split_keys(pref_days, rng), split_keys(bad, rng)
    for split, _ in SPLITS:
        emit("preference", split, preference_rows(pref_valid[split], pref_invalid[split], rng))

    names = sorted(f"{f} {l}" for f in FIRST for l in LAST)
    names = rng.sample(names, 800)
    for split, keys in split_keys(names, rng).items():
        emit("json_extraction", split, json_rows(keys, rng))

    exprs = sorted({(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-" if op == "+" or a >= b})
    exprs = rng.sample(exprs, 800)
    for split, keys in split_keys(exprs, rng).items():
        emit("arithmetic", split, arithmetic_rows(keys))

    from pydoc_data.topics import topics  # real English prose, shipped with every CPython (PSF licence)
    groups = topic_groups(topics)
    sizes = {g: sum(len(topics[k]) for k in members) for g, members in groups.items()}
    for split, picked in split_by_size(sizes, rng).items():
        emit("pretraining", split, pretraining_rows(topics, [k for g in picked for k in groups[g]]))
    (out / "pretraining" / "SOURCE.txt").write_text(
        f"Text of pydoc_data.topics from CPython {sys.version.split()[0]}; split by groups of topics that share "
        "no paragraph with other groups, chunked by paragraph.\n")

    # Its own generator: the pretraining split above depends on the CPython release, and must not move these.
    shapes_rng = random.Random(f"{seed}-shapes")
    for split, specs in split_keys(shape_specs(shapes_rng, 25), shapes_rng).items():
        emit("shapes", split, shapes_rows(specs, split, out / "shapes"))

    capitals_rng = random.Random(f"{seed}-capitals")
    for split, countries in split_keys(COUNTRIES, capitals_rng).items():
        emit("capitals", split, capitals_rows(countries, capitals_rng))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "data")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for name, splits in build(args.out, args.seed).items():
        print(f"{name:16s} " + "  ".join(f"{s}={n}" for s, n in splits.items()))


if __name__ == "__main__":
    main()
