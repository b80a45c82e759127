"""What the synthetic sample dataset is made of: its prompts, word lists, sentence templates,
rubric table (descriptions, feedback labels, band descriptors, scoring formulas), noise and
split sizes. The generator (``synthetic.py``), the feedback templates (``feedback.py``) and the
dataset card (``card.py``) all read these, so the card always describes what was generated.
"""
from __future__ import annotations

from typing import Any

# ----------------------------------------------------------------------------
# Word lists. Marker phrases never contain a word of MISSPELLINGS, so injected
# spelling errors cannot hide another cue (checked in the tests).
# ----------------------------------------------------------------------------
PROMPTS: list[dict[str, Any]] = [
    {"id": "school_uniforms", "title": "School uniforms",
     "text": "Should schools require students to wear uniforms? Take a position and "
             "support it with reasons and examples.",
     "key": "school uniforms",
     "topic": ["uniform", "clothing", "dress code", "fashion", "bullying", "identity",
               "discipline", "appearance", "self-expression", "school spirit",
               "equality", "peer pressure"],
     "stances": ["schools should ask every student to wear the same outfit",
                 "a shared outfit rule makes school days calmer",
                 "students should keep choosing what they wear"],
     "examples": [("my cousin's school saved families money on clothes",
                   "my cousin's school saved families 150 dollars on clothes"),
                  ("at my old school nobody was teased about shoes",
                   "at my old school 9 in 10 kids liked mornings more"),
                  ("my neighbour's school has fewer fights now",
                   "my neighbour's school has 30 percent fewer fights now")],
     "counters": ["a shared outfit limits personal style",
                  "extra outfits cost families too much"]},
    {"id": "phones_in_class", "title": "Phones in the classroom",
     "text": "Should students be allowed to use their phones during class? Explain "
             "your view with reasons and examples.",
     "key": "phones in class",
     "topic": ["smartphone use", "screen time", "distraction", "attention", "texting",
               "focus", "social media", "concentration", "homework",
               "classroom technology", "online research", "digital literacy"],
     "stances": ["students should be allowed to keep a phone on the desk",
                 "a phone belongs in a locker during lessons",
                 "teachers should decide when phones come out"],
     "examples": [("my sister checked her phone during every lesson",
                   "my sister checked her phone 40 times in one lesson"),
                  ("our science teacher lets us look up facts on a phone",
                   "our science teacher lets us look up facts for 10 minutes"),
                  ("my brother's grades dropped after he got a phone",
                   "my brother's grades dropped 15 points after he got a phone")],
     "counters": ["phones help students find answers fast",
                  "banning phones treats students like children"]},
    {"id": "learning_from_mistakes", "title": "Learning from a mistake",
     "text": "Describe a time when you made a mistake and explain what you learned "
             "from it. Use specific details.",
     "key": "learning from mistakes",
     "topic": ["failure", "courage", "practice", "honesty", "patience", "growth",
               "regret", "responsibility", "confidence", "self-reflection",
               "resilience", "apology"],
     "stances": ["the mistake i made last year taught me the most",
                 "my worst mistake turned into my best lesson",
                 "making that mistake changed how i act today"],
     "examples": [("i forgot my lines in the school play",
                   "i forgot my lines in front of 200 parents"),
                  ("i lied to my coach about missing training",
                   "i lied to my coach about missing 3 training sessions"),
                  ("i broke my sister's bike and hid it",
                   "i broke my sister's bike and hid it for 2 weeks")],
     "counters": ["a mistake should simply be forgotten",
                  "talking about errors only makes a person feel worse"]},
]
PROMPT_BY_ID = {p["id"]: p for p in PROMPTS}

INTRO_OPENERS = ("in this essay", "this essay will explain", "there is a lively debate about")
INTRO_TEMPLATES = ("in this essay i discuss {ref}", "this essay will explain my view on {ref}",
                   "there is a lively debate about {ref}")
CONCLUSION_OPENERS = ("in conclusion", "to sum up", "all in all")
CONCLUSION_TEMPLATES = ("{o}, {n1} deserves {a_adj} amount of thought",
                        "{o}, the points above about {n1} show {a_adj} way forward",
                        "{o}, my view is {adj}")
POSITION_TEMPLATES = ("in my opinion, {s}", "i strongly believe that {s}",
                      "my position is that {s}", "i am convinced that {s}")
POSITION_MARKERS = tuple(t.split("{")[0].strip(" ,") for t in POSITION_TEMPLATES)
EXAMPLE_MARKERS = ("for example", "for instance", "to illustrate", "in my experience")
DEPTH_MARKERS = ("this means that", "in the long run", "the deeper reason is that",
                 "a key implication is that")
DEPTH_CLAUSES = ("small daily choices about {n1} add up to {a_adj} difference",
                 "habits formed early have {a_adj} influence later",
                 "trust in {n1} grows when the reasons are {adj}",
                 "a clear rule is {adj} when everybody understands it")
COUNTER_MARKERS = ("critics claim that", "others might object that")
REBUTTALS = ("yet this view misses the point", "but the evidence disagrees",
             "though that seems {adj} at first")
TRANSITIONS = ("however", "therefore", "moreover", "furthermore", "in addition",
               "on the other hand", "similarly", "as a result")
