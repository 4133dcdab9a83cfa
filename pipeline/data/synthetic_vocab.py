"""Word lists for the synthetic memory dialogues (:mod:`pipeline.data.synthetic`).

The lists are pairwise disjoint (checked by :func:`check_vocabulary` and the tests) and large enough
that guessing an answer without the dialogue is unlikely (≥ 40 values per attribute).
"""

from __future__ import annotations


def _words(text: str) -> list[str]:
    """Whitespace-separated single words."""
    return text.split()


def _phrases(text: str) -> list[str]:
    """Semicolon-separated phrases (line breaks count as spaces)."""
    return [p.strip() for p in " ".join(text.split()).split(";") if p.strip()]


NAMES = _words(
    """
Aaron Abigail Adele Adrian Agnes Aiden Alba Alec Alma Alvin Amara Amelie Anders Anika Anton Arlo Astrid
Aurora Axel Beatrix Benedict Bianca Boris Bruno Caleb Camille Carmen Casper Cecil Celine Cedric Chloe Clara
Clement Colette Conrad Cora Cyrus Dalia Damian Daphne Darius Delia Dmitri Dorian Edgar Edith Edwin Eileen
Elias Elodie Emil Enzo Esme Esther Ezra Fabian Felix Fiona Freya Gideon Gilbert Greta Gustav Hana Harvey
Hazel Hector Helga Henrik Hugo Ida Ignacio Ilse Imogen Ines Ingrid Isaac Ivan Ivy Jasper Joaquin Jonas
Josefin Julian Juno Kai Karina Kasimir Keira Kenji Klara Lars Leila Lena Leon Liesel Linus Lorena Lucas
Lydia Magnus Maja Malik Marcel Margot Marius Matilda Maxim Mei Milo Mira Moritz Nadia Nico Nina Noah Nora
Odile Olaf Olivia Omar Oscar Otto Pablo Paloma Pavel Penelope Petra Philippa Quentin Rafael Rania Reza Rhea
Rosalind Rowan Rufus Sabine Samir Selma Serena Silas Sofia Stellan Sven Tamsin Tariq Thea Tobias Ulla Ulrich
Valentin Vera Viggo Vivian Walter Wanda Xavier Yara Yusuf Zara Zeno Zoltan Annika Bertil Cosima Dagny Eamon
Farah Gunnar Halima Idris Jovan Kalinda Lucian Marit Nils Orla Priya Quinn Ragnar Saoirse Teodor Ursula
Vidar Wilhelmina Yasmin Zainab Ambrose Brigitte Cassius Dorothea Evander Fenna Gregor Hedda Ismail Jolanda
Kristof Leopold Mathilde Niamh Oren Perpetua Roald Solveig Tilde
"""
)

PET_NAMES = _words(
    """
Biscuit Pickles Noodle Waffles Sprocket Gizmo Pebble Whiskers Bramble Nugget Toffee Marmalade Ziggy Rascal
Bandit Cinder Dottie Fudge Gumdrop Hopscotch Jellybean Kipper Lollipop Moose Nutmeg Opal Paddington Quasar
Rumble Snickers Tinker Truffle Wobble Yoyo Zephyr Acorn Blizzard Crumpet Domino Echo Fidget Goblin
Huckleberry Inkwell Jinx Kazoo Lentil Marshmallow Nimbus Orbit Pogo Ripple Scooter Tater Uno Velcro Widget
Bingo Comet Dumpling Flapjack Gadget Hobnob Itsy Jester Koko Loki Mittens Nacho Oreo Peanut Rocket Smudge
Tofu Turbo Wiggles Zuzu Buttons Chutney Doodle Fizz Gnocchi Honeybee Ivory Jujube
"""
)

