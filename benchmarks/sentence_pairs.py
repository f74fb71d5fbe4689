"""Sentence pairs written for fxcc's quality harness (benchmarks/quality.py); not taken from any data set.

40 pairs spread from near-paraphrases to unrelated sentences, so pairwise similarity scores span a wide
range and ranking agreement between an approximate and the exact model is informative. The second field
is the writer's intended similarity (0 unrelated .. 4 paraphrase); the harness ranks by the exact
model's scores, the labels only document the spread.
"""

from __future__ import annotations

PAIRS: list[tuple[str, str, int]] = [
    # paraphrases (4)
    ("The train to the airport leaves every twenty minutes.",
     "Every twenty minutes a train departs for the airport.", 4),
    ("She repaired the bicycle's flat tire before breakfast.",
     "Before eating breakfast, she fixed the flat tyre on her bike.", 4),
    ("The museum is closed on Mondays for cleaning.",
     "On Mondays the museum shuts so it can be cleaned.", 4),
    ("Our compiler fuses elementwise operations into a single kernel.",
     "The compiler merges pointwise ops so they run as one kernel.", 4),
    ("He forgot his umbrella and got soaked on the way home.",
     "Having left his umbrella behind, he was drenched walking home.", 4),
    ("The bakery sells fresh sourdough bread every morning.",
     "Each morning the bakery offers freshly baked sourdough.", 4),
    ("The committee postponed the vote until next week.",
     "The vote was delayed by the committee to the following week.", 4),
    ("Children were building a sandcastle near the water.",
     "Near the shoreline, kids were making a castle out of sand.", 4),
    # closely related (3)
    ("The cat slept on the sunny windowsill all afternoon.",
     "A dog dozed in a patch of sunlight on the porch.", 3),
    ("Matrix multiplication dominates transformer inference time.",
     "Most of a language model's runtime goes into large GEMMs.", 3),
    ("The river flooded the lower part of the village.",
     "Heavy rain caused water to enter homes near the riverbank.", 3),
    ("She practices the violin for two hours every day.",
     "He rehearses piano pieces each evening after work.", 3),
    ("The startup raised money to expand into Europe.",
     "The young company secured funding for its European growth.", 3),
    ("A strong wind knocked down several trees overnight.",
     "The storm last night toppled a number of trees.", 3),
    ("The recipe calls for two cups of flour and one egg.",
     "You need flour, an egg and some milk to make this batter.", 3),
    ("The hikers reached the summit just before sunset.",
     "The climbers got to the top of the mountain as the sun went down.", 3),
    # same topic, different content (2)
    ("The goalkeeper saved a penalty in the final minute.",
     "Ticket prices for the football season went up again.", 2),
    ("The new phone has a larger battery and a brighter screen.",
     "Smartphone sales slowed down during the last quarter.", 2),
    ("The doctor recommended more sleep and less coffee.",
     "The hospital opened a new wing for children.", 2),
    ("The library extended its opening hours during exams.",
     "Students often borrow novels for the summer holidays.", 2),
    ("Autotuning searches tile sizes to find the fastest kernel.",
     "GPU memory bandwidth limits how fast decoding can run.", 2),
    ("The chef seasoned the soup with thyme and black pepper.",
     "The restaurant received a good review in the local paper.", 2),
    ("The airline cancelled flights because of the snowstorm.",
     "Passengers can now check in online a day in advance.", 2),
    ("The painter used bright blues for the sea and sky.",
     "The gallery will show sculptures from local artists.", 2),
    # loosely related (1)
    ("The orchestra tuned their instruments before the concert.",
     "The mechanic tuned the engine of the old truck.", 1),
    ("He planted tomatoes and basil in the back garden.",
     "The supermarket reorganised its vegetable aisle.", 1),
    ("The bridge was painted red to match the city's logo.",
     "Traffic was heavy on the highway this morning.", 1),
    ("Our cache stores compiled kernels keyed by their hash.",
     "She keeps her spare keys in a box by the door.", 1),
    ("The marathon route passes through the old town.",
     "A new shoe store opened next to the train station.", 1),
    ("The teacher handed back the graded essays.",
     "Printer ink has become surprisingly expensive.", 1),
    ("Bees collect nectar from the lavender in summer.",
     "The honey jar on the shelf was almost empty.", 1),
    ("The spacecraft sent back images of Saturn's rings.",
     "He bought a telescope to watch the stars from his roof.", 1),
    # unrelated (0)
    ("The quarterly tax form must be filed by April.",
     "Penguins huddle together to survive the Antarctic winter.", 0),
    ("She tied the boat to the wooden pier.",
     "The algorithm sorts the list in logarithmic passes.", 0),
    ("A thunderstorm rolled over the valley at dawn.",
     "The spreadsheet formula returned an error for empty cells.", 0),
    ("My grandmother knits scarves for the whole family.",
     "The rocket engine failed during the static fire test.", 0),
    ("The kernel launch overhead dominates small batches.",
     "Fresh strawberries are best eaten the day they are picked.", 0),
    ("The referee showed the defender a yellow card.",
     "Granite is an igneous rock rich in quartz and feldspar.", 0),
    ("The violinist bowed to the applauding audience.",
     "Interest rates on mortgages rose for the third month.", 0),
    ("The puppy chased its tail around the kitchen.",
     "Parliament debated the new fisheries regulation.", 0),
]

assert len(PAIRS) == 40