ADVANCED_WORDS = ("crucial", "substantial", "beneficial", "profound", "significant",
                  "invaluable", "fundamental", "compelling", "remarkable", "considerable")
BASIC_WORDS = ("good", "bad", "big", "nice", "okay", "cool")
GENERIC_NOUNS = ("life", "everything", "daily life", "the future", "the world",
                 "this stuff", "other things", "the situation")
BODY_TEMPLATES = (
    "people really think that {n1} is {a_adj} thing for {n2}",
    "{n1} can have {a_adj} effect on {n2} and on their friends",
    "i definitely think {n1} and {n2} are {adj} in different ways",
    "the way people treat {n1} is {adj} because it shapes {n2}",
    "many people forget how {adj} {n1} can be for {n2}",
    "{n1} usually changes {n2} in {a_adj} way",
    "everyone would receive {a_adj} benefit from {n1} and {n2}",
    "their ideas about {n1} are {adj}, and {n2} is something they always mention",
    "{n1} is {adj} for people because it connects to {n2}",
    "we probably see {n1} and {n2} as {adj} parts of the same problem",
)
OFF_TOPIC_SENTENCES = ("My favourite food is pizza with extra cheese.",
                       "Last weekend I watched a football match with my cousin.",
                       "It rained on my birthday and the weather was grey.",
                       "My cat likes to sleep on the sofa all afternoon.",
                       "I also enjoy playing video games after dinner.")
OFF_TOPIC_WORDS = ("pizza", "weekend", "football", "birthday", "weather", "cat", "sofa",
                   "video games", "dinner")
MISSPELLINGS = {"people": "poeple", "really": "realy", "because": "becuase",
                "their": "thier", "different": "diffrent", "usually": "usualy",
                "probably": "probaly", "always": "allways", "something": "somthing",
                "definitely": "definately", "receive": "recieve", "everyone": "evryone",
                "friends": "freinds"}

RUBRIC_NAMES = ("task", "content_1", "content_2", "content_3", "organization_1",
                "organization_2", "expression_1", "expression_2")
# name -> (description, feedback label, five band descriptors for 1-2, 3-4, 5-6, 7-8, 9,
#          scoring function as documented in the README)
RUBRICS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "task": ("Task fulfilment: the essay answers the prompt, names the issue and takes "
             "a clear position without drifting off topic.", "task fulfilment",
             ("no position and off-topic material", "unclear position or off-topic lines",
              "position or issue stated, not both", "clear position on the named issue",
              "clear position, named issue, fully on topic"),
             "clip(3 + 3*has_position + 3*has_key_phrase - 2*off_topic_sentences, 1, 9)"),
    "content_1": ("Relevance of ideas to the prompt: the ideas use the prompt's own "
                  "topic vocabulary and stay on it.", "relevance",
                  ("barely related to the prompt", "few ideas tied to the prompt",
                   "mostly relevant ideas", "relevant ideas across the topic",
                   "every idea on the prompt's topic"),
                  "clip(scale(topic_words, 5) - off_topic_sentences, 1, 9)"),
    "content_2": ("Supporting details and examples: points are backed by concrete "
                  "examples and specific facts.", "supporting detail",
                  ("no examples", "one vague example", "some examples",
                   "several concrete examples", "concrete examples with specific facts"),
                  "clip(1 + 3*min(example_markers, 2) + 2*has_number, 1, 9)"),
    "content_3": ("Originality and depth: ideas are explained with consequences and "
                  "a counterargument is answered.", "depth of reasoning",
                  ("ideas only listed", "little explanation", "some explanation",
                   "ideas explained with consequences",
                   "deep reasoning with a counterargument answered"),
                  "clip(1 + 3*min(depth_markers, 2) + 2*has_counterargument, 1, 9)"),
    "organization_1": ("Paragraph structure: an introduction, a conclusion and "
                       "clear paragraphs.", "paragraph structure",
                       ("one block, no introduction or conclusion",
                        "introduction or conclusion missing",
                        "partial structure", "introduction, body and conclusion",
                        "complete structure in well-divided paragraphs"),
                       "clip(1 + 3*has_intro + 3*has_conclusion + min(paragraphs, 3) - 1, 1, 9)"),
    "organization_2": ("Transitions and coherence: sentences are linked with varied "
                       "transition words.", "transitions and coherence",
                       ("no transitions", "one or two transitions", "some transitions",
                        "varied transitions", "consistently linked ideas"),
                       "scale(transitions, 5)"),
    "expression_1": ("Vocabulary range: precise and advanced word choice instead of "
                     "plain words.", "vocabulary range",
                     ("only plain words", "mostly plain words", "some precise words",
                      "varied precise vocabulary", "rich, precise vocabulary"),
                     "scale(advanced_words, 5)"),
    "expression_2": ("Spelling and mechanics: words are spelled correctly.",
                     "spelling and mechanics",
                     ("many misspellings", "frequent misspellings", "a few misspellings",
                      "rare misspellings", "no misspellings"),
                     "scale(5 - min(misspellings, 5), 5)"),
}
NOISE = (-1, 0, 0, 1)  # bounded integer noise, drawn uniformly from this tuple
SPLIT_SIZES = {"train": 200, "valid": 30, "test": 60}