CITIES = _phrases(
    """
Lisbon; Oslo; Helsinki; Reykjavik; Tallinn; Riga; Vilnius; Warsaw; Krakow; Prague; Vienna; Budapest;
Bratislava; Ljubljana; Zagreb; Belgrade; Plovdiv; Bucharest; Athens; Thessaloniki; Istanbul; Ankara;
Tbilisi; Yerevan; Baku; Tehran; Dubai; Doha; Muscat; Karachi; Lahore; Mumbai; Chennai; Kolkata; Bangalore;
Colombo; Kathmandu; Dhaka; Yangon; Bangkok; Hanoi; Manila; Jakarta; Singapore; Kuala Lumpur; Taipei; Seoul;
Busan; Osaka; Kyoto; Sapporo; Shanghai; Beijing; Chengdu; Ulaanbaatar; Almaty; Tashkent; Perth; Adelaide;
Brisbane; Melbourne; Auckland; Wellington; Honolulu; Anchorage; Vancouver; Calgary; Winnipeg; Toronto;
Montreal; Halifax; Seattle; Portland; Denver; Chicago; Boston; Atlanta; Miami; New Orleans; Houston;
Phoenix; Havana; Mexico City; Guadalajara; Bogota; Medellin; Quito; Lima; Cusco; La Paz; Santiago;
Montevideo; Buenos Aires; Asuncion; Recife; Salvador; Manaus; Caracas; Dakar; Accra; Lagos; Nairobi;
Kampala; Kigali; Addis Ababa; Khartoum; Cairo; Tunis; Algiers; Casablanca; Marrakesh; Luanda; Lusaka;
Harare; Maputo; Windhoek; Cape Town; Durban; Antananarivo; Edinburgh; Glasgow; Dublin; Cork; Bristol; Leeds;
Bordeaux; Lyon; Marseille; Seville; Valencia; Bilbao; Porto; Turin; Naples; Bologna; Palermo; Munich;
Hamburg; Leipzig; Cologne; Rotterdam; Antwerp; Ghent; Basel; Geneva; Zurich; Gothenburg; Malmo; Aarhus;
Bergen; Tromso
"""
)

JOBS = _phrases(
    """
architect; baker; carpenter; dentist; electrician; florist; geologist; hairdresser; illustrator; journalist;
locksmith; midwife; nutritionist; optician; pharmacist; plumber; radiologist; surveyor; translator;
veterinarian; welder; zookeeper; accountant; archivist; astronomer; beekeeper; bookbinder; butcher;
cartographer; chemist; choreographer; cobbler; composer; copywriter; curator; data analyst; dietitian;
economist; engraver; firefighter; fishmonger; gardener; glassblower; harpist; historian; interpreter;
jeweller; lawyer; librarian; lifeguard; machinist; meteorologist; paramedic; pastry chef; photographer;
physiotherapist; pilot; potter; probation officer; puppeteer; sculptor; seismologist; social worker;
sommelier; stonemason; tailor; taxidermist; tour guide; tram driver; upholsterer; urban planner; violin
maker; web developer; wind turbine technician; yoga teacher; ecologist; barista; blacksmith; cardiologist;
crane operator
"""
)

FOODS = _phrases(
    """
paella; moussaka; ramen; pho; biryani; lasagne; goulash; pierogi; tagine; falafel; shakshuka; risotto;
gnocchi alla romana; pad thai; bibimbap; okonomiyaki; tonkatsu; dim sum; laksa; rendang; nasi goreng; jollof
rice; injera with lentils; ceviche; empanadas; feijoada; arepas; tamales; enchiladas; pozole; poutine;
gumbo; jambalaya; clam chowder; fish and chips; shepherd's pie; haggis; borscht; pelmeni; khachapuri; dolma;
baklava; kimchi stew; mapo tofu; peking duck; butter chicken; dal makhani; masala dosa; chana masala;
bouillabaisse; ratatouille; coq au vin; fondue; raclette; schnitzel; spaetzle; sauerbraten; smorrebrod;
gravlax; bacalhau; francesinha; arancini; carbonara; osso buco; pastitsio; spanakopita; hummus; mansaf;
kofta; lahmacun; manti; plov; momos; katsu curry; udon; tteokbokki; adobo; sinigang
"""
)

HOBBIES = _phrases(
    """
rock climbing; pottery; birdwatching; calligraphy; fencing; archery; beekeeping; woodcarving; origami;
kayaking; orienteering; stargazing; knitting; quilting; juggling; sailing; surfing; skateboarding;
bouldering; fly fishing; genealogy; geocaching; embroidery; glass painting; salsa dancing; tango; chess;
bonsai; mosaic making; stand-up comedy; beatboxing; cross-country skiing; ice skating; mountain biking;
parkour; kite flying; model railways; leathercraft; soap making; candle making; crochet; trail running;
canoeing; table tennis; badminton; water polo; curling; figure drawing; urban sketching; foraging; mushroom
hunting
"""
)

SUBJECTS = _phrases(
    """
chemistry; economics; philosophy; linguistics; astrophysics; botany; zoology; archaeology; anthropology;
sociology; marine biology; civil engineering; mathematics; statistics; art history; musicology; geography;
oceanography; neuroscience; psychology; political science; classics; theology; agriculture; forestry;
nursing; pharmacology; materials science; aerospace engineering; computer science; jurisprudence; medicine;
architecture; journalism; film studies; veterinary science; genetics; biochemistry; criminology;
international relations; urban studies; graphic design
"""
)

RELATIVES = _phrases(
    """
brother; sister; cousin; neighbour; best friend; flatmate; boss; colleague; uncle; aunt; grandmother;
grandfather; mentor; teammate; godmother; stepfather
"""
)

# (past tense used in the dialogue, base form used in the question)
EVENTS = [
    ("adopted a kitten", "adopt a kitten"),
    ("ran a half marathon", "run a half marathon"),
    ("passed my driving test", "pass a driving test"),
    ("bought a second-hand piano", "buy a second-hand piano"),
    ("went skydiving", "go skydiving"),
    ("planted an apple tree", "plant an apple tree"),
    ("got my first tattoo", "get a first tattoo"),
    ("visited a lighthouse", "visit a lighthouse"),
    ("sold my old car", "sell an old car"),
    ("painted the kitchen yellow", "paint the kitchen yellow"),
    ("gave a talk at a conference", "give a talk at a conference"),
    ("baked a wedding cake", "bake a wedding cake"),
    ("climbed a volcano", "climb a volcano"),
    ("started learning Portuguese", "start learning Portuguese"),
    ("broke my wrist", "break a wrist"),
    ("won a pub quiz", "win a pub quiz"),
    ("moved into a new flat", "move into a new flat"),
    ("went to a jazz concert", "go to a jazz concert"),
    ("got engaged", "get engaged"),
    ("signed up for a pottery course", "sign up for a pottery course"),
    ("fixed an old bicycle", "fix an old bicycle"),
    ("swam in a frozen lake", "swim in a frozen lake"),
    ("hosted a dinner party", "host a dinner party"),
    ("received a promotion", "receive a promotion"),
    ("saw the northern lights", "see the northern lights"),
    ("volunteered at an animal shelter", "volunteer at an animal shelter"),
    ("finished writing a short story", "finish writing a short story"),
    ("built a treehouse", "build a treehouse"),
    ("took a cooking class", "take a cooking class"),
    ("met a famous chef", "meet a famous chef"),
    ("lost my passport", "lose a passport"),
    ("joined a choir", "join a choir"),
    ("rode a camel", "ride a camel"),
    ("graduated from night school", "graduate from night school"),
    ("flew a glider", "fly a glider"),
    ("donated blood", "donate blood"),
    ("watched a solar eclipse", "watch a solar eclipse"),
    ("repainted an old boat", "repaint an old boat"),
    ("launched a podcast", "launch a podcast"),
    ("celebrated a tenth wedding anniversary", "celebrate a tenth wedding anniversary"),
]

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

FILLERS = [
    "How has your week been?",
    "Pretty busy, but good overall.",
    "The weather has been lovely lately.",
    "I can't believe how fast this year is going.",
    "Did you sleep well? You sounded tired last time.",
    "I finally cleaned out the garage this weekend.",
    "Work has been a bit hectic, to be honest.",
    "I've been trying to drink more water.",
    "Have you watched anything good recently?",
    "Not really, I keep falling asleep on the sofa.",
    "My phone battery dies so quickly these days.",
    "I should really call my parents more often.",
    "Traffic this morning was unbelievable.",
    "I'm thinking about rearranging the living room.",
    "It's been raining nonstop over here.",
    "I tried a new coffee place, it was fine.",
    "Remind me to send you that article later.",
    "I'm so ready for the weekend.",
    "Sorry for the late reply, it's been chaotic.",
    "No worries at all, take your time.",
    "I spent all Sunday doing laundry.",
    "My neighbour's radio is always too loud.",
    "I keep forgetting to water my plants.",
    "Let's catch up properly soon.",
    "I'm trying to go to bed earlier.",
    "The supermarket was packed this morning.",
    "I read half a book on the train today.",
    "My back hurts from sitting all day.",
]

ACKS = [
    "Oh, nice!",
    "That's great to hear.",
    "Interesting, tell me more some time.",
    "Wow, I didn't know that.",
    "Good for you!",
    "Ha, that sounds like you.",
    "Noted!",
    "That's lovely.",
]


def check_vocabulary() -> None:
    """Raise ``ValueError`` if an answer list has duplicates or two lists share a value (case-insensitive)."""
    lists = {
        "NAMES": NAMES,
        "PET_NAMES": PET_NAMES,
        "CITIES": CITIES,
        "JOBS": JOBS,
        "FOODS": FOODS,
        "HOBBIES": HOBBIES,
        "SUBJECTS": SUBJECTS,
        "RELATIVES": RELATIVES,
    }
    seen: dict[str, str] = {}
    for list_name, values in lists.items():
        lowered = [v.lower() for v in values]
        if len(set(lowered)) != len(lowered):
            dup = sorted({v for v in lowered if lowered.count(v) > 1})
            raise ValueError(f"{list_name} has duplicates: {dup}")
        for value in lowered:
            if value in seen:
                raise ValueError(f"{value!r} is in both {seen[value]} and {list_name}")
            seen[value] = list_name
